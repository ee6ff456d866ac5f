"""Compare the running environment with the committed lock, and list newer upstream releases.

Run by ``make test-latest`` inside the venv it resolved (the newest versions pyproject allows):

    python scripts/lock_diff.py requirements/lock.txt

Prints every package whose installed version differs from the lock (and packages only on one side), then asks the
package index (``pip list --outdated``) which installed packages have a newer release than the one installed:
those are outside pyproject's ranges (or the torch pin), the place the next upstream break will come from.
Exit status 0 either way: this is information for the person upgrading, the test suite is the verdict.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` line of a pip-compile lock."""
    pins = {}
    with open(path) as f:
        for line in f:
            m = _PIN.match(line.strip())
            if m:
                pins[_norm(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    return {_norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/lock_diff.py requirements/lock.txt", file=sys.stderr)
        return 2
    lock, env = read_lock(argv[0]), installed()
    ignore = {"vlmx", "pip"}
    changed = sorted((n, lock[n], env[n]) for n in lock.keys() & env.keys() if lock[n] != env[n])
    only_lock = sorted(set(lock) - set(env) - ignore)
    only_env = sorted(set(env) - set(lock) - ignore)
    print(f"vlmx: this environment vs {argv[0]}: {len(changed)} changed, {len(only_env)} added, "
          f"{len(only_lock)} gone")
    for n, old, new in changed:
        print(f"  {n}: lock {old} -> now {new}")
    for n in only_env:
        print(f"  {n}: not in the lock, now {env[n]}")
    for n in only_lock:
        print(f"  {n}: lock {lock[n]}, not installed now")
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "list", "--outdated", "--format", "json"],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        outdated = [p for p in json.loads(out) if _norm(p["name"]) not in ignore]
    except (subprocess.SubprocessError, json.JSONDecodeError, OSError) as e:
        print(f"vlmx: could not ask the package index for newer releases ({e})")
        return 0
    print(f"vlmx: {len(outdated)} installed packages have a newer upstream release (held back by pyproject's "
          "ranges, the torch pin or a dependency's range)")
    for p in sorted(outdated, key=lambda p: _norm(p["name"])):
        print(f"  {p['name']}: {p['version']} installed, {p['latest_version']} upstream")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

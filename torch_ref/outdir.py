"""Safe output directories for every vlmx writer (``vlm-export --out``, ``vlm-build --out``).

One rule for all of them:

- ``--out`` may not be empty, ``/``, the home directory, the working directory or any of its ancestors; an
  existing path must be a directory, and is replaced only with ``--overwrite`` and only when it holds what this
  writer makes (``is_ours``) or nothing at all;
- one lock per ``--out`` (``.<name>.vlmx-lock`` beside it, ``fcntl.flock``: released by the kernel when the
  process dies), so a second writer fails at once with a clear message;
- the output is written into ``<out>.vlmx-tmp-<pid>`` and renamed into place when complete; temporary directories
  left by dead processes (``kill -9``) are removed by the next run to the same ``--out``; on any error, Ctrl-C or
  SIGTERM the temporary directory and any parent directories this run created are removed.

Torch-free, like :mod:`vlmx.torch_ref.contract`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

TMP_TAG = ".vlmx-tmp-"
OLD_TAG = ".vlmx-old-"
LOCK_SUFFIX = ".vlmx-lock"


class OutputError(ValueError):
    """``--out`` cannot be written as asked; the message names the path and what to do."""


class Terminated(BaseException):
    """SIGTERM arrived (raised from the signal handler so ``finally`` blocks clean up)."""


def check_out(out, overwrite: bool, is_ours: Callable[[Path], bool], what: str = "a vlmx export",
              flag: str = "--out") -> Path:
    """Validate an output path before any work; returns it as a Path. Raises :class:`OutputError`."""
    text = str(out) if out is not None else ""
    if not text.strip():
        raise OutputError(f"{flag} is empty; pass the directory to write, e.g. {flag} exports/llava-tiny")
    label = text if text.isprintable() else repr(text)  # messages stay on one line
    if "\x00" in text:
        raise OutputError(f"{flag} contains a NUL character; pass a plain directory path")
    try:
        path = Path(text).expanduser()
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # ~nosuchuser, symlink loops, unreadable components
        raise OutputError(f"{flag} {label}: cannot resolve the path ({e}); choose another directory") from None
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or resolved in (cwd, *cwd.parents):
        raise OutputError(f"{flag} {label} is the root, home or working directory (or one of its parents); vlmx "
                          f"never writes there: pass a new directory such as {flag} {label.rstrip('/')}/vlmx-out")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{flag} {label} exists and is not a directory; choose another path")
    if path.is_dir():
        if not overwrite:
            raise OutputError(f"{flag} {label} already exists; pass --overwrite to replace it or choose another "
                              "directory")
        if any(path.iterdir()) and not is_ours(path):
            raise OutputError(f"{flag} {label} is not {what} (it holds other files); --overwrite only replaces "
                              f"{what}: choose another directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {label}: {parent} is not a directory; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{flag} {label}: {parent} is not writable; choose another directory")
            break
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_dirs(out: Path) -> list[Path]:
    """Temporary / replaced directories of ``out`` whose writing process is gone."""
    out = Path(out)
    found = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        for tag in (TMP_TAG, OLD_TAG):
            prefix = out.name + tag
            if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and p.is_dir():
                pid = int(p.name[len(prefix):])
                if pid != os.getpid() and not _pid_alive(pid):
                    found.append(p)
    return found


@contextlib.contextmanager
def _lock(out: Path, flag: str):
    import fcntl

    lock = out.parent / f".{out.name}{LOCK_SUFFIX}"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{flag} {out} is being written by another vlmx process (lock {lock}); wait for it "
                                  "or choose another directory") from None
            raise
        try:  # the file we locked must still be the one at the path (a finishing writer unlinks it)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextlib.contextmanager
def atomic_output(out, flag: str = "--out", recheck: Callable[[], object] | None = None):
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out`` (checked by
    :func:`check_out` first, and again by ``recheck`` once the lock is held, so a writer that finished meanwhile is
    never replaced silently), on any failure it and the parents this run created are removed."""
    out = Path(out)
    created = _missing_parents(out)
    tmp = out.parent / f"{out.name}{TMP_TAG}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _lock(out, flag):
            if recheck is not None:
                recheck()
            for stale in stale_dirs(out):
                shutil.rmtree(stale, ignore_errors=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            try:
                yield tmp
                old = out.parent / f"{out.name}{OLD_TAG}{os.getpid()}"
                if out.exists():
                    os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        for parent in created:  # deepest first; only the empty ones this run made
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _raise_terminated(signum, frame):
    raise Terminated()


def quiet_warnings() -> None:
    """Silence library warnings and chatter (transformers, torch.onnx, polygraphy) for a CLI run without
    ``--verbose``; errors still surface as the CLI's one-line messages."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("transformers", "torch.onnx", "onnxscript", "polygraphy", "onnx_ir", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_cli(prog: str, main: Callable[[], int], verbose: bool = False) -> int:
    """Run a CLI body with SIGTERM turned into an exception: Ctrl-C exits 130 and SIGTERM 143, each with one line
    (cleanup happens in the writers' ``finally`` blocks on the way out). Warnings are silenced unless ``verbose``."""
    if not verbose:
        quiet_warnings()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); partial output removed", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); partial output removed", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)

"""Build the vlmx CUDA kernels (``plugins/csrc``) into one cached shared library per target.

``python -m vlmx.plugins.build --target trt-sm75 [--all] [--ptx-only]``

Each library holds SASS for the target plus compute_75 PTX (``Target.gencode``), so the Turing instruction set is
always there for the driver JIT; ``--ptx-only`` embeds compute_75 PTX alone, which forces the JIT on any newer GPU
(how an H100 runs exactly what a T4 would). cudart is linked statically: the library loads on machines with no
findable libcudart and no GPU. Outputs are cached under ``build/plugins/`` by a hash of sources, flags and nvcc
version; ``--resource-usage`` (registers, spills, shared memory per kernel) is printed on every compile.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmx.torch_ref.targets import DEFAULT_TARGET, TARGETS, get_target

CSRC = Path(__file__).resolve().parent / "csrc"
# Repo checkouts build next to the sources' repository; installed copies fall back to the user cache.
_REPO_ROOT = CSRC.parent.parent
DEFAULT_OUT = (_REPO_ROOT / "build" / "plugins") if (_REPO_ROOT / "pyproject.toml").exists() else \
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmx" / "plugins"
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart=static", "--resource-usage",
              "-diag-suppress=177", "-lineinfo"]


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message carries the command and its output."""


def sources() -> list[Path]:
    """Every translation unit of the kernel library (one .cu per algorithm)."""
    return sorted(CSRC.glob("*.cu"))


def find_nvcc() -> str:
    """Path of nvcc (``$NVCC``, ``$CUDA_HOME/bin``, then ``PATH``)."""
    for cand in (os.environ.get("NVCC"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise BuildError("nvcc not found: install the CUDA toolkit (12.x or 13.x), put nvcc on PATH or set NVCC/CUDA_HOME")


def cuda_tool(name: str) -> str:
    """A CUDA toolkit program (cuobjdump, nvdisasm, ...) next to nvcc, else from PATH."""
    sibling = Path(find_nvcc()).with_name(name)
    if sibling.exists():
        return str(sibling)
    found = shutil.which(name)
    if not found:
        raise BuildError(f"{name} not found next to nvcc or on PATH; install the full CUDA toolkit")
    return found


def has_nvcc() -> bool:
    """True when :func:`find_nvcc` would succeed (tests skip with a reason otherwise)."""
    try:
        find_nvcc()
        return True
    except BuildError:
        return False


def gencode_flags(target: str, ptx_only: bool = False) -> list[str]:
    """SASS for the target + compute_75 PTX, or compute_75 PTX alone."""
    if ptx_only:
        return ["-gencode=arch=compute_75,code=compute_75"]
    return list(get_target(target).gencode)


def library_name(target: str, ptx_only: bool = False) -> str:
    """``libvlmx_kernels_sm75.so`` or ``libvlmx_kernels_ptx75.so``."""
    return "libvlmx_kernels_ptx75.so" if ptx_only else f"libvlmx_kernels_sm{get_target(target).sm}.so"


def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def cache_key(target: str, ptx_only: bool, nvcc: str, defines: tuple[str, ...] = ()) -> str:
    """Hash of every source/header, the flags and the compiler version: a changed input means a rebuild."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(" ".join(BASE_FLAGS + gencode_flags(target, ptx_only) + [f"-D{d}" for d in defines]).encode())
    h.update(_nvcc_version(nvcc).encode())
    return h.hexdigest()[:16]


def build(target: str = DEFAULT_TARGET, out_dir: str | Path | None = None, ptx_only: bool = False,
          verbose: bool = True, threads: int = 0, defines: tuple[str, ...] = ()) -> Path:
    """Compile (or reuse) the kernel library for ``target``; returns the path of the .so.

    threads: nvcc ``--threads`` (0 = one per gencode); defines: ``NAME=VALUE`` tuning macros passed as ``-D``
    (variants for benchmarks). Raises :class:`BuildError` when nvcc fails.
    """
    defines = tuple(defines)
    nvcc = find_nvcc()
    out_root = Path(out_dir) if out_dir else DEFAULT_OUT
    key = cache_key(target, ptx_only, nvcc, defines)
    lib = out_root / key / library_name(target, ptx_only)
    if lib.exists():
        if verbose:
            print(f"[vlmx.plugins.build] {target}{' (ptx only)' if ptx_only else ''}: cached {lib}")
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name and rename: parallel builds of the same key never see a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [nvcc, *BASE_FLAGS, *gencode_flags(target, ptx_only), *[f"-D{d}" for d in defines], f"--threads={threads}", f"-I{CSRC}", "-o", tmp,
           *map(str, sources())]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"nvcc failed for --target {target} (exit {proc.returncode}):\n  {' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    os.replace(tmp, lib)
    if verbose:
        print(f"[vlmx.plugins.build] {target}{' (ptx only)' if ptx_only else ''}: built {lib} in "
              f"{time.monotonic() - start:.1f}s\n  {' '.join(cmd)}")
        print(summarize_resource_usage(proc.stdout + proc.stderr))
    return lib


def summarize_resource_usage(log: str) -> str:
    """One line per kernel and architecture from ptxas' ``--resource-usage`` output (registers, spills, smem)."""
    lines, name, arch, spill = [], None, "", ""
    for raw in log.splitlines():
        line = raw.strip()
        if line.startswith("ptxas info    : Compiling entry function"):
            name = line.split("'")[1]
            arch = line.rsplit("for ", 1)[-1].strip("'")
        elif "spill stores" in line:
            spill = line.replace("bytes ", "B ")
        elif line.startswith("ptxas info    : Used") and name:
            lines.append(f"  {arch:>7} {_demangle_short(name):<42} {line.split(': ', 1)[1]}; {spill}")
            name = None
        elif "warning" in line.lower():
            lines.append("  " + line)
    return "\n".join(lines)


def _demangle_short(name: str) -> str:
    for kernel in ("flash_fwd_kernel", "flash_combine_kernel", "int8_gemm_kernel", "w8a8_decode_kernel",
                   "quantize_rows_kernel", "mma_f16_ceiling_kernel", "mma_s8_ceiling_kernel"):
        if kernel in name:
            tail = name.split(kernel, 1)[1]
            if kernel == "w8a8_decode_kernel":  # <Epilogue, token groups of 8>
                groups = tail.split("Li")[1].split("E")[0] if "Li" in tail else "?"
                return f"{kernel}<{'fp16' if 'E1E' in tail else 'int32'},TG={groups}>"
            if kernel == "flash_fwd_kernel":
                args = [a for a in tail.split("Li")[1:3]]
                return f"{kernel}<D={args[0].split('E')[0]},W={args[1].split('E')[0]}>"
            if kernel == "int8_gemm_kernel":
                return f"{kernel}<{'fp16' if 'Epilogue' in tail and 'E1E' in tail else 'int32'}>"
            return kernel
    return name


def fatbin_entries(lib: str | Path) -> list[tuple[str, int, int]]:
    """(kind 'ptx'|'sass', sm, payload bytes) of every fatbin entry embedded in a library.

    Reads the fatbin headers directly (magic 0xBA55ED50; entry: kind u16, header size u32 at +4, payload size u64
    at +8, arch u32 at +28), so checks of what a build carries need no cuobjdump (absent from pip-installed CUDA).
    """
    data = Path(lib).read_bytes()
    magic = struct.pack("<I", 0xBA55ED50)
    entries, pos = [], data.find(magic)
    while pos >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, pos)
        cur, end = pos + header, pos + header + size
        while cur + 32 <= end:
            kind, _, ehead, payload = struct.unpack_from("<HHIQ", data, cur)
            arch = struct.unpack_from("<I", data, cur + 28)[0]
            entries.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), arch, payload))
            if ehead == 0:
                break
            cur += ehead + payload
        pos = data.find(magic, max(end, pos + 4))
    return entries


def build_all(out_dir=None, verbose: bool = True, jobs: int = 0) -> dict[str, Path]:
    """Compile every target of :data:`TARGETS`, ``jobs`` nvcc processes at a time (0 = CPU count)."""
    jobs = jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(build, name, out_dir, False, verbose, 1) for name in TARGETS}
        return {name: f.result() for name, f in futures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmx.plugins.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("--all", action="store_true", help="build every target (in parallel processes)")
    parser.add_argument("--ptx-only", action="store_true", help="embed compute_75 PTX only (forces the driver JIT)")
    parser.add_argument("--out-dir", default=None, help=f"cache directory (default {DEFAULT_OUT})")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                        help="tuning macro for a benchmark variant (repeatable)")
    parser.add_argument("--jobs", type=int, default=0, help="parallel nvcc processes for --all (0 = CPU count)")
    args = parser.parse_args(argv)
    try:
        if args.all:
            for name, path in build_all(args.out_dir, jobs=args.jobs).items():
                print(f"{name}: {path}")
        else:
            print(build(args.target, args.out_dir, args.ptx_only, defines=tuple(args.define)))
    except (BuildError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

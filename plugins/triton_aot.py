"""Ahead-of-time compilation of the vlmx Triton kernels to cubin + PTX + ``manifest.json`` (host only, no GPU).

``python -m vlmx.plugins.triton_aot --target trt-sm75 --out build/triton/sm75`` (or :func:`compile_all`) writes
``<kernel>.<spec>.cubin`` and ``.ptx`` for every specialisation in :data:`SPECS` and a self-describing manifest
read by :mod:`vlmx.plugins.cubin_loader` (Python) and the TensorRT plugin library (C++).

Specialisations (118 per target, the same list for every target). Row kernels (quantize_per_token, gelu_quant,
norm_quant) hold a whole row in registers for ``C <= 8192`` with ``BLOCK_C`` = the next power of two (128 … 8192)
and loop over 4096-wide chunks above that; token_importance has ``BLOCK_D`` in 32/64/128/256 (head_dim <= 256);
gather_rows loops over 1024-wide chunks. Each of these exists in an ``a16`` build (pointers and the row length /
strides divisible by 16, which lets Triton emit 16-byte vector loads) and an ``a1`` build without that promise (odd
sizes, offset views), for fp16 and fp32. gather_topk's selection is topk_rank (grid over token blocks; writes a
kept mask, a B x N int8 workspace) then topk_compact (one program per batch row; writes ascending indices).
Modes (clip, GELU variant, LayerNorm/RMSNorm, per-token/per-tensor, bias) are runtime arguments.

Manifest entry (one per specialisation), all data, no code::

    kernel, spec, symbol, cubin, ptx        names and files
    params        [{name, type}] in ABI order: *fp16/*fp32/*i8/*i64 pointers (u64), i32, fp32
    trailing_params  pointers Triton appends after params (pass 0 when the matching *_scratch_size is 0)
    constexprs, num_warps, threads_per_block, shared_bytes (dynamic shared memory at launch)
    grid          3 strings, each an integer, a value name, or cdiv(name,int): evaluated over the launch values
    match         {dtype, ranges: {name: [min, max|null]}}; divisible_by_16: values that must be multiples of 16
                  (pointers: byte addresses). The loader takes the first entry whose match and divisibility hold.
    ptx_param_types  the .entry parameter types read back from the PTX (checked against params + trailing)
    build_key     hash of Triton version, sm, spec and kernel source: unchanged entries are not recompiled

Launch: block = (threads_per_block, 1, 1), dynamic shared memory = shared_bytes (opt in above 48 KB), parameters =
params in order, then one 0 pointer per trailing param. Top level: target, sm, triton_version, trailing_params.

Supported Triton: :data:`SUPPORTED_TRITON` (``constexprs=`` API of 3.3+; trailing scratch params from metadata).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmx.torch_ref.targets import TARGETS, Target, get_target

SUPPORTED_TRITON = ((3, 3), (3, 7))  # [min, max): tested with 3.6.0
MANIFEST_FORMAT = 1
ROW_BLOCKS = (128, 256, 512, 1024, 2048, 4096, 8192)
ROW_LOOP_BLOCK = 4096
DTYPES = {"float16": "fp16", "float32": "fp32"}
HEAD_DIM_BLOCKS = (32, 64, 128, 256)


@dataclass(frozen=True)
class Spec:
    """One specialisation of one kernel: what to compile and when the loader may pick it."""

    kernel: str
    name: str
    params: tuple[tuple[str, str], ...]
    constexprs: dict
    num_warps: int
    grid: tuple[str, str, str]
    dtype: str | None = None
    ranges: dict = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()


def _ptrs(params) -> tuple[str, ...]:
    return tuple(n for n, t in params if t.startswith("*"))


def _row_warps(block_c: int) -> int:
    """Warps per row program: 16 for 8192, 8 for 2048-4096, at most 4 below (whole rows in registers, several
    programs resident per SM to hide memory latency)."""
    return 16 if block_c >= 8192 else 8 if block_c >= 2048 else max(1, min(4, block_c // 128))


def _row_specs(kernel: str, dtype: str) -> list[Spec]:
    t = DTYPES[dtype]
    params = {
        "quantize_per_token": (("x_ptr", f"*{t}"), ("q_ptr", "*i8"), ("scale_ptr", "*fp32"), ("C", "i32"),
                               ("clip_range", "fp32")),
        "gelu_quant": (("x_ptr", f"*{t}"), ("q_ptr", "*i8"), ("scale_ptr", "*fp32"), ("C", "i32"),
                       ("clip_range", "fp32"), ("approx_tanh", "i32")),
        "norm_quant": (("x_ptr", f"*{t}"), ("w_ptr", f"*{t}"), ("b_ptr", f"*{t}"), ("q_ptr", "*i8"),
                       ("scale_ptr", "*fp32"), ("sum_ptr", "*fp32"), ("C", "i32"), ("eps", "fp32"), ("clip_range", "fp32"),
                       ("static_scale", "fp32"), ("is_rms", "i32"), ("per_token", "i32"), ("has_bias", "i32")),
    }[kernel]
    specs = []
    for aligned in (True, False):
        div = _ptrs(params) + ("C",) if aligned else ()
        lo = 1
        for block in ROW_BLOCKS + (None,):
            one = block is not None
            bc = block or ROW_LOOP_BLOCK
            specs.append(Spec(kernel, f"{t}.a{16 if aligned else 1}.{'c' if one else 'loop'}{bc}", params,
                              {"BLOCK_C": bc, "ONE_CHUNK": int(one)}, _row_warps(bc),
                              ("rows", "1", "1"), dtype, {"C": [lo, block]}, div))
            lo = (block or 0) + 1
    return specs


def _token_importance_specs(dtype: str) -> list[Spec]:
    t = DTYPES[dtype]
    params = (("q_ptr", f"*{t}"), ("k_ptr", f"*{t}"), ("out_ptr", "*fp32"), ("T", "i32"), ("N", "i32"), ("D", "i32"),
              ("group", "i32"), ("q_stride_b", "i32"), ("q_stride_t", "i32"), ("k_stride_b", "i32"),
              ("k_stride_n", "i32"), ("scale", "fp32"), ("inv_count", "fp32"))
    specs = []
    for aligned in (True, False):
        div = _ptrs(params) + ("D", "q_stride_b", "q_stride_t", "k_stride_b", "k_stride_n") if aligned else ()
        lo = 1
        for bd in HEAD_DIM_BLOCKS:
            # fp32 dots must be IEEE to match the fp32 reference (TF32 would keep 10 mantissa bits).
            ce = {"BLOCK_T": 16, "BLOCK_N": 64 if bd <= 128 else 32, "BLOCK_D": bd,
                  "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32"}
            specs.append(Spec("token_importance", f"{t}.a{16 if aligned else 1}.d{bd}", params, ce, 4,
                              ("cdiv(T,16)", "H", "B"), dtype, {"D": [lo, bd]}, div))
            lo = bd + 1
    return specs


def _gather_specs(dtype: str) -> list[Spec]:
    t = DTYPES[dtype]
    params = (("x_ptr", f"*{t}"), ("idx_ptr", "*i64"), ("out_ptr", f"*{t}"), ("N", "i32"), ("keep", "i32"),
              ("C", "i32"))
    return [Spec("gather_rows", f"{t}.a{16 if a else 1}", params, {"BLOCK_C": 1024}, 4, ("keep", "B", "1"),
                 dtype, {}, ("x_ptr", "out_ptr", "C") if a else ()) for a in (True, False)]


def all_specs() -> list[Spec]:
    """Every specialisation compiled per target (the same list for every target)."""
    specs: list[Spec] = []
    for kernel in ("quantize_per_token", "gelu_quant", "norm_quant"):
        for dtype in DTYPES:
            specs += _row_specs(kernel, dtype)
    for dtype in DTYPES:
        specs += _token_importance_specs(dtype)
    specs.append(Spec("topk_rank", "fp32", (("scores_ptr", "*fp32"), ("kept_ptr", "*i8"), ("N", "i32"),
                                            ("keep", "i32")),
                      {"BLOCK_I": 32, "BLOCK_J": 128}, 4, ("cdiv(N,32)", "B", "1"), "float32"))
    specs.append(Spec("topk_compact", "i8", (("kept_ptr", "*i8"), ("idx_ptr", "*i64"), ("N", "i32"), ("keep", "i32")),
                      {"BLOCK": 1024}, 4, ("B", "1", "1"), None))
    for dtype in DTYPES:
        specs += _gather_specs(dtype)
    return specs


SPECS = all_specs()


# ------------------------------------------------------------------------------------------------ triton glue
def triton_version() -> tuple[int, int, int]:
    """The installed Triton version; raises with the supported range when Triton is missing or unsupported."""
    try:
        import triton
    except ImportError as e:
        raise RuntimeError("Triton is needed to compile the vlmx kernels ahead of time but is not installed; "
                           f"install a supported version: pip install 'triton>={SUPPORTED_TRITON[0][0]}."
                           f"{SUPPORTED_TRITON[0][1]},<{SUPPORTED_TRITON[1][0]}.{SUPPORTED_TRITON[1][1]}'") from e
    v = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:3])
    if not SUPPORTED_TRITON[0] <= v[:2] < SUPPORTED_TRITON[1]:
        raise RuntimeError(f"Triton {triton.__version__} is not supported by the vlmx AOT compiler; expected "
                           f">={'.'.join(map(str, SUPPORTED_TRITON[0]))},<{'.'.join(map(str, SUPPORTED_TRITON[1]))} "
                           "(kernel ABI and ASTSource API checked for these); install e.g. triton==3.6.0")
    return v


def resolve_target(target) -> tuple[str, int]:
    """(name, sm) from a target name (``trt-sm75``), a :class:`Target`, or a bare sm number (``90``)."""
    if isinstance(target, Target):
        return target.name, target.sm
    if isinstance(target, int):
        return f"sm{target}", target
    t = get_target(str(target))
    return t.name, t.sm


def ptx_entry_params(ptx: str) -> list[str]:
    """PTX parameter types (``u64``, ``u32``, ``f32``…) of the single ``.entry`` in a module, in order."""
    m = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError("no .entry found in the PTX module")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def _compile_one(spec: Spec, sm: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels

    fn = triton_kernels.KERNELS[spec.kernel]
    arg_names = list(fn.arg_names)
    ptx_names = [n for n in arg_names if n not in spec.constexprs]
    if ptx_names != [n for n, _ in spec.params] or set(spec.constexprs) - set(arg_names):
        raise RuntimeError(f"{spec.kernel}.{spec.name}: spec params {[n for n, _ in spec.params]} + constexprs "
                           f"{list(spec.constexprs)} do not match the kernel arguments {arg_names}")
    types = dict(spec.params)
    sig = {n: types.get(n, "constexpr") for n in arg_names}
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16}
    src = ASTSource(fn, sig, constexprs=dict(spec.constexprs), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", sm, 32), options={"num_warps": spec.num_warps})
    md = k.metadata._asdict()
    trailing = [n for n in ("global_scratch", "profile_scratch") if f"{n}_size" in md]
    ptx_types = ptx_entry_params(k.asm["ptx"])
    if len(ptx_types) != len(ptx_names) + len(trailing):
        raise RuntimeError(f"{spec.kernel}.{spec.name}: PTX has {len(ptx_types)} params, manifest would pass "
                           f"{len(ptx_names)} + {len(trailing)} trailing; this Triton's kernel ABI is not supported")
    return {"ptx": k.asm["ptx"], "cubin": k.asm["cubin"], "symbol": md["name"], "shared": md["shared"],
            "trailing": trailing, "scratch": {n: md.get(f"{n}_size", 0) for n in trailing}, "ptx_types": ptx_types}


def _build_key(spec: Spec, sm: int, triton_ver: str) -> str:
    from . import triton_kernels

    fn = triton_kernels.KERNELS[spec.kernel]
    h = hashlib.sha256(f"{triton_ver}|{sm}|{spec!r}|{fn.cache_key}".encode())
    return h.hexdigest()[:24]


def _entry(spec: Spec, res: dict, key: str) -> dict:
    stem = f"{spec.kernel}.{spec.name}"
    return {
        "kernel": spec.kernel, "spec": spec.name, "symbol": res["symbol"], "cubin": stem + ".cubin",
        "ptx": stem + ".ptx", "params": [{"name": n, "type": t} for n, t in spec.params],
        "trailing_params": [{"name": n, "type": "*i8", "size": res["scratch"][n]} for n in res["trailing"]],
        "ptx_param_types": res["ptx_types"], "constexprs": dict(spec.constexprs), "num_warps": spec.num_warps,
        "threads_per_block": 32 * spec.num_warps, "shared_bytes": res["shared"], "grid": list(spec.grid),
        "match": {"dtype": spec.dtype, "ranges": spec.ranges}, "divisible_by_16": list(spec.divisible_by_16),
        "build_key": key,
    }


def compile_all(target, out_dir, kernels: list[str] | None = None, force: bool = False,
                jobs: int | None = None) -> dict:
    """Compile every specialisation (or those of ``kernels``) for ``target`` into ``out_dir``; return the manifest.

    Entries whose build key (Triton version, target, spec, kernel source) matches the existing manifest and whose
    files exist are reused, so a rebuild after no change costs only the check. ``jobs`` compile processes
    (default: one per CPU core).
    """
    import triton

    triton_version()
    name, sm = resolve_target(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    mpath = out / "manifest.json"
    if mpath.exists() and not force:
        try:
            old = {(e["kernel"], e["spec"]): e for e in json.loads(mpath.read_text())["kernels"]}
        except (ValueError, KeyError):
            old = {}
    unknown = set(kernels or ()) - {s.kernel for s in SPECS}
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; choose from {sorted({s.kernel for s in SPECS})}")
    t0 = time.perf_counter()
    slots: list = []
    todo: list[tuple[int, Spec, str]] = []
    for spec in SPECS:
        if kernels and spec.kernel not in kernels:
            continue
        key = _build_key(spec, sm, triton.__version__)
        prev = old.get((spec.kernel, spec.name))
        if prev and prev.get("build_key") == key and (out / prev["cubin"]).exists() and (out / prev["ptx"]).exists():
            slots.append(prev)
        else:
            todo.append((len(slots), spec, key))
            slots.append(None)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, [s for _, s, _ in todo], [sm] * len(todo), chunksize=4))
    else:
        results = [_compile_one(s, sm) for _, s, _ in todo]
    for (i, spec, key), res in zip(todo, results):
        e = _entry(spec, res, key)
        (out / e["cubin"]).write_bytes(res["cubin"])
        (out / e["ptx"]).write_text(res["ptx"])
        slots[i] = e
    entries = slots
    trailing = sorted({p["name"] for e in entries for p in e["trailing_params"]})
    manifest = {
        "format": MANIFEST_FORMAT, "target": name, "sm": sm, "triton_version": triton.__version__,
        "trailing_params": [n for n in ("global_scratch", "profile_scratch") if n in trailing],
        "grid_syntax": "each of 3 entries: integer | value name | cdiv(name,integer)",
        "param_types": {"*fp16": "u64 device pointer", "*fp32": "u64 device pointer", "*i8": "u64 device pointer",
                        "*i64": "u64 device pointer", "i32": "int32", "fp32": "float32"},
        "compile_seconds": round(time.perf_counter() - t0, 2), "kernels": entries,
    }
    mpath.write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmx.plugins.triton_aot", description=__doc__.split("\n")[0])
    ap.add_argument("--target", action="append", help=f"target name ({', '.join(TARGETS)}) or 'all'; repeatable")
    ap.add_argument("--out", required=True, help="output dir (one target) or parent dir (several: <out>/sm<NN>)")
    ap.add_argument("--kernel", action="append", help="compile only this kernel (repeatable)")
    ap.add_argument("--force", action="store_true", help="recompile even when the manifest is up to date")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU cores)")
    a = ap.parse_args(argv)
    targets = list(TARGETS) if not a.target or "all" in a.target else a.target
    for t in targets:
        name, sm = resolve_target(t)
        out = Path(a.out) if len(targets) == 1 else Path(a.out) / f"sm{sm}"
        m = compile_all(name, out, a.kernel, a.force, a.jobs)
        print(f"{name}: {len(m['kernels'])} kernels -> {out} ({m['compile_seconds']} s, Triton "
              f"{m['triton_version']}, trailing params {m['trailing_params']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

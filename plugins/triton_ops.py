"""CUDA implementations of ``vlmx::quantize_per_token``, ``gelu_quant``, ``norm_quant``, ``token_importance`` and
``gather_topk`` that launch the precompiled Triton cubins through :mod:`vlmx.plugins.cubin_loader`.

Nothing is registered at import. :func:`register` adds ``CUDA`` kernels for those ops (they beat the composite
reference in the dispatcher). Kernels come from a prebuilt directory: ``kernel_dir``, else ``$VLMX_TRITON_DIR``,
else ``<repo>/build/triton/sm<NN>`` for the device's sm. Only when none of these holds a manifest and Triton is
installed are the kernels compiled on first use (same AOT path) into ``~/.cache/vlmx/triton/sm<NN>``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .cubin_loader import KernelLibrary, LoaderError

TRITON_OPS = ("quantize_per_token", "gelu_quant", "norm_quant", "token_importance", "gather_topk")
_DTYPES = {torch.float16: "float16", torch.float32: "float32"}
_STATE: dict = {"lib": None, "kernel_dir": None, "prefer": None, "libraries": {}}


def default_kernel_dir(sm: int) -> Path:
    """Where prebuilt kernels for ``sm`` are looked up when no directory is given."""
    env = os.environ.get("VLMX_TRITON_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "build" / "triton" / f"sm{sm}"


def _library(device: torch.device) -> KernelLibrary:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _STATE["libraries"]:
        return _STATE["libraries"][index]
    major, minor = torch.cuda.get_device_capability(index)
    sm = 10 * major + minor
    directory = Path(_STATE["kernel_dir"]) if _STATE["kernel_dir"] else default_kernel_dir(sm)
    if not (directory / "manifest.json").exists():
        if _STATE["kernel_dir"] or os.environ.get("VLMX_TRITON_DIR"):
            raise LoaderError(f"no manifest.json in {directory}; build it with "
                              f"`python -m vlmx.plugins.triton_aot --target trt-sm{sm} --out {directory}`")
        directory = Path.home() / ".cache" / "vlmx" / "triton" / f"sm{sm}"
        try:
            from .triton_aot import compile_all
        except ImportError as e:
            raise LoaderError(f"no prebuilt Triton kernels for sm_{sm} and Triton is not installed to build them; "
                              f"run `python -m vlmx.plugins.triton_aot --target trt-sm{sm} --out "
                              f"{default_kernel_dir(sm)}` where Triton is installed") from e
        warnings.warn(f"vlmx: no prebuilt Triton kernels for sm_{sm}; compiling them into {directory} once")
        compile_all(sm, directory)
    lib = KernelLibrary(directory, sm, _STATE["prefer"], device=index)
    _STATE["libraries"][index] = lib
    return lib


def _launch(kernel: str, ref: torch.Tensor, dtype: str | None, values: dict) -> None:
    with torch.cuda.device(ref.device):
        stream = torch.cuda.current_stream(ref.device).cuda_stream
        _library(ref.device)(kernel, dtype, values, stream)


def _dtype(name: str, t: torch.Tensor) -> str:
    if t.dtype not in _DTYPES:
        raise TypeError(f"vlmx Triton {name}: input dtype {t.dtype} is not supported; expected float16 or float32")
    return _DTYPES[t.dtype]


def _row_outputs(x: torch.Tensor):
    c = x.shape[-1]
    rows = x.numel() // c if c else 0
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return c, rows, q, scale


def quantize_per_token(x: torch.Tensor, *, clip_range: float = 0.0):
    """vlmx::quantize_per_token on CUDA (Triton cubin)."""
    dt, x = _dtype("quantize_per_token", x), x.contiguous()
    c, rows, q, scale = _row_outputs(x)
    if rows:
        _launch("quantize_per_token", x, dt, {"x_ptr": x, "q_ptr": q, "scale_ptr": scale, "C": c,
                                               "clip_range": clip_range, "rows": rows})
    return q, scale


def gelu_quant(x: torch.Tensor, *, approximate: str = "tanh", clip_range: float = 0.0):
    """vlmx::gelu_quant on CUDA (Triton cubin)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"gelu_quant: approximate={approximate!r}; expected 'tanh' or 'none'")
    dt, x = _dtype("gelu_quant", x), x.contiguous()
    c, rows, q, scale = _row_outputs(x)
    if rows:
        _launch("gelu_quant", x, dt, {"x_ptr": x, "q_ptr": q, "scale_ptr": scale, "C": c, "clip_range": clip_range,
                                       "approx_tanh": int(approximate == "tanh"), "rows": rows})
    return q, scale


def norm_quant(x, weight, bias=None, *, mode="layernorm", eps=1e-6, per_token=1, static_scale=1.0, clip_range=0.0):
    """vlmx::norm_quant on CUDA (Triton cubin): (q, scale, sum)."""
    dt, x = _dtype("norm_quant", x), x.contiguous()
    if mode not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm mode {mode!r} is not one of 'layernorm', 'rmsnorm'")
    if not per_token and not static_scale > 0:
        raise ValueError(f"norm_quant: static_scale must be > 0 for per-tensor quantization, got {static_scale}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.numel() != x.shape[-1]):
            raise TypeError(f"norm_quant: {name} must be a [{x.shape[-1]}] tensor of x's dtype {x.dtype}; got "
                            f"{list(t.shape)} {t.dtype}")
    weight = weight.contiguous()
    b = bias.contiguous() if bias is not None else weight
    c, rows, q, scale = _row_outputs(x)
    total = torch.empty_like(scale)
    if rows:
        _launch("norm_quant", x, dt, {
            "x_ptr": x, "w_ptr": weight, "b_ptr": b, "q_ptr": q, "scale_ptr": scale, "sum_ptr": total, "C": c,
            "eps": eps, "clip_range": clip_range, "static_scale": static_scale, "is_rms": int(mode == "rmsnorm"),
            "per_token": int(bool(per_token)), "has_bias": int(bias is not None), "rows": rows})
    return q, scale, total


def token_importance(q_text, k_vis, *, num_heads, head_dim, num_kv_heads=0, scale=0.0):
    """vlmx::token_importance on CUDA (Triton cubin): [B, N] float32."""
    dt = _dtype("token_importance", q_text)
    hkv = num_kv_heads or num_heads
    b, t, hq = q_text.shape
    n = k_vis.shape[1]
    if hq != num_heads * head_dim or k_vis.shape[2] != hkv * head_dim or num_heads % hkv or k_vis.dtype != q_text.dtype:
        raise ValueError(f"token_importance: q_text {list(q_text.shape)} {q_text.dtype} / k_vis {list(k_vis.shape)} "
                         f"{k_vis.dtype} do not fit num_heads={num_heads}, num_kv_heads={hkv}, head_dim={head_dim} "
                         "(expected [B, T, H*D] and [B, N, Hkv*D] of one dtype, Hkv dividing H)")
    out = torch.zeros((b, n), dtype=torch.float32, device=q_text.device)
    if t == 0:
        return out.fill_(float("nan"))  # mean over no text token, as the reference
    if b and n:
        q, k = q_text.contiguous(), k_vis.contiguous()
        _launch("token_importance", q, dt, {
            "q_ptr": q, "k_ptr": k, "out_ptr": out, "T": t, "N": n, "D": head_dim, "group": num_heads // hkv,
            "q_stride_b": t * hq, "q_stride_t": hq, "k_stride_b": n * hkv * head_dim, "k_stride_n": hkv * head_dim,
            "scale": scale or head_dim ** -0.5, "inv_count": 1.0 / (num_heads * t), "H": num_heads, "B": b})
    return out


def gather_topk(x, scores, keep):
    """vlmx::gather_topk on CUDA (Triton cubins): (x_kept [B, keep, C], idx [B, keep] int64)."""
    dt = _dtype("gather_topk", x)
    k = int(keep.reshape(-1)[0]) if isinstance(keep, torch.Tensor) else int(keep)
    b, n, c = x.shape
    if not 1 <= k <= n or tuple(scores.shape) != (b, n):
        raise ValueError(f"gather_topk: keep={k} must be in [1, {n}] and scores {list(scores.shape)} must be "
                         f"[{b}, {n}]")
    x, s = x.contiguous(), scores.float().contiguous()
    idx = torch.empty((b, k), dtype=torch.int64, device=x.device)
    out = torch.empty((b, k, c), dtype=x.dtype, device=x.device)
    if b:
        kept = torch.empty((b, n), dtype=torch.int8, device=x.device)
        _launch("topk_rank", x, "float32", {"scores_ptr": s, "kept_ptr": kept, "N": n, "keep": k, "B": b})
        _launch("topk_compact", x, None, {"kept_ptr": kept, "idx_ptr": idx, "N": n, "keep": k, "B": b})
        if c:
            _launch("gather_rows", x, dt, {"x_ptr": x, "idx_ptr": idx, "out_ptr": out, "N": n, "keep": k, "C": c,
                                           "B": b})
    return out, idx


def register(kernel_dir=None, prefer: str | None = None) -> torch.library.Library:
    """Register the CUDA implementations (once). ``kernel_dir``: a manifest directory for every device;
    ``prefer``: 'cubin' or 'ptx' (e.g. the sm_75 PTX on a newer GPU through the driver JIT)."""
    import vlmx.torch_ref.ops  # noqa: F401  (defines the vlmx::* ops)

    _STATE.update(kernel_dir=kernel_dir, prefer=prefer, libraries={})
    if _STATE["lib"] is None:
        lib = torch.library.Library("vlmx", "IMPL")
        for name in TRITON_OPS:
            lib.impl(name, globals()[name], "CUDA")
        _STATE["lib"] = lib
    return _STATE["lib"]

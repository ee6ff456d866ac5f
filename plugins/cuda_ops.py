"""torch bindings of the vlmx CUDA kernels through their C ABI (``plugins/csrc/vlmx_kernels.h``).

``register()`` loads the kernel library with ctypes and registers ``CUDA`` implementations of
``vlmx::flash_attention`` and ``vlmx::w8a8_linear``, so the torch_ref modules run on the GPU with these kernels
(the CompositeExplicitAutograd reference stays the CPU path). Nothing happens at import time.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from vlmx.torch_ref import reference

OK, INVALID_ARGUMENT, UNSUPPORTED, MISALIGNED, CUDA_ERROR = range(5)
SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
_i64 = ctypes.c_int64


class AttentionParams(ctypes.Structure):
    """Mirror of ``vlmx_attention_params`` (field order and types must match the header)."""

    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)] + \
        [(n, ctypes.c_int) for n in ("batch", "seqlen_q", "seqlen_k", "num_heads", "num_kv_heads", "head_dim")] + \
        [(f"{t}_stride_{d}", _i64) for t in ("q", "k", "v", "o") for d in ("b", "s", "h")] + \
        [("bias_stride_b", _i64), ("bias_stride_h", _i64), ("bias_stride_q", _i64), ("scale", ctypes.c_float),
         ("causal", ctypes.c_int), ("window", ctypes.c_int), ("alibi", ctypes.c_int), ("alibi_bias_max", ctypes.c_int),
         ("workspace", ctypes.c_void_p), ("workspace_bytes", _i64)]


class KernelLibrary:
    """A loaded ``libvlmx_kernels_*.so`` with typed entry points; every call raises on a non-OK status."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        vp, i32, st = ctypes.c_void_p, ctypes.c_int, ctypes.c_int
        self.lib.vlmx_last_error.restype = ctypes.c_char_p
        self.lib.vlmx_flash_attention_fwd.argtypes = [ctypes.POINTER(AttentionParams), vp]
        self.lib.vlmx_flash_attention_fwd.restype = st
        self.lib.vlmx_flash_attention_workspace_size.argtypes = [ctypes.POINTER(AttentionParams)]
        self.lib.vlmx_flash_attention_workspace_size.restype = _i64
        self.lib.vlmx_int8_gemm_i32.argtypes = [vp, vp, vp, i32, i32, i32, vp]
        self.lib.vlmx_int8_gemm_i32.restype = st
        self.lib.vlmx_w8a8_linear.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, i32, i32, i32, vp]
        self.lib.vlmx_w8a8_linear.restype = st
        self.lib.vlmx_bench_mma_ceiling.argtypes = [i32, i32, i32, i32, vp, ctypes.POINTER(ctypes.c_double), vp]
        self.lib.vlmx_bench_mma_ceiling.restype = st

    def last_error(self) -> str:
        return (self.lib.vlmx_last_error() or b"").decode()

    def check(self, status: int) -> None:
        if status != OK:
            raise RuntimeError(f"vlmx kernel error {status}: {self.last_error()}")

    def flash_attention_raw(self, params: AttentionParams, stream: int | None = 0) -> int:
        """Call the launcher as is and return the status (no raise): the C ABI test entry point."""
        return self.lib.vlmx_flash_attention_fwd(ctypes.byref(params), stream)

    def flash_attention_workspace_size(self, params: AttentionParams) -> int:
        """Bytes of split-KV workspace for these sizes (0: never splits)."""
        return int(self.lib.vlmx_flash_attention_workspace_size(ctypes.byref(params)))

    def int8_gemm_raw(self, x: int, w: int, y: int, m: int, n: int, k: int, stream: int | None = 0) -> int:
        return self.lib.vlmx_int8_gemm_i32(x, w, y, m, n, k, stream)

    def w8a8_raw(self, x, xs, w, ws, bias, y, yq, yqs, m, n, k, stream=0) -> int:
        return self.lib.vlmx_w8a8_linear(x, xs, w, ws, bias, y, yq, yqs, m, n, k, stream)

    def mma_ceiling(self, kind: int, blocks: int, threads: int, iters: int, sink: torch.Tensor) -> float:
        """Launch the tensor-core ceiling kernel on the current stream; returns the ops it performs."""
        ops = ctypes.c_double()
        self.check(self.lib.vlmx_bench_mma_ceiling(kind, blocks, threads, iters, sink.data_ptr(), ctypes.byref(ops),
                                                   _stream()))
        return ops.value


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def default_library_path() -> Path:
    """``$VLMX_KERNELS_LIB``, else a build for the current GPU's target (trt-sm75 when its sm has no target)."""
    env = os.environ.get("VLMX_KERNELS_LIB")
    if env:
        return Path(env)
    from vlmx.plugins.build import build
    from vlmx.torch_ref.targets import TARGETS

    target = "trt-sm75"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        target = next((t.name for t in TARGETS.values() if t.sm == major * 10 + minor), target)
    return build(target, verbose=False)


# ------------------------------------------------------------------------------------------------ attention
def _heads_view(t: torch.Tensor, heads: int, head_dim: int, layout: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor, (stride_b, stride_s, stride_h)) of a [B,S,H*D] / [B,H,S,D] tensor, innermost stride 1."""
    if layout == "bhsd":
        if t.stride(3) != 1:
            t = t.contiguous()
        return t, (t.stride(0), t.stride(2), t.stride(1))
    if t.stride(2) != 1:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), head_dim)


def attention_params(q, k, v, o, bias, num_heads, num_kv_heads, head_dim, scale, causal, window, alibi,
                     alibi_bias_max, layout) -> tuple[AttentionParams, list[torch.Tensor]]:
    """Fill the C struct from tensors; returns it with the tensors that must stay alive during the call."""
    hkv = num_kv_heads or num_heads
    keep = []
    if layout == "packed":
        if q.stride(2) != 1:
            q = q.contiguous()
        sb, ss = q.stride(0), q.stride(1)
        qs = ks = vs = (sb, ss, head_dim)
        kt = q[..., num_heads * head_dim:]
        vt = q[..., (num_heads + hkv) * head_dim:]
        qt, seqlen_k = q, q.shape[1]
    else:
        qt, qs = _heads_view(q, num_heads, head_dim, layout)
        kt, ks = _heads_view(k, hkv, head_dim, layout)
        vt, vs = _heads_view(v, hkv, head_dim, layout)
        seqlen_k = kt.shape[2] if layout == "bhsd" else kt.shape[1]
    seqlen_q = qt.shape[2] if layout == "bhsd" else qt.shape[1]
    os_ = (o.stride(0), o.stride(2), o.stride(1)) if layout == "bhsd" else (o.stride(0), o.stride(1), head_dim)
    p = AttentionParams(q=qt.data_ptr(), k=kt.data_ptr(), v=vt.data_ptr(), o=o.data_ptr(), bias=None,
                        batch=qt.shape[0], seqlen_q=seqlen_q, seqlen_k=seqlen_k, num_heads=num_heads,
                        num_kv_heads=hkv, head_dim=head_dim, scale=float(scale), causal=int(causal),
                        window=int(window), alibi=int(alibi), alibi_bias_max=int(alibi_bias_max))
    for name, strides in (("q", qs), ("k", ks), ("v", vs), ("o", os_)):
        for d, s in zip("bsh", strides):
            setattr(p, f"{name}_stride_{d}", int(s))
    if bias is not None:
        b4 = bias.to(torch.float16)
        while b4.dim() < 4:
            b4 = b4.unsqueeze(0)
        b4 = b4.expand(qt.shape[0], num_heads, seqlen_q, seqlen_k)
        if b4.stride(3) != 1:
            b4 = b4.contiguous()
        p.bias = b4.data_ptr()
        p.bias_stride_b, p.bias_stride_h, p.bias_stride_q = b4.stride(0), b4.stride(1), b4.stride(2)
        keep.append(b4)
    keep += [qt, kt, vt, o]
    return p, keep


def flash_attention(lib: KernelLibrary, q, k=None, v=None, bias=None, kv_len=None, num_heads=1, num_kv_heads=0,
                    head_dim=64, scale=0.0, causal=0, window=-1, alibi=0, alibi_bias_max=8, layout="bsd"):
    """vlmx::flash_attention on the GPU; falls back to the reference for dtypes/head dims the kernel lacks, and for
    ``kv_len`` (the kernel has no valid-length parameter yet: the reference masks the cache on the device, no sync)."""
    if q.dtype != torch.float16 or head_dim not in SUPPORTED_HEAD_DIMS or kv_len is not None:
        return reference.flash_attention(q, k, v, bias, kv_len, num_heads, num_kv_heads, head_dim, scale, causal,
                                         window, alibi, alibi_bias_max, layout)
    if layout == "bhsd":
        o = q.new_empty(q.shape[0], num_heads, q.shape[2], head_dim)
    else:
        o = q.new_empty(q.shape[0], q.shape[1], num_heads * head_dim)
    if layout != "packed":  # 16-byte loads: misaligned views are copied rather than rejected
        q, k, v = (t if t.data_ptr() % 16 == 0 else t.contiguous() for t in (q, k, v))
    p, keep = attention_params(q, k, v, o, bias, num_heads, num_kv_heads, head_dim, scale, causal, window, alibi,
                               alibi_bias_max, layout)
    ws_bytes = lib.flash_attention_workspace_size(p)
    if ws_bytes:  # split-KV partials: the caching allocator's block, never an allocation inside the launch
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=o.device)
        p.workspace, p.workspace_bytes = ws.data_ptr(), ws_bytes
        keep.append(ws)
    lib.check(lib.flash_attention_raw(p, _stream()))
    del keep
    return o


# ------------------------------------------------------------------------------------------------ int8 GEMM
def int8_gemm(lib: KernelLibrary, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``x[M,K] @ w[N,K]^T``."""
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.int32, device=x.device)
    lib.check(lib.int8_gemm_raw(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], x.shape[1],
                                _stream()))
    return y


def w8a8_linear_fused(lib: KernelLibrary, x, x_scale, w, w_scale, bias=None, quantize_output=False):
    """W8A8 linear on [..., K] -> fp16 [..., N]; with ``quantize_output`` also (y_q int8, y_q_scale [..., 1])."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, kdim = x2.shape
    n = w.shape[0]
    xs = x_scale.reshape(-1).float().contiguous()
    ws = w_scale.reshape(-1).float().contiguous()
    w = w.contiguous()
    b = bias.to(torch.float16).contiguous() if bias is not None else None
    y = torch.empty(m, n, dtype=torch.float16, device=x.device)
    yq = torch.empty(m, n, dtype=torch.int8, device=x.device) if quantize_output else None
    yqs = torch.empty(m, dtype=torch.float32, device=x.device) if quantize_output else None
    lib.check(lib.w8a8_raw(x2.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), b.data_ptr() if b is not None
                           else None, y.data_ptr(), yq.data_ptr() if yq is not None else None,
                           yqs.data_ptr() if yqs is not None else None, m, n, kdim, _stream()))
    y = y.reshape(*lead, n)
    if quantize_output:
        return y, yq.reshape(*lead, n), yqs.reshape(*lead, 1)
    return y


def w8a8_linear(lib: KernelLibrary, x, x_scale, w, w_scale, bias=None, out_dtype="float16"):
    """vlmx::w8a8_linear on the GPU (fp16 output); other output dtypes use the reference."""
    dtype = bias.dtype if bias is not None else getattr(torch, out_dtype)
    if dtype != torch.float16 or x.shape[-1] % 16 or x.shape[-1] == 0:
        return reference.w8a8_linear(x, x_scale, w, w_scale, bias, out_dtype)
    return w8a8_linear_fused(lib, x, x_scale, w, w_scale, bias)


# ------------------------------------------------------------------------------------------------ registration
_REGISTERED: dict[str, object] = {}


def register(lib_path: str | Path | None = None) -> KernelLibrary:
    """Load the kernel library and register CUDA kernels for vlmx::flash_attention and vlmx::w8a8_linear.

    Idempotent: a second call returns the library registered first.
    """
    if "lib" in _REGISTERED:
        return _REGISTERED["lib"]
    import vlmx.torch_ref.ops  # noqa: F401  (defines the vlmx ops)

    lib = KernelLibrary(lib_path or default_library_path())
    impl = torch.library.Library("vlmx", "IMPL")
    impl.impl("flash_attention", lambda *a, **kw: flash_attention(lib, *a, **kw), "CUDA")
    impl.impl("w8a8_linear", lambda *a, **kw: w8a8_linear(lib, *a, **kw), "CUDA")
    _REGISTERED.update(lib=lib, impl=impl)
    return lib

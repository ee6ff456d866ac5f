"""Run transformers / torch_ref models on the GPU with the vlmx kernels (the ``torch`` backend's engine room).

- :func:`enable_vlmx_kernels` builds (or reuses) the CUDA kernel library and registers the CUDA implementations
  of the ``vlmx::*`` ops (flash attention, W8A8 GEMM; Triton cubins for the fused quantization ops when present).
- :func:`register_hf_attention` adds the exporter's vlmx ``attn_implementation`` to transformers, so Llama-style
  language models call our flash attention kernel without swapping modules.
"""
from __future__ import annotations

import torch

from vlmx.torch_ref import ops  # noqa: F401  (defines torch.ops.vlmx.*)

_STATE: dict = {}


def enable_vlmx_kernels(target: str | None = None, ptx_only: bool = False, triton: bool = True,
                        triton_dir: str | None = None) -> dict:
    """Register the vlmx CUDA kernels for the current GPU (``ptx_only``: Turing PTX through the driver JIT).

    ``triton_dir``: a Triton AOT manifest directory (``python -m vlmx.plugins.triton_aot``); with ``ptx_only`` its
    PTX is loaded, so the fused quantization / pruning kernels also run the sm_75 instruction set.

    Returns what was registered: ``{"cuda": lib_path, "triton": bool}``. Raises RuntimeError without a GPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the torch backend needs a CUDA GPU (torch.cuda.is_available() is False); use "
                           "--backend onnxruntime on a CPU-only machine")
    if "cuda" in _STATE:
        return dict(_STATE)
    from vlmx.plugins import build, cuda_ops

    lib_path = None
    if target or ptx_only:
        lib_path = build.build(target or "trt-sm75", ptx_only=ptx_only, verbose=False)
    lib = cuda_ops.register(lib_path)
    _STATE["cuda"] = str(lib.path)
    _STATE["triton"] = False
    if triton:
        try:
            from vlmx.plugins import triton_ops

            triton_ops.register(kernel_dir=triton_dir, prefer="ptx" if ptx_only else None)
            _STATE["triton"] = True
        except Exception as e:  # noqa: BLE001 - Triton is optional; the reference kernels still run on CUDA
            _STATE["triton_error"] = f"{type(e).__name__}: {e}"
    return dict(_STATE)


def register_hf_attention() -> str:
    """Register the vlmx flash-attention ``attn_implementation`` with transformers; returns its name."""
    from vlmx.export.hf_attention import register

    return register()

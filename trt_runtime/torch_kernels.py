"""Run transformers / torch_ref models on the GPU with the vlmx kernels (the ``torch`` backend's engine room).

- :func:`enable_vlmx_kernels` builds (or reuses) the CUDA kernel library and registers the CUDA implementations
  of the ``vlmx::*`` ops (flash attention, W8A8 GEMM; Triton cubins for the fused quantization ops when present).
- :func:`register_hf_attention` adds an ``attn_implementation="vlmx"`` to transformers, so Llama/Mistral-style
  language models call our flash attention kernel without swapping modules.
"""
from __future__ import annotations

import torch

from vlmx.torch_ref import ops  # noqa: F401  (defines torch.ops.vlmx.*)

HF_ATTENTION_NAME = "vlmx"
_STATE: dict = {}


def enable_vlmx_kernels(target: str | None = None, ptx_only: bool = False, triton: bool = True) -> dict:
    """Register the vlmx CUDA kernels for the current GPU (``ptx_only``: Turing PTX through the driver JIT).

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

            triton_ops.register()
            _STATE["triton"] = True
        except Exception as e:  # noqa: BLE001 - Triton is optional; the reference kernels still run on CUDA
            _STATE["triton_error"] = f"{type(e).__name__}: {e}"
    return dict(_STATE)


def _vlmx_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """transformers attention function: [B,H,S,D] q/k/v (GQA kept) → ([B,S,H,D] output, None)."""
    b, h, sq, d = query.shape
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    bias = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        bias = (torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool else mask.to(query.dtype))
        causal = False  # the mask already encodes causality
    o = torch.ops.vlmx.flash_attention(query, key, value, bias, num_heads=h, num_kv_heads=key.shape[1], head_dim=d,
                                       scale=float(scaling or d ** -0.5), causal=int(causal and sq > 1),
                                       layout="bhsd")
    return o.transpose(1, 2).contiguous(), None


def register_hf_attention() -> str:
    """Register ``attn_implementation="vlmx"`` (attention + SDPA-style masks) with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_ATTENTION_NAME, _vlmx_attention_forward)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, sdpa_mask)
    return HF_ATTENTION_NAME

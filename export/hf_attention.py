"""How attention is expressed in an exported graph (``--attention``), for transformers models.

``plugin``: a transformers attention function that calls ``vlmx::flash_attention`` (one vlmx FlashAttention node
per layer, ``layout=bhsd``, the padding/causal mask as an additive bias). ``native``: transformers' SDPA path, which
the exporter lowers to the standard ONNX ``Attention`` op at opset ≥ 23. ``decomposed``: transformers' eager path
(MatMul / Softmax / MatMul).
"""
from __future__ import annotations

import torch

from vlmx.torch_ref import ops  # noqa: F401  (defines torch.ops.vlmx.*)
from vlmx.torch_ref.contract import ATTENTION_MODES  # noqa: F401  (re-exported)

from .options import NATIVE_ATTENTION_OPSET  # noqa: F401  (re-exported)
HF_NAME = "vlmx_export"
_HF_IMPL = {"plugin": HF_NAME, "native": "sdpa", "decomposed": "eager"}


def additive_bias(mask: torch.Tensor, dtype: torch.dtype, key_len: int) -> torch.Tensor:
    """A transformers attention mask (bool: True = attend, or already additive) as an additive bias."""
    mask = mask[:, :, :, :key_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def vlmx_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers attention function: q ``[B,H,Sq,D]``, k/v ``[B,Hkv,Sk,D]`` → (``[B,Sq,H,D]``, None)."""
    _, h, sq, d = query.shape
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    bias = None
    if attention_mask is not None:
        bias = additive_bias(attention_mask, query.dtype, key.shape[-2])
        causal = False  # the mask already encodes causality and padding
    o = torch.ops.vlmx.flash_attention(query, key, value, bias, num_heads=h, num_kv_heads=key.shape[1], head_dim=d,
                                       scale=float(scaling or d ** -0.5), causal=int(causal and sq > 1),
                                       layout="bhsd")
    return o.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the ``plugin`` attention (with SDPA-style boolean masks) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_NAME, vlmx_attention_forward)
    AttentionMaskInterface.register(HF_NAME, sdpa_mask)
    return HF_NAME


def hf_implementation(mode: str) -> str:
    """The transformers ``attn_implementation`` for an ``--attention`` mode."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"--attention {mode} is not known; choose one of {', '.join(ATTENTION_MODES)}")
    if mode == "plugin":
        register()
    return _HF_IMPL[mode]


def set_attention(module: torch.nn.Module, mode: str) -> None:
    """Switch a transformers model (or sub-model) to the attention path of ``mode``."""
    impl = hf_implementation(mode)
    module.set_attn_implementation(impl)

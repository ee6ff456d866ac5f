"""One attention entry point for every reference module, so exporters can pick how attention is expressed.

``impl``:
  - ``"eager"``: explicit matmul → softmax → matmul in the input dtype (what exporters decompose or fuse);
  - ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``;
  - ``"vlmx"``: the ``vlmx::flash_attention`` custom op (becomes a vlmx FlashAttention node / our CUDA kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401  (defines torch.ops.vlmx.*)
from .alibi import alibi_bias
from .reference import attention_mask

ATTN_IMPLS = ("eager", "sdpa", "vlmx")


def check_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not known; choose one of {list(ATTN_IMPLS)}")
    return impl


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
           bias: torch.Tensor | None = None, causal: bool = False, window: int = -1, alibi: bool = False,
           alibi_bias_max: int = 8, impl: str = "eager", need_weights: bool = False):
    """Attention over ``q [B,H,Sq,D]``, ``k, v [B,Hkv,Sk,D]`` (Hkv divides H). Returns ``(o [B,H,Sq,D], weights)``.

    ``bias`` is additive and broadcastable to ``[B,H,Sq,Sk]``; causal/window are bottom-right aligned (KV caches).
    ``weights`` ([B,H,Sq,Sk] softmax probabilities) only with ``need_weights`` (forces the eager path).
    """
    check_impl(impl)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{hkv} key/value heads must divide {h} query heads")
    scale = float(scale) if scale else d ** -0.5
    if impl == "vlmx" and not need_weights:
        o = torch.ops.vlmx.flash_attention(q, k, v, bias, num_heads=h, num_kv_heads=hkv, head_dim=d, scale=scale,
                                           causal=int(causal), window=window, alibi=int(alibi),
                                           alibi_bias_max=alibi_bias_max, layout="bhsd")
        return o, None
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    full_bias = bias
    if alibi:
        ab = alibi_bias(h, sk, alibi_bias_max, device=q.device).to(q.dtype)
        full_bias = ab if full_bias is None else full_bias + ab
    allowed = attention_mask(sq, sk, causal, window, device=q.device)
    if impl == "sdpa" and not need_weights:
        mask = full_bias
        if allowed is not None:
            neg = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
            mask = neg if mask is None else mask + neg
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if full_bias is not None:
        s = s + full_bias
    if allowed is not None:
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v), (p if need_weights else None)

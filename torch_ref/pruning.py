"""Visual-token importance and order-preserving top-k pruning (the vlmx TokenImportance / GatherTopK semantics).

- :func:`token_importance`: text-query → visual-key attention, softmax over the visual keys, averaged over text
  tokens and heads; each batch row sums to 1.
- :func:`cls_importance`: the [CLS] → patch attention of a vision tower, averaged over heads (FasterVLM style).
- :func:`keep_count` turns a keep ratio (float in (0, 1]) or a token budget (int) into a token count.
- :func:`prune_tokens` keeps the highest-scoring tokens in their original order (ties: lower index first).

``impl="torch"`` computes with plain torch ops (the reference kernels); ``impl="vlmx"`` calls the ``vlmx::*``
custom ops so the exporter emits vlmx nodes. Both have the same semantics.
"""
from __future__ import annotations

import torch

from . import ops  # noqa: F401  (defines torch.ops.vlmx.*)
from . import reference
from .keep_rule import keep_count  # noqa: F401  (the rule lives torch-free for the runtime)

IMPLS = ("torch", "vlmx")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"pruning impl {impl!r} is not known; choose one of {list(IMPLS)}")


def token_importance(q_text: torch.Tensor, k_vis: torch.Tensor, num_heads: int, head_dim: int,
                     num_kv_heads: int | None = None, impl: str = "torch", scale: float | None = None
                     ) -> torch.Tensor:
    """Importance ``[B, N]`` (float32) of ``N`` visual tokens for text queries ``q_text [B, T, H*D]`` and visual
    keys ``k_vis [B, N, Hkv*D]``: ``mean_{h,t} softmax_n(q·k / sqrt(D))``. Rows sum to 1."""
    _check_impl(impl)
    hkv = num_heads if num_kv_heads is None else int(num_kv_heads)
    if hkv < 1 or num_heads % hkv:
        raise ValueError(f"num_kv_heads={hkv} must be >= 1 and divide num_heads={num_heads}")
    if q_text.dim() != 3 or q_text.shape[-1] != num_heads * head_dim:
        raise ValueError(f"q_text must be [B, T, num_heads*head_dim] = [B, T, {num_heads * head_dim}], "
                         f"got {tuple(q_text.shape)}")
    if k_vis.dim() != 3 or k_vis.shape[-1] != hkv * head_dim or k_vis.shape[0] != q_text.shape[0]:
        raise ValueError(f"k_vis must be [B, N, num_kv_heads*head_dim] = [{q_text.shape[0]}, N, {hkv * head_dim}], "
                         f"got {tuple(k_vis.shape)}")
    attrs = dict(num_heads=num_heads, num_kv_heads=hkv, head_dim=head_dim, scale=float(scale or 0.0))
    if impl == "vlmx":
        return torch.ops.vlmx.token_importance(q_text, k_vis, **attrs)
    return reference.token_importance(q_text, k_vis, **attrs)


def cls_importance(attn_weights: torch.Tensor, cls_index: int = 0) -> torch.Tensor:
    """FasterVLM-style importance ``[B, N]`` of the patches from a vision layer's attention probabilities
    ``[B, H, S, S]`` (or just the [CLS] rows ``[B, H, S]``): the [CLS] row averaged over heads, [CLS] itself
    dropped, renormalized so each row sums to 1 (float32)."""
    if attn_weights.dim() == 4:
        attn_weights = attn_weights[:, :, cls_index, :]
    if attn_weights.dim() != 3:
        raise ValueError(f"attn_weights must be [B, H, S, S] or [B, H, S] (the [CLS] rows), "
                         f"got {tuple(attn_weights.shape)}")
    s = attn_weights.shape[-1]
    if not 0 <= cls_index < s:
        raise ValueError(f"cls_index={cls_index} is outside the {s} tokens")
    row = attn_weights.float().mean(dim=1)
    patches = torch.cat([row[:, :cls_index], row[:, cls_index + 1:]], dim=1)
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: float | int, impl: str = "torch"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the highest-scoring tokens of ``x [B, N, C]`` by ``scores [B, N]`` in their original order.

    ``keep`` is a ratio or a token budget (see :func:`keep_count`). Returns ``(x_kept [B, k, C], idx [B, k])`` with
    ``idx`` ascending (int64); ties go to the lower index.
    """
    _check_impl(impl)
    if x.dim() != 3 or scores.shape != x.shape[:2]:
        raise ValueError(f"x must be [B, N, C] and scores [B, N]; got x {tuple(x.shape)}, scores "
                         f"{tuple(scores.shape)}")
    k = keep_count(x.shape[1], keep)
    if impl == "vlmx":
        return torch.ops.vlmx.gather_topk(x, scores.float(), torch.tensor([k], dtype=torch.int64, device=x.device))
    return reference.gather_topk(x, scores.float(), k)

"""CLIP attention with one fused ``qkv_proj`` (tinychat's ``CLIPAttentionFused``) and the swap that installs it.

:func:`make_fused_vision_attn` replaces every transformers ``CLIPAttention`` of a model (CLIPVisionModel,
CLIPTextModel, CLIPModel, a LLaVA whose vision tower is CLIP, ...) by :class:`CLIPAttentionFused`: the q/k/v weights
and biases are concatenated (rows ``[q | k | v]``) into one ``nn.Linear(hidden, 3 * hidden)``, so the exporter sees one
MatMul per layer. Attention itself goes through :func:`vlmx.torch_ref.attention.attend` with ``impl=self.attn_impl``
(``"eager"`` by default; the exporter sets ``"vlmx"`` for a FlashAttention node or ``"sdpa"``); asking for the attention
weights forces the eager path.

transformers 5.x compatibility: the fused module subclasses transformers' ``CLIPAttention`` *only* so that
transformers' output recorder (which finds attention modules by class) still collects ``output_attentions``; it
does not run ``CLIPAttention.__init__`` and has no ``q_proj``/``k_proj``/``v_proj`` (so do not re-run transformers'
weight initialisation on a fused model). Its ``forward`` accepts both the transformers 5 call
(``hidden_states=..., attention_mask=..., is_causal=..., **kwargs``) and tinychat's
``(hidden_states, attention_mask, causal_attention_mask, output_attentions)``.
"""
from __future__ import annotations

import gc

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.clip import modeling_clip as hf_clip

from .attention import attend, check_impl

__all__ = ["CLIPAttentionFused", "CLIPEncoderLayer", "CLIPMLP", "additive_mask", "fuse_clip_attention",
           "make_fused_vision_attn"]

#: transformers' CLIP MLP (fc1 → activation → fc2) is used as is: it has no op worth fusing in the fp path.
CLIPMLP = hf_clip.CLIPMLP


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as an additive bias broadcastable to ``[B, H, Sq, Sk]``.

    Accepts an additive float mask (returned in ``dtype``), a boolean mask (True = attend; blocked entries get the
    dtype's most negative value, like transformers' eager masks) of rank 4, or a 2-D ``[B, Sk]`` padding mask
    (1 = token, 0 = padding).
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :].bool() if mask.dtype != torch.bool else mask[:, None, None, :]
    elif mask.dim() != 4:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} is not supported; expected a 4-D "
                         "[B, 1, Sq, Sk] mask (additive or boolean) or a 2-D [B, Sk] padding mask")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


class CLIPAttentionFused(hf_clip.CLIPAttention):
    """Multi-head self-attention with one fused ``qkv_proj`` (``hidden -> 3 * hidden``, rows ``[q | k | v]``).

    ``forward`` returns ``(attn_output [B, S, hidden], attn_weights [B, H, S, S] or None)``. ``attn_impl`` (module
    attribute, default ``"eager"``) picks how attention is expressed: ``"eager"``, ``"sdpa"`` or ``"vlmx"``.
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_proj: nn.Linear, out_proj: nn.Linear,
                 dev: torch.device | str | None = None, attention_dropout: float = 0.0):
        nn.Module.__init__(self)  # deliberately not CLIPAttention.__init__: no config, no separate q/k/v
        if num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}; "
                             "pass the model's hidden size and number of attention heads")
        if (qkv_proj.in_features, qkv_proj.out_features) != (hidden_size, 3 * hidden_size):
            raise ValueError(f"qkv_proj maps {qkv_proj.in_features} -> {qkv_proj.out_features} features; expected "
                             f"{hidden_size} -> {3 * hidden_size} (q, k and v projections concatenated by rows)")
        if out_proj.in_features != hidden_size:
            raise ValueError(f"out_proj takes {out_proj.in_features} features; expected hidden_size={hidden_size}")
        self.embed_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = float(attention_dropout)
        self.is_causal = False
        self.attn_impl = "eager"
        self.qkv_proj = qkv_proj
        self.out_proj = out_proj
        if dev is not None:
            self.to(dev)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attn_impl={self.attn_impl!r}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal_attention_mask: torch.Tensor | None = None, output_attentions: bool = False, **kwargs):
        """Self-attention over ``hidden_states [B, S, hidden]``.

        ``attention_mask`` / ``causal_attention_mask``: additive (or boolean, or 2-D padding) masks, summed.
        ``is_causal=True`` (transformers 5 passes it for the text tower) applies a causal mask only when no mask
        tensor is given, as transformers' SDPA path does (its masks already contain causality).
        """
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        bias = None
        for m in (attention_mask, causal_attention_mask):
            m = additive_mask(m, q.dtype)
            if m is not None:
                bias = m if bias is None else bias + m
        causal = bool(kwargs.get("is_causal") or False) and bias is None and s > 1
        need_weights = bool(output_attentions or kwargs.get("output_attentions"))
        impl = check_impl(self.attn_impl)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0:
            _, probs = attend(q, k, v, scale=self.scale, bias=bias, causal=causal, impl="eager", need_weights=True)
            o = torch.matmul(F.dropout(probs, p=dropout, training=True), v)
            weights = probs if need_weights else None
        else:
            o, weights = attend(q, k, v, scale=self.scale, bias=bias, causal=causal, impl=impl,
                                need_weights=need_weights)
        o = o.transpose(1, 2).reshape(b, s, self.embed_dim)
        return self.out_proj(o), weights


def _concat_linears(projs: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output rows are the given projections' rows in order (missing biases as zeros)."""
    w0 = projs[0].weight
    if any(p.in_features != projs[0].in_features for p in projs):
        raise ValueError(f"cannot fuse projections with input sizes {[p.in_features for p in projs]}; "
                         "q, k and v must read the same hidden size")
    has_bias = any(p.bias is not None for p in projs)
    fused = nn.Linear(projs[0].in_features, sum(p.out_features for p in projs), bias=has_bias, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in projs], dim=0), requires_grad=w0.requires_grad)
        if has_bias:
            biases = [p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w0.dtype, device=w0.device)
                      for p in projs]
            fused.bias = nn.Parameter(torch.cat(biases, dim=0), requires_grad=w0.requires_grad)
    return fused


def fuse_clip_attention(attn: nn.Module, dev: torch.device | str | None = None) -> CLIPAttentionFused:
    """A :class:`CLIPAttentionFused` with the weights of a transformers ``CLIPAttention`` (same dtype/device)."""
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise TypeError(f"{type(attn).__name__} has no nn.Linear {name}; expected a transformers CLIPAttention")
    fused = CLIPAttentionFused(attn.embed_dim, attn.num_heads, _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj]),
                               attn.out_proj, dev, attention_dropout=getattr(attn, "dropout", 0.0))
    fused.train(attn.training)
    return fused


def _is_unfused(m: nn.Module) -> bool:
    return isinstance(m, hf_clip.CLIPAttention) and not isinstance(m, CLIPAttentionFused)


def make_fused_vision_attn(model: nn.Module, dev: torch.device | str | None = None) -> nn.Module:
    """Replace every transformers ``CLIPAttention`` in ``model`` (in place) by :class:`CLIPAttentionFused`.

    Works on any module tree (CLIP vision/text/full models, LLaVA with a CLIP tower); idempotent. Forward hooks of
    the old modules (transformers' output recorders) are carried over; the old q/k/v projections are freed. With
    ``dev`` the whole model is moved there afterwards (tinychat's behaviour). Returns ``model``.
    """
    targets = [name for name, m in model.named_modules() if _is_unfused(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else None
        if parent is None:
            raise TypeError("make_fused_vision_attn needs a model that contains CLIPAttention modules, not a "
                            "CLIPAttention itself; use fuse_clip_attention(attn) for a single module")
        old = getattr(parent, child)
        fused = fuse_clip_attention(old)
        fused._forward_hooks.update(old._forward_hooks)
        fused._forward_pre_hooks.update(old._forward_pre_hooks)
        setattr(parent, child, fused)
        del old.q_proj, old.k_proj, old.v_proj, old
    if targets:
        gc.collect()
    if dev is not None:
        model.to(dev)
    return model


class CLIPEncoderLayer(hf_clip.CLIPEncoderLayer):
    """transformers' CLIP encoder layer (pre-LN attention + MLP, residuals) with :class:`CLIPAttentionFused`.

    A drop-in for transformers 5's ``CLIPEncoderLayer`` (it is one, so output recording still works): ``forward``
    returns the hidden states tensor. tinychat's ``causal_attention_mask`` keyword is accepted and summed into the
    mask; attention weights are recorded by transformers (``output_attentions``) or returned by ``self.self_attn``.
    """

    def __init__(self, config):
        super().__init__(config)
        self.self_attn = fuse_clip_attention(self.self_attn)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal_attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                **kwargs) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask, causal_attention_mask,
                                          output_attentions, **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

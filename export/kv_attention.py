"""Attention over a fixed-size, in-place KV cache (the language-model graph), in the three ``--attention`` modes.

The cache of layer ``i`` is ``[B, H_kv, S_max, D]``. A step writes its ``S_new`` keys/values at slot ``L - S_new``
(``L`` = ``attention_mask.shape[1]``: tokens in the cache after this step) with ``vlmx_onnx::tensor_scatter``
(ONNX ``TensorScatter``), then attends over the first ``L`` slots only:

- ``plugin``: one vlmx ``FlashAttention`` reading the whole cache with ``kv_len = L`` (the kernel stops at ``L``;
  nothing is sliced or copied), ``causal=1`` aligned to ``L``, padding as an additive ``[B,1,1,S_max]`` bias.
- ``native``: the cache sliced to ``[:, :, :L]`` and ``scaled_dot_product_attention`` with a boolean mask (the
  exporter emits the standard ONNX ``Attention`` op).
- ``decomposed``: the same slice, MatMul / masked Softmax / MatMul.

Mask rule (one place, :class:`KVState`): query ``i`` (absolute slot ``L - S_new + i``) sees key ``j`` when
``j <= L - S_new + i`` and key ``j`` is a real token, or ``j`` is the query itself (a left-padded query then attends
to itself instead of to nothing, so no row is fully masked and every mode stays finite; real tokens never see a pad).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmx.torch_ref import kv_cache, ops  # noqa: F401  (define torch.ops.vlmx_onnx.* and torch.ops.vlmx.*)
from vlmx.torch_ref.alibi import gen_slopes
from vlmx.torch_ref.contract import ATTENTION_MODES
#: transformers ``attn_implementation`` names of the cache-aware attention functions, per mode.
HF_NAMES = {m: f"vlmx_kv_{m}" for m in ATTENTION_MODES}


@dataclass
class KVState:
    """What every layer of one LM step shares: write position, valid length and the masks derived from them."""

    write_pos: torch.Tensor   # [B] int64: slot of the first new token (TensorScatter write_indices)
    kv_len: torch.Tensor      # [B] int64: valid slots after this step (L)
    allowed: torch.Tensor     # [B, 1, S_new, L] bool (native / decomposed)
    bias: torch.Tensor        # [B, 1, 1, S_max] additive padding bias (plugin)

    @classmethod
    def build(cls, attention_mask: torch.Tensor, s_new: int, s_max: int, dtype: torch.dtype) -> "KVState":
        b, length = attention_mask.shape[0], attention_mask.shape[1]
        dev = attention_mask.device
        write_pos = torch.full((b,), length - s_new, dtype=torch.int64, device=dev)
        kv_len = torch.full((b,), length, dtype=torch.int64, device=dev)
        j = torch.arange(length, device=dev).view(1, 1, 1, -1)
        i = (torch.arange(s_new, device=dev) + (length - s_new)).view(1, 1, -1, 1)
        real = attention_mask.to(torch.bool).view(b, 1, 1, length)
        allowed = (j <= i) & (real | (j == i))
        pad = torch.ones((b, s_max - length), dtype=attention_mask.dtype, device=dev)
        keys = torch.cat([attention_mask, pad], dim=1).to(torch.bool).view(b, 1, 1, s_max)
        bias = torch.zeros((), dtype=dtype, device=dev).masked_fill(~keys, float("-inf"))
        return cls(write_pos, kv_len, allowed, bias)

    @classmethod
    def build_static(cls, write_pos: torch.Tensor, key_mask: torch.Tensor, dtype: torch.dtype) -> "KVState":
        """One decode token (S_new = 1) with shapes independent of the context length (a CUDA graph replays it):
        ``write_pos`` [B] device tensor, ``key_mask`` [B, S_max] (1 = real token). Attention spans all S_max slots,
        masked beyond ``write_pos``."""
        b, s_max = key_mask.shape
        j = torch.arange(s_max, device=key_mask.device).view(1, 1, 1, -1)
        i = write_pos.view(-1, 1, 1, 1)
        real = key_mask.to(torch.bool).view(b, 1, 1, s_max)
        allowed = (j <= i) & (real | (j == i))
        bias = torch.zeros((), dtype=dtype, device=key_mask.device).masked_fill(~real, float("-inf"))
        return cls(write_pos, write_pos + 1, allowed, bias)


class FixedKVCache:
    """A transformers-``Cache``-shaped holder of the per-layer fixed-size caches: ``update`` writes the new keys and
    values at the step's write position and returns the whole ``[B, H_kv, S_max, D]`` caches.

    ``inplace=False`` (export, references): ``vlmx_onnx::tensor_scatter`` (one ONNX ``TensorScatter``) and the
    layer's cache becomes its result. ``inplace=True`` (torch backend): written into the given tensors."""

    is_compileable = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], state: KVState, inplace: bool = False):
        self.keys, self.values, self.state, self.inplace = list(keys), list(values), state, inplace

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        wp = self.state.write_pos
        if self.inplace:
            kv_cache.write_(self.keys[layer_idx], key_states, wp)
            kv_cache.write_(self.values[layer_idx], value_states, wp)
        else:
            self.keys[layer_idx] = torch.ops.vlmx_onnx.tensor_scatter(self.keys[layer_idx], key_states, wp)
            self.values[layer_idx] = torch.ops.vlmx_onnx.tensor_scatter(self.values[layer_idx], value_states, wp)
        return self.keys[layer_idx], self.values[layer_idx]

    def flat(self) -> list[torch.Tensor]:
        """``[key 0, value 0, key 1, ...]`` (the graph's ``present.*`` outputs)."""
        return [t for pair in zip(self.keys, self.values) for t in pair]


def _alibi(h: int, length, alibi_bias_max: int, device) -> torch.Tensor:
    """``slope_h * (j - (L - 1))`` as ``[1, H, 1, L]`` float32."""
    j = torch.arange(length, device=device, dtype=torch.float32).view(1, 1, 1, -1) - (length - 1)
    return j * gen_slopes(h, alibi_bias_max, device=device)


def cached_attention(mode: str, q, k_cache, v_cache, state: KVState, scale: float, alibi_bias_max: int | None = None):
    """q ``[B,H,S_new,D]`` against the caches ``[B,Hkv,S_max,D]`` (already holding this step) → ``[B,H,S_new,D]``.
    ``alibi_bias_max``: MPT's ALiBi (None: no positional bias here, e.g. rotary models)."""
    h, d, hkv = q.shape[1], q.shape[-1], k_cache.shape[1]
    if mode == "plugin":
        return torch.ops.vlmx.flash_attention(
            q, k_cache, v_cache, state.bias.to(q.dtype), state.kv_len, num_heads=h, num_kv_heads=hkv, head_dim=d,
            scale=float(scale), causal=1, alibi=int(alibi_bias_max is not None),
            alibi_bias_max=int(alibi_bias_max or 8), layout="bhsd")
    length = state.allowed.shape[-1]
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    if hkv != h:
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    if mode == "native":
        mask = state.allowed
        if alibi_bias_max is not None:
            bias = _alibi(h, length, alibi_bias_max, q.device).to(q.dtype)
            mask = bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=float(scale))
    if mode != "decomposed":
        raise ValueError(f"--attention {mode} is not known; choose one of {', '.join(ATTENTION_MODES)}")
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if alibi_bias_max is not None:
        s = s + _alibi(h, length, alibi_bias_max, q.device).to(s.dtype)
    s = s.masked_fill(~state.allowed, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def _hf_function(mode: str):
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, vlmx_kv: KVState = None,
                **kwargs):
        if vlmx_kv is None:
            raise ValueError(f"{HF_NAMES[mode]} attention needs the step's KVState (vlmx_kv=...)")
        o = cached_attention(mode, query, key, value, vlmx_kv, scaling or query.shape[-1] ** -0.5)
        return o.transpose(1, 2).contiguous(), None

    forward.__name__ = HF_NAMES[mode]
    return forward


def register() -> None:
    """Register the three cache-aware attention functions with transformers (idempotent)."""
    from transformers import AttentionInterface

    for mode, name in HF_NAMES.items():
        AttentionInterface.register(name, _hf_function(mode))

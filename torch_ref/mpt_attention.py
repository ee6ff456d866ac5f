"""MPT attention (MosaicML llm-foundry / MPT-7B ``attention.py`` interface) on top of :func:`attend`.

Same functions, signatures and semantics as the MPT seed, with these deliberate differences:

- every ``attn_impl`` keeps its KV cache as ``(k, v)``, both ``[B, Hkv, S, D]`` (the layout of :func:`attend`, of the
  ``vlmx::flash_attention`` op with ``layout="bhsd"`` and of transformers' ``DynamicCache``), so impls can share one;
- the modules can add ALiBi themselves (``alibi=True``): the ``vlmx`` impl then emits ``FlashAttention`` with
  ``alibi=1`` instead of a bias tensor (``num_kv_heads=1`` for multi-query);
- ``flash``/``triton`` run the vlmx CUDA kernel (registered by ``vlmx.plugins``) instead of flash-attn/triton.

``attn_impl``: ``torch`` (the seed's math, ``attend(impl="eager")``), ``sdpa``, ``vlmx`` (the custom op, any device),
``flash`` and ``triton`` (the vlmx CUDA kernel only; a clear error otherwise).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .alibi import gen_slopes
from .attention import attend

__all__ = ["ATTN_IMPLS", "ATTN_CLASS_REGISTRY", "GroupedQueryAttention", "LPLayerNorm", "MptAttentionAdapter",
           "MultiQueryAttention", "MultiheadAttention", "attn_bias_shape", "build_alibi_bias", "build_attn_bias",
           "flash_attn_fn", "gen_slopes", "scaled_multihead_dot_product_attention", "swap_mpt_attention",
           "triton_flash_attn_fn", "vlmx_cuda_kernel_available"]

ATTN_IMPLS = ("torch", "sdpa", "vlmx", "flash", "triton")
_KERNEL_OP = "vlmx::flash_attention"


# ------------------------------------------------------------------------------------------------ functional core
def _kv_heads(n_heads: int, kv_n_heads: int | None, multiquery: bool) -> int:
    kvh = 1 if multiquery else (n_heads if kv_n_heads is None else int(kv_n_heads))
    if kvh < 1 or n_heads % kvh:
        raise ValueError(f"kv_n_heads={kvh} must be >= 1 and divide n_heads={n_heads}")
    return kvh


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, c = x.shape
    if c % heads:
        raise ValueError(f"{c} features cannot be split into {heads} heads")
    return x.view(b, s, heads, c // heads).transpose(1, 2)


def _with_past(k: torch.Tensor, v: torch.Tensor, past_key_value):
    """Seed cache rule: None → no cache; () → start one; (k, v) → append. Returns (k, v, present or None)."""
    if past_key_value is None:
        return k, v, None
    if len(past_key_value) != 0:
        pk, pv = past_key_value
        if pk.shape[:2] != k.shape[:2] or pk.shape[-1] != k.shape[-1]:
            raise ValueError(f"past key of shape {tuple(pk.shape)} does not match new keys {tuple(k.shape)}; "
                             "the cache layout is [B, Hkv, S, D] for every attn_impl")
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
    return k, v, (k, v)


def _effective_bias(attn_bias, key_padding_mask, b: int, s_q: int, s_k: int, dtype) -> torch.Tensor | None:
    """Slice ``attn_bias`` to the last (s_q, s_k) positions as the seed does, and fold the key padding mask in."""
    if attn_bias is not None:
        if attn_bias.dim() != 4:
            raise ValueError(f"attn_bias must be 4-D [B|1, H|1, Sq|1, Sk|1], got shape {tuple(attn_bias.shape)}")
        attn_bias = attn_bias[:, :, max(0, attn_bias.size(2) - s_q):, max(0, attn_bias.size(3) - s_k):]
        if attn_bias.size(-1) not in (1, s_k) or attn_bias.size(-2) not in (1, s_q):
            raise ValueError(f"attn_bias (shape {tuple(attn_bias.shape)}) does not broadcast to scores "
                             f"[{b}, H, {s_q}, {s_k}]; build it with build_attn_bias for at least {s_k} positions")
        attn_bias = attn_bias.to(dtype)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, s_k):
            raise ValueError(f"key_padding_mask must be [batch, keys] = [{b}, {s_k}] (True = attend), "
                             f"got {tuple(key_padding_mask.shape)}")
        keep = key_padding_mask.to(torch.bool).view(b, 1, 1, s_k)
        base = attn_bias if attn_bias is not None else torch.zeros((), dtype=dtype, device=keep.device)
        attn_bias = base.masked_fill(~keep, torch.finfo(dtype).min)
    return attn_bias


def _mpt_attention(query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
                   is_causal, dropout_p, training, needs_weights, multiquery, kv_n_heads, alibi, alibi_bias_max,
                   impl):
    kvh = _kv_heads(n_heads, kv_n_heads, multiquery)
    q = _split_heads(query, n_heads)
    k, v, present = _with_past(_split_heads(key, kvh), _split_heads(value, kvh), past_key_value)
    b, _, s_q, d = q.shape
    s_k = k.shape[2]
    bias = _effective_bias(attn_bias, key_padding_mask, b, s_q, s_k, q.dtype)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    kw = dict(scale=scale, bias=bias, causal=bool(is_causal), alibi=bool(alibi), alibi_bias_max=alibi_bias_max)
    if dropout_p and training:
        if impl == "vlmx":
            raise NotImplementedError("attention dropout is not available with attn_impl='vlmx'; call model.eval() "
                                      "or use attn_impl='torch' for training")
        _, p = attend(q, k, v, impl="eager", need_weights=True, **kw)
        p = F.dropout(p, p=dropout_p, training=True)
        o = torch.matmul(p, v.repeat_interleave(n_heads // kvh, dim=1))
    else:
        o, p = attend(q, k, v, impl=impl, need_weights=needs_weights, **kw)
    out = o.transpose(1, 2).reshape(b, s_q, n_heads * d)
    return out, (p if needs_weights else None), present


def scaled_multihead_dot_product_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_heads: int, past_key_value=None,
        softmax_scale: float | None = None, attn_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, dropout_p: float = 0.0,
        training: bool = False, needs_weights: bool = False, multiquery: bool = False, *,
        kv_n_heads: int | None = None, alibi: bool = False, alibi_bias_max: int = 8, impl: str = "eager"):
    """MPT's torch attention: ``query [B,Sq,H*D]``, ``key/value [B,Sk,Hkv*D]`` → ``(out [B,Sq,H*D], weights, past)``.

    ``past_key_value``: None (no cache), ``()`` (start one) or ``(k, v)`` ``[B,Hkv,S,D]`` to append to; the returned
    ``past`` holds all keys/values. ``attn_bias`` is sliced to the last (Sq, Sk) positions; ``key_padding_mask``
    ``[B,Sk]`` is True where keys count; causal masking is bottom-right aligned. ``multiquery`` means one KV head;
    ``kv_n_heads`` sets any divisor of ``n_heads``. ``alibi`` adds MPT's ALiBi inside; ``impl`` is passed to
    :func:`attend` (``eager``/``sdpa``/``vlmx``). Weights are softmax probabilities after dropout.
    """
    return _mpt_attention(query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
                          is_causal, dropout_p, training, needs_weights, multiquery, kv_n_heads, alibi,
                          alibi_bias_max, impl)


def vlmx_cuda_kernel_available() -> bool:
    """True when a CUDA kernel for ``vlmx::flash_attention`` is registered (``import vlmx.plugins`` does that)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_KERNEL_OP, "CUDA")


def _require_kernel(impl: str, *tensors: torch.Tensor) -> None:
    if not vlmx_cuda_kernel_available():
        raise RuntimeError(f"attn_impl={impl!r} needs the vlmx CUDA FlashAttention kernel, which is not registered "
                           "(build and import vlmx.plugins on a CUDA machine); use attn_impl='torch' instead")
    for t in tensors:
        if not t.is_cuda or t.dtype != torch.float16:
            raise RuntimeError(f"attn_impl={impl!r} runs the vlmx CUDA kernel on float16 CUDA tensors, got "
                               f"{t.dtype} on {t.device}; move the model with .half().cuda() or use "
                               "attn_impl='torch'")


def _kernel_attention(impl, query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
                      is_causal, dropout_p, training, needs_weights, multiquery, kv_n_heads, alibi, alibi_bias_max):
    _require_kernel(impl, query, key, value)
    if needs_weights:
        raise NotImplementedError(f"attn_impl={impl!r} cannot return attention weights; use attn_impl='torch'")
    if dropout_p and training:
        raise NotImplementedError(f"attn_impl={impl!r} has no attention dropout; use attn_impl='torch' to train")
    return _mpt_attention(query, key, value, n_heads, past_key_value, softmax_scale, attn_bias, key_padding_mask,
                          is_causal, 0.0, False, False, multiquery, kv_n_heads, alibi, alibi_bias_max, "vlmx")


def flash_attn_fn(query, key, value, n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
                  key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False,
                  multiquery=False, *, kv_n_heads=None, alibi=False, alibi_bias_max=8):
    """The seed's ``flash`` path, served by the vlmx CUDA kernel (fp16 CUDA tensors). Raises a RuntimeError naming
    ``attn_impl='torch'`` when the kernel is not registered. Unlike flash-attn 1.x it accepts ``attn_bias``."""
    return _kernel_attention("flash", query, key, value, n_heads, past_key_value, softmax_scale, attn_bias,
                             key_padding_mask, is_causal, dropout_p, training, needs_weights, multiquery,
                             kv_n_heads, alibi, alibi_bias_max)


def triton_flash_attn_fn(query, key, value, n_heads, past_key_value=None, softmax_scale=None, attn_bias=None,
                         key_padding_mask=None, is_causal=False, dropout_p=0.0, training=False, needs_weights=False,
                         multiquery=False, *, kv_n_heads=None, alibi=False, alibi_bias_max=8):
    """The seed's ``triton`` path, served by the same vlmx CUDA kernel (on sm_75 Triton has no tensor-core dot)."""
    return _kernel_attention("triton", query, key, value, n_heads, past_key_value, softmax_scale, attn_bias,
                             key_padding_mask, is_causal, dropout_p, training, needs_weights, multiquery,
                             kv_n_heads, alibi, alibi_bias_max)


def _attn_fn(attn_impl: str):
    if attn_impl in ("torch", "sdpa", "vlmx"):
        impl = "eager" if attn_impl == "torch" else attn_impl

        def fn(*args, **kw):
            return scaled_multihead_dot_product_attention(*args, impl=impl, **kw)
        return fn
    if attn_impl == "flash":
        return flash_attn_fn
    if attn_impl == "triton":
        return triton_flash_attn_fn
    raise ValueError(f"attn_impl={attn_impl!r} is not known; choose one of {list(ATTN_IMPLS)}")


# ------------------------------------------------------------------------------------------------ biases
def attn_bias_shape(attn_impl: str, n_heads: int, seq_len: int, alibi: bool, prefix_lm: bool, causal: bool,
                    use_sequence_id: bool):
    """Shape of the bias tensor a model should allocate for ``attn_impl`` (None: no bias tensor needed)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is not known; choose one of {list(ATTN_IMPLS)}")
    if alibi:
        if prefix_lm or not causal or use_sequence_id:
            return (1, n_heads, seq_len, seq_len)
        return (1, n_heads, 1, seq_len)
    if prefix_lm or use_sequence_id:
        return (1, 1, seq_len, seq_len)
    return None


def build_alibi_bias(n_heads: int, seq_len: int, full: bool = False, alibi_bias_max: int = 8, device=None,
                     dtype=None) -> torch.Tensor:
    """MPT ALiBi: ``slope_h * (j - (seq_len-1))`` as ``[1,H,1,S]``, or ``-slope_h * |i - j|`` as ``[1,H,S,S]``."""
    j = torch.arange(1 - seq_len, 1, dtype=torch.int32, device=device).view(1, 1, 1, seq_len)
    dist = -(j - j.view(1, 1, seq_len, 1)).abs() if full else j
    return (dist * gen_slopes(n_heads, alibi_bias_max, device=device)).to(dtype=dtype)


def build_attn_bias(attn_impl: str, attn_bias: torch.Tensor | None, n_heads: int, seq_len: int, causal: bool = False,
                    alibi: bool = False, alibi_bias_max: int = 8) -> torch.Tensor | None:
    """Add ALiBi to a bias allocated with :func:`attn_bias_shape` (returns it unchanged without alibi)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is not known; choose one of {list(ATTN_IMPLS)}")
    if attn_bias is None or not alibi:
        return attn_bias
    return attn_bias.add(build_alibi_bias(n_heads, seq_len, full=not causal, alibi_bias_max=alibi_bias_max,
                                          device=attn_bias.device, dtype=attn_bias.dtype))


# ------------------------------------------------------------------------------------------------ modules
class LPLayerNorm(nn.LayerNorm):
    """MPT's low-precision LayerNorm: under autocast, normalizes in the autocast dtype instead of float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if not torch.is_autocast_enabled(dev):
            return super().forward(x)
        dt = torch.get_autocast_dtype(dev)
        w = self.weight.to(dt) if self.weight is not None else None
        b = self.bias.to(dt) if self.bias is not None else None
        with torch.autocast(device_type=dev, enabled=False):
            return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps)


class GroupedQueryAttention(nn.Module):
    """MPT self-attention with a fused ``Wqkv`` projection, ``kv_n_heads`` key/value heads and ``out_proj``.

    ``forward(x, past_key_value=None, attn_bias=None, attention_mask=None, is_causal=True, needs_weights=False)``
    returns ``(out [B,S,d_model], attn_weights or None, past_key_value)``; ``attention_mask`` is the key padding
    mask ``[B, S_past + S]`` (True = attend). ``alibi=True`` adds MPT's ALiBi inside (then pass no alibi bias).
    """

    def __init__(self, d_model: int, n_heads: int, kv_n_heads: int, attn_impl: str = "torch",
                 clip_qkv: float | None = None, qk_ln: bool = False, softmax_scale: float | None = None,
                 attn_pdrop: float = 0.0, low_precision_layernorm: bool = False, device=None, *, alibi: bool = False,
                 alibi_bias_max: int = 8, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        _attn_fn(attn_impl)
        self.kv_n_heads = _kv_heads(n_heads, kv_n_heads, False)
        self.attn_impl, self.clip_qkv, self.qk_ln = attn_impl, clip_qkv, qk_ln
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim ** -0.5
        self.attn_dropout_p = attn_pdrop
        self.alibi, self.alibi_bias_max = alibi, alibi_bias_max
        kv_dim = self.kv_n_heads * self.head_dim
        self.Wqkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias, device=device)
        if qk_ln:
            norm = LPLayerNorm if low_precision_layernorm else nn.LayerNorm
            self.q_ln = norm(d_model, device=device)
            self.k_ln = norm(kv_dim, device=device)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device)

    def qkv(self, x: torch.Tensor):
        """Fused projection, ``clip_qkv`` clamp and ``qk_ln``: ``(q [B,S,d_model], k, v [B,S,Hkv*D])``."""
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_n_heads * self.head_dim
        q, k, v = qkv.split([self.d_model, kv_dim, kv_dim], dim=2)
        if self.qk_ln:
            q, k = self.q_ln(q).to(q.dtype), self.k_ln(k).to(k.dtype)
        return q, k, v

    def forward(self, x: torch.Tensor, past_key_value=None, attn_bias: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, is_causal: bool = True, needs_weights: bool = False):
        q, k, v = self.qkv(x)
        context, weights, past_key_value = _attn_fn(self.attn_impl)(
            q, k, v, self.n_heads, past_key_value=past_key_value, softmax_scale=self.softmax_scale,
            attn_bias=attn_bias, key_padding_mask=attention_mask, is_causal=is_causal,
            dropout_p=self.attn_dropout_p, training=self.training, needs_weights=needs_weights,
            kv_n_heads=self.kv_n_heads, alibi=self.alibi, alibi_bias_max=self.alibi_bias_max)
        return self.out_proj(context), weights, past_key_value


class MultiheadAttention(GroupedQueryAttention):
    """Multi-head MPT attention (``Wqkv``: d_model → 3·d_model)."""

    def __init__(self, d_model: int, n_heads: int, attn_impl: str = "torch", clip_qkv: float | None = None,
                 qk_ln: bool = False, softmax_scale: float | None = None, attn_pdrop: float = 0.0,
                 low_precision_layernorm: bool = False, device=None, **kw):
        super().__init__(d_model, n_heads, n_heads, attn_impl, clip_qkv, qk_ln, softmax_scale, attn_pdrop,
                         low_precision_layernorm, device, **kw)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query MPT attention: one key/value head (``Wqkv``: d_model → d_model + 2·head_dim)."""

    def __init__(self, d_model: int, n_heads: int, attn_impl: str = "torch", clip_qkv: float | None = None,
                 qk_ln: bool = False, softmax_scale: float | None = None, attn_pdrop: float = 0.0,
                 low_precision_layernorm: bool = False, device=None, **kw):
        super().__init__(d_model, n_heads, 1, attn_impl, clip_qkv, qk_ln, softmax_scale, attn_pdrop,
                         low_precision_layernorm, device, **kw)


ATTN_CLASS_REGISTRY = {
    "multihead_attention": MultiheadAttention,
    "multiquery_attention": MultiQueryAttention,
    "grouped_query_attention": GroupedQueryAttention,
}


# ------------------------------------------------------------------------------------------------ transformers MPT
class MptAttentionAdapter(MultiheadAttention):
    """Drop-in for transformers' ``MptAttention`` (same parameter names, call signature and return).

    ``forward(hidden_states, position_bias, cache=None, attention_mask=None)`` → ``(out, weights)``. The cache
    arrives as ``cache`` (transformers ≥ 5.24) or ``past_key_values`` (earlier 5.x); both names are accepted.
    ALiBi is added inside (``alibi_bias_max=8`` as transformers' MptModel), so ``position_bias`` is not read.
    The transformers 4-D mask (True = masked) is applied as an additive bias when ``respect_attention_mask``;
    turn it off for unpadded inputs to get a pure ``causal=1`` attention (what the vlmx exporter wants).
    Weights are returned only when ``needs_weights`` is set (else None).
    """

    def __init__(self, d_model, n_heads, layer_idx=None, attn_impl="torch", clip_qkv=None, softmax_scale=None,
                 attn_pdrop=0.0, respect_attention_mask=True, needs_weights=False):
        super().__init__(d_model, n_heads, attn_impl, clip_qkv=clip_qkv, softmax_scale=softmax_scale,
                         attn_pdrop=attn_pdrop, alibi=True, alibi_bias_max=8, bias=False)
        self.layer_idx = layer_idx
        self.respect_attention_mask = respect_attention_mask
        self.needs_weights = needs_weights

    @classmethod
    def from_hf(cls, hf_attn: nn.Module, attn_impl: str = "torch", **kw) -> "MptAttentionAdapter":
        """Build from a transformers ``MptAttention``, copying ``Wqkv`` and ``out_proj``."""
        w = hf_attn.Wqkv.weight
        new = cls(hf_attn.hidden_size, hf_attn.n_heads, hf_attn.layer_idx, attn_impl, hf_attn.clip_qkv,
                  hf_attn.softmax_scale, hf_attn.attn_dropout_p, **kw).to(device=w.device, dtype=w.dtype)
        new.load_state_dict(hf_attn.state_dict())
        new.train(hf_attn.training)
        return new

    def forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, past_key_values=None,
                **kwargs):
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("MptAttentionAdapter got two different caches (cache= and past_key_values=)")
        past_key_values = cache if cache is not None else past_key_values
        past = None
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ValueError("MptAttentionAdapter needs layer_idx to use a transformers Cache")
            layers = getattr(past_key_values, "layers", None)
            if layers is None:
                raise TypeError(f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__}")
            n = past_key_values.get_seq_length(self.layer_idx) if self.layer_idx < len(layers) else 0
            past = (layers[self.layer_idx].keys, layers[self.layer_idx].values) if n > 0 else ()
        bias = None
        if attention_mask is not None and self.respect_attention_mask:
            dt = hidden_states.dtype
            bias = torch.zeros((), dtype=dt, device=hidden_states.device).masked_fill(
                attention_mask.to(torch.bool), torch.finfo(dt).min)
        out, weights, present = super().forward(hidden_states, past_key_value=past, attn_bias=bias, is_causal=True,
                                                needs_weights=self.needs_weights)
        if past_key_values is not None:
            s = hidden_states.shape[1]
            past_key_values.update(present[0][:, :, -s:], present[1][:, :, -s:], self.layer_idx)
        return out, weights


def swap_mpt_attention(model: nn.Module, attn_impl: str = "torch", **kw) -> nn.Module:
    """Replace every transformers ``MptAttention`` in ``model`` (MptModel, MptForCausalLM, LLaVA with an MPT
    language model) by :class:`MptAttentionAdapter` with the same weights. Returns ``model`` (changed in place)."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MptAttention)
               and not isinstance(mod, MptAttentionAdapter)]
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no transformers MptAttention to swap; pass an MPT model "
                         "(MptModel, MptForCausalLM or a LLaVA model whose text_config is an MptConfig)")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MptAttentionAdapter.from_hf(mod, attn_impl, **kw))
    return model

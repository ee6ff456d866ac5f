"""The language model's layer loop over a fixed-size KV cache, one small module per architecture.

Each is ``forward(hidden, state, cache, position_ids) -> hidden`` (layers + final norm) for
:class:`vlmx.export.graphs.LanguageModelGraph`, reusing the transformers / torch_ref layers themselves; only the
attention call changes (:func:`vlmx.export.kv_attention.cached_attention`). The family config
(:mod:`vlmx.export.model_configs`) picks one.
"""
from __future__ import annotations

from torch import nn

from vlmx.torch_ref.hf_compat import cache_kwargs

from . import kv_attention


class LlamaDecoder(nn.Module):
    """transformers' Llama decoder layers, their attention switched to the cache-aware function of ``attention``."""

    def __init__(self, lm: nn.Module, attention: str, num_layers: int):
        super().__init__()
        kv_attention.register()
        lm.set_attn_implementation(kv_attention.HF_NAMES[attention])
        self.lm, self.num_layers = lm, num_layers

    def forward(self, hidden, state, cache, position_ids):
        pe = self.lm.rotary_emb(hidden, position_ids=position_ids)
        layers = self.lm.layers[:self.num_layers]
        kw = cache_kwargs(layers[0], cache) if len(layers) else {}
        for layer in layers:
            hidden = layer(hidden, attention_mask=state.allowed, position_embeddings=pe, position_ids=position_ids,
                           vlmx_kv=state, **kw)
        return self.lm.norm(hidden)


class MptDecoder(nn.Module):
    """MPT blocks (torch_ref's ``MptAttentionAdapter`` for ``attn``: fused ``Wqkv``, ALiBi) in MptBlock's order:
    ``h += attn(norm_1(h))``, ``h = ffn(norm_2(h), h)``."""

    def __init__(self, lm: nn.Module, attention: str, num_layers: int):
        super().__init__()
        self.lm, self.attention, self.num_layers = lm, attention, num_layers

    def forward(self, hidden, state, cache, position_ids=None):
        b, s, _ = hidden.shape
        for i, block in enumerate(self.lm.blocks[:self.num_layers]):
            attn = block.attn
            q, k, v = attn.qkv(block.norm_1(hidden))
            q, k, v = (t.view(b, s, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            k_all, v_all = cache.update(k, v, i)
            o = kv_attention.cached_attention(self.attention, q, k_all, v_all, state, attn.softmax_scale,
                                              alibi_bias_max=attn.alibi_bias_max if attn.alibi else None)
            hidden = hidden + attn.out_proj(o.transpose(1, 2).reshape(b, s, -1))
            hidden = block.ffn(block.norm_2(hidden), hidden)
        return self.lm.norm_f(hidden)

"""The torch modules that become the exported graphs (the artifact contract's I/O, flat tensors in and out).

Each wraps the parts of a transformers LLaVA model one graph needs; none knows a model name. Per-family knowledge
(feature layer, [CLS], position ids) comes in as constructor arguments from :mod:`vlmx.export.model_configs`.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmx.torch_ref import pruning


def _feature_layer_index(feature_layer: int, num_layers: int) -> int:
    """hidden_states index → the encoder layer that produced it (hidden_states[0] is the embedding output)."""
    idx = feature_layer % (num_layers + 1)
    if idx == 0:
        raise ValueError(f"vision_feature_layer={feature_layer} selects the embeddings; no attention produced it")
    return idx - 1


class VisionGraph(nn.Module):
    """``pixel_values`` → ``image_features`` (after the projector) [, ``cls_attention`` (CLIP towers)]."""

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int, drop_cls: bool,
                 cls_attention: bool, cls_qk=None):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.cls_attention = cls_attention
        #: ``(tower, hidden_states, layer_index) -> (q [B,H,S,D], k [B,H,S,D], scale)`` for towers whose layers
        #: are not CLIP-shaped (the family config supplies it); None: the CLIP layout below
        self.cls_qk = cls_qk

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        feats = hidden[self.feature_layer]
        if self.drop_cls:
            feats = feats[:, 1:]
        image_features = self.projector(feats)
        if not self.cls_attention:
            return image_features
        return image_features, self._cls_attention(self.tower, hidden)

    def _cls_attention(self, tower, hidden):
        """Head-averaged softmax of the [CLS] query over all keys at the feature layer, renormalised over patches."""
        if self.cls_qk is not None:
            n = tower.config.num_hidden_layers
            q, k, scale = self.cls_qk(tower, hidden, _feature_layer_index(self.feature_layer, n))
            p = torch.softmax(torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale, dim=-1)
            return pruning.cls_importance(p[:, :, 0, :])
        inner = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel
        layers = inner.encoder.layers
        li = _feature_layer_index(self.feature_layer, len(layers))
        layer = layers[li]
        x = layer.layer_norm1(hidden[li])
        attn = layer.self_attn
        b, s, _ = x.shape
        h, d = attn.num_heads, attn.head_dim
        if hasattr(attn, "qkv_proj"):  # torch_ref's fused CLIP attention: rows [q | k | v]
            # the same ops as the attention module, so the exported graph shares its q/k tensors (one qkv GEMM)
            q, k, _ = (t.transpose(1, 2) for t in attn.qkv_proj(x).view(b, s, 3, h, d).unbind(2))
        else:
            q = attn.q_proj(x).view(b, s, h, d).transpose(1, 2)
            k = attn.k_proj(x).view(b, s, h, d).transpose(1, 2)
        q, k = q[:, :, :1].float(), k.float()
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)
        return pruning.cls_importance(p[:, :, 0, :])


class EmbedGraph(nn.Module):
    """``input_ids`` → ``inputs_embeds``."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embed = embedding

    def forward(self, input_ids):
        return self.embed(input_ids)


class ScoreGraph(nn.Module):
    """``text_embeds``, ``image_features`` → ``scores``: vlmx TokenImportance of LM layer-0 queries (normed text)
    vs layer-0 keys (normed image features), no rotary."""

    def __init__(self, norm: nn.Module, q_proj: nn.Module, k_proj: nn.Module, num_heads: int,
                 num_kv_heads: int, head_dim: int):
        super().__init__()
        self.norm, self.q_proj, self.k_proj = norm, q_proj, k_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, text_embeds, image_features):
        q = self.q_proj(self.norm(text_embeds))
        k = self.k_proj(self.norm(image_features))
        return pruning.token_importance(q, k, self.num_heads, self.head_dim, self.num_kv_heads, impl="vlmx")


class PruneGraph(nn.Module):
    """``image_features``, ``scores``, ``keep`` → ``kept_features``, ``kept_index`` (vlmx GatherTopK)."""

    def forward(self, image_features, scores, keep):
        return torch.ops.vlmx.gather_topk(image_features, scores, keep)


class LanguageModelGraph(nn.Module):
    """One step of the language model over a fixed-size KV cache: prefill (``S_new`` = prompt length) and decode
    (``S_new`` = 1) are the same graph, the weights stored once.

    ``inputs_embeds`` [B, S_new, C], ``attention_mask`` [B, L] (int64, 1 = real token; L = tokens in the cache after
    this step, so the write position is ``L - S_new``), ``past.{i}.key/value`` [B, H_kv, S_max, D] →
    ``logits`` [B, 1, V] (float32, last position), ``present.{i}.key/value`` [B, H_kv, S_max, D]: the caches with
    this step written in (``TensorScatter``; a runtime binds past and present to one buffer).

    ``decoder(hidden, state, cache, position_ids) -> hidden`` runs the family's layers and final norm (per-family
    knowledge from :mod:`vlmx.export.model_configs`); ``position_ids`` ([B, S_new], from the mask's cumulative sum as
    transformers' ``generate`` makes them) is given only to rotary families.
    """

    def __init__(self, decoder, lm_head: nn.Module, num_layers: int, position_ids: bool, inplace: bool = False):
        super().__init__()
        self.decoder, self.lm_head = decoder, lm_head
        self.num_layers, self.position_ids, self.inplace = num_layers, position_ids, inplace

    def forward(self, inputs_embeds, attention_mask, *past):
        from .kv_attention import FixedKVCache, KVState

        s_new, s_max = inputs_embeds.shape[1], past[0].shape[2]
        state = KVState.build(attention_mask, s_new, s_max, inputs_embeds.dtype)
        cache = FixedKVCache(past[0::2], past[1::2], state, inplace=self.inplace)
        pos = None
        if self.position_ids:
            pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, attention_mask.shape[1] - s_new:]
        hidden = self.decoder(inputs_embeds, state, cache, pos)
        logits = self.lm_head(hidden[:, -1:]).float()
        return (logits, *cache.flat())

    def step(self, inputs_embeds, write_pos, key_mask, *past):
        """One decode token with context-independent shapes (the torch backend's CUDA-graph step): ``write_pos``
        [B] int64 device tensor, ``key_mask`` [B, S_max]; the caches are written in place. Returns ``logits``."""
        from .kv_attention import FixedKVCache, KVState

        state = KVState.build_static(write_pos, key_mask, inputs_embeds.dtype)
        cache = FixedKVCache(past[0::2], past[1::2], state, inplace=True)
        pos = None
        if self.position_ids:
            pos = key_mask.cumsum(-1).gather(1, write_pos.view(-1, 1)) - 1
        hidden = self.decoder(inputs_embeds, state, cache, pos)
        return self.lm_head(hidden[:, -1:]).float()

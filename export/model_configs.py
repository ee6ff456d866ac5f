"""Per-family export knowledge (Optimum-style): one config object per model family, registered in one table.

A family config knows its graphs' input/output names, dynamic axes, TensorRT profiles, seeded dummy inputs,
which modules to swap for each ``--attention`` mode and where the layer-0 projections for visual-token scoring
live. The driver (:mod:`vlmx.export.exporter`) is generic: it asks :func:`family_for` for a preset's config and
never looks at a model name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmx.torch_ref.contract import KV_PAST, KV_PRESENT, LM_GRAPH, kv_names
from vlmx.torch_ref.op_table import OPS

from . import graphs, hf_attention, lm_decoders
from .domain import TENSOR_SCATTER_OPSET

#: Dummy sizes: batch 2 and distinct odd lengths, so no dynamic axis is specialised by accident.
DUMMY = {"batch": 2, "seq": 9, "text_len": 7, "past": 6, "new": 3, "cache_slots": 17}


@dataclass
class GraphSpec:
    """One graph to export: the module, its named dummy inputs, output names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    profile: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    #: named TensorRT optimization profiles of one engine (the LM graph: ``prefill`` and ``decode``)
    profiles: dict[str, dict] = field(default_factory=dict)
    #: smallest default-domain opset the graph needs (the LM graph's TensorScatter: 24)
    min_opset: int = 0
    #: renames of exporter-made axis names (data-dependent sizes come out as ``u0``, ``u1``, ...)
    dim_names: dict[str, str] = field(default_factory=dict)
    #: named axes traced as dynamic but written as fixed sizes (the LM cache length S_max: TensorRT's KV-cache
    #: update needs a static sequence axis, while the graph still reads it with Shape, so small dummies trace it)
    dim_values: dict[str, int] = field(default_factory=dict)

    #: ``{tensor: (axis, size)}``: reference I/O zero-padded along ``axis`` to the written file's fixed size
    reference_pad: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def manifest_axes(self) -> dict[str, dict[int, str]]:
        """The dynamic axes of the written file (``dim_values`` axes are fixed there)."""
        return {k: {a: n for a, n in v.items() if n not in self.dim_values} for k, v in self.dynamic_axes.items()}

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclass
class ExportContext:
    """What one export run fixes: the model and its preset spec, attention mode, dtype and seed."""

    model: nn.Module
    spec: object  # vlmx.torch_ref.models.PresetSpec
    attention: str = "plugin"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    max_batch: int = 4
    #: KV-cache length S_max of the LM graph (``--max-seq-len``; None: the preset's context length)
    max_seq_len: int | None = None

    @property
    def seq_len(self) -> int:
        return int(self.max_seq_len or self.spec.max_seq_len)

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)


class SliceProj(nn.Module):
    """Output columns ``[start, end)`` of a fused projection (MPT's ``Wqkv``) as a projection of its own."""

    def __init__(self, proj: nn.Module, start: int, end: int):
        super().__init__()
        self.proj, self.start, self.end = proj, start, end

    def forward(self, x):
        return self.proj(x)[..., self.start:self.end]


class LlavaFamily:
    """LLaVA-1.5: CLIP vision tower with [CLS], Llama language model with rotary position ids."""

    name = "llava"
    vision = "clip"
    language = "llama"
    position_ids = True
    decoder_class = lm_decoders.LlamaDecoder

    # ------------------------------------------------------------------------------------------- model surgery
    #: ``attn_impl`` of the torch_ref modules (fused CLIP, W8A8 SigLIP, MPT) per ``--attention`` mode
    ATTN_IMPL = {"plugin": "vlmx", "native": "sdpa", "decomposed": "eager"}

    def prepare(self, model: nn.Module, attention: str, precision: str = "fp16") -> nn.Module:
        """Swap in the modules that express attention as ``attention`` asks (one call per family): the language
        model through transformers' attention interface, the CLIP tower as torch_ref's fused-QKV attention."""
        from vlmx.torch_ref.clip import make_fused_vision_attn

        hf_attention.set_attention(model, attention)
        make_fused_vision_attn(model.model.vision_tower)
        self.set_attn_impl(model.model.vision_tower, attention)
        return model

    def set_attn_impl(self, module: nn.Module, attention: str) -> None:
        """Set ``attn_impl`` on every torch_ref attention module below ``module``."""
        for m in module.modules():
            if hasattr(m, "attn_impl"):
                m.attn_impl = self.ATTN_IMPL[attention]

    def quantizes_vision(self, precision: str) -> bool:
        """True when ``prepare`` already put a W8A8 vision encoder in (no graph-level quantization needed)."""
        return False

    #: Whether :meth:`smooth_language_model` smooths (so ``--calib DIR`` has something to calibrate).
    smooths_lm = True

    def smooth_language_model(self, model: nn.Module, precision: str, calib_ids: torch.Tensor | None = None,
                              skip=None, calib_embeds: list | None = None):
        """Under ``w8a8``: SmoothQuant-smooth the language model's float weights in place (the function is
        unchanged; insert_quant then quantizes the smoothed linears) and return the plan (α per group, per-linear
        calibrated errors, the skip list of linears to keep float); else None. Calibration data: ``calib_embeds``
        (``[S_i, H]`` per sample, from ``--calib DIR``: :mod:`vlmx.export.calib_data`), else ``calib_ids``, else the
        built-in pydoc-topics text (UTF-8 bytes modulo the vocabulary: presets have no tokenizer).
        ``skip``: module names to keep float instead of the calibrated choice (which adds ``lm_head``)."""
        if precision != "w8a8":
            return None
        from vlmx.torch_ref import lm_w8a8

        if calib_ids is None and calib_embeds is None:
            calib_ids = lm_w8a8.calibration_ids(vocab_size=self.lm_dims(model)["vocab_size"],
                                                seq_len=lm_w8a8.EXPORT_CALIB[1], num_seqs=lm_w8a8.EXPORT_CALIB[0])
        plan = lm_w8a8.calibrate(model, None if calib_embeds is not None else calib_ids,
                                 skip=None if skip is None else list(skip), inputs_embeds=calib_embeds)
        if skip is None:  # measured on SmolLM2: an int8 lm_head costs 0.57 perplexity points (bench/results)
            plan.skip = [*plan.skip, *lm_w8a8.EXPORT_FLOAT]
        return plan

    def ops_used(self, attention: str, precision: str) -> list[str]:
        """vlmx ops the export will contain (before quantization passes add theirs)."""
        ops = {"TokenImportance", "GatherTopK"}
        if attention == "plugin":
            ops.add("FlashAttention")
        if precision == "w8a8":
            ops |= {"W8A8Linear", "QuantizePerToken"}
        return sorted(o for o in ops if o in OPS)

    # ------------------------------------------------------------------------------------------- model facts
    def lm_dims(self, model) -> dict:
        c = model.config.text_config
        heads = c.num_attention_heads
        return {"lm_hidden": c.hidden_size, "num_layers": c.num_hidden_layers, "num_heads": heads,
                "num_kv_heads": getattr(c, "num_key_value_heads", None) or heads,
                "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads, "vocab_size": c.vocab_size}

    def model_info(self, ctx: ExportContext) -> dict:
        s, c = ctx.spec, ctx.model.config
        return {"vision": self.vision, "language": self.language, "image_size": s.image_size,
                "num_image_tokens": s.num_image_tokens, "has_cls": s.has_cls, **self.lm_dims(ctx.model),
                "bos_token_id": c.text_config.bos_token_id, "eos_token_id": c.text_config.eos_token_id,
                "image_token_id": c.image_token_id, "position_ids": self.position_ids, "max_seq_len": s.max_seq_len,
                "dtype": str(ctx.dtype).removeprefix("torch.")}

    #: ``(tower, hidden_states, layer) -> (q, k, scale)`` of the [CLS] attention; None: the CLIP layout
    cls_qk = None

    def score_modules(self, model):
        """(input norm, q projection, k projection) of LM layer 0."""
        layer = model.model.language_model.layers[0]
        return layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj

    # ------------------------------------------------------------------------------------------- graphs
    def graphs(self, ctx: ExportContext) -> list[GraphSpec]:
        return [self.vision_graph(ctx), self.embed_graph(ctx), self.score_graph(ctx), self.prune_graph(ctx),
                self.lm_graph(ctx)]

    def _randn(self, ctx, salt, *shape, std=1.0):
        return (torch.randn(*shape, generator=ctx.generator(salt)) * std).to(ctx.dtype)

    def _embeds(self, ctx, salt, batch, length):
        vocab = ctx.model.config.text_config.vocab_size
        ids = torch.randint(0, vocab, (batch, length), generator=ctx.generator(salt))
        embed = ctx.model.get_input_embeddings()
        with torch.no_grad():  # the model may already be on the GPU (the torch backend builds its graphs there)
            return embed(ids.to(embed.weight.device))

    def _profile(self, ctx, shapes: dict[str, tuple]) -> dict:
        """min/opt/max per input from ``{input: ((min...), (opt...), (max...))}``."""
        return {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in shapes.items()}

    def vision_graph(self, ctx):
        s, b = ctx.spec, DUMMY["batch"]
        has_cls = s.has_cls
        module = graphs.VisionGraph(ctx.model.model.vision_tower, ctx.model.model.multi_modal_projector,
                                    s.feature_layer, drop_cls=has_cls and s.select_strategy == "default",
                                    cls_attention=has_cls, cls_qk=self.cls_qk)
        px = (3, s.image_size, s.image_size)
        return GraphSpec("vision", module, {"pixel_values": self._randn(ctx, 1, b, *px)},
                         ["image_features"] + (["cls_attention"] if has_cls else []),
                         {"pixel_values": {0: "batch"}},
                         self._profile(ctx, {"pixel_values": ((1, *px), (1, *px), (ctx.max_batch, *px))}))

    def embed_graph(self, ctx):
        b, n, max_seq = DUMMY["batch"], DUMMY["seq"], ctx.seq_len
        vocab = ctx.model.config.text_config.vocab_size
        ids = torch.randint(0, vocab, (b, n), generator=ctx.generator(2))
        return GraphSpec("embed", graphs.EmbedGraph(ctx.model.get_input_embeddings()), {"input_ids": ids}, ["inputs_embeds"],
                         {"input_ids": {0: "batch", 1: "seq"}},
                         self._profile(ctx, {"input_ids": ((1, 1), (1, 64), (ctx.max_batch, max_seq))}))

    def score_graph(self, ctx):
        d = self.lm_dims(ctx.model)
        b, t, n, c = DUMMY["batch"], DUMMY["text_len"], ctx.spec.num_image_tokens, d["lm_hidden"]
        norm, q, k = self.score_modules(ctx.model)
        module = graphs.ScoreGraph(norm, q, k, d["num_heads"], d["num_kv_heads"], d["head_dim"])
        inputs = {"text_embeds": self._embeds(ctx, 3, b, t), "image_features": self._randn(ctx, 4, b, n, c)}
        prof = {"text_embeds": ((1, 1, c), (1, 32, c), (ctx.max_batch, ctx.seq_len, c)),
                "image_features": ((1, n, c), (1, n, c), (ctx.max_batch, n, c))}
        return GraphSpec("score", module, inputs, ["scores"],
                         {"text_embeds": {0: "batch", 1: "text_len"}, "image_features": {0: "batch"}},
                         self._profile(ctx, prof))

    def prune_graph(self, ctx):
        d = self.lm_dims(ctx.model)
        b, n, c = DUMMY["batch"], ctx.spec.num_image_tokens, d["lm_hidden"]
        scores = torch.softmax(torch.randn(b, n, generator=ctx.generator(6)), dim=-1)
        inputs = {"image_features": self._randn(ctx, 5, b, n, c), "scores": scores,
                  "keep": torch.tensor([max(1, n // 2)], dtype=torch.int64)}
        prof = {"image_features": ((1, n, c), (1, n, c), (ctx.max_batch, n, c)),
                "scores": ((1, n), (1, n), (ctx.max_batch, n)), "keep": ((1,), (1,), (1,))}
        return GraphSpec("prune", graphs.PruneGraph(), inputs, ["kept_features", "kept_index"],
                         {"image_features": {0: "batch"}, "scores": {0: "batch"}}, self._profile(ctx, prof),
                         dim_names={"u0": "keep"})

    def kv_names(self, ctx, prefix: str) -> list[str]:
        return kv_names(prefix, self.lm_dims(ctx.model)["num_layers"])

    def lm_module(self, ctx, inplace: bool = False) -> graphs.LanguageModelGraph:
        d = self.lm_dims(ctx.model)
        lm = ctx.model.model.language_model
        return graphs.LanguageModelGraph(self.decoder_class(lm, ctx.attention, d["num_layers"]), ctx.model.lm_head,
                                         d["num_layers"], self.position_ids, inplace=inplace)

    def lm_graph(self, ctx):
        """The one LM graph: a mid-generation dummy step (``new`` tokens after ``past`` cached ones, a left-padded
        second row), so prefill and decode paths are both traced by the same inputs."""
        d = self.lm_dims(ctx.model)
        b, n, p, mx, c, mb = DUMMY["batch"], DUMMY["new"], DUMMY["past"], ctx.seq_len, d["lm_hidden"], ctx.max_batch
        mask = torch.ones(b, p + n, dtype=torch.int64)
        mask[1, :2] = 0  # left padding in the second row
        inputs = {"inputs_embeds": self._embeds(ctx, 7, b, n), "attention_mask": mask}
        # The cache length is traced as a named axis (the graph reads it with Shape), so the dummy caches stay small
        # even for a 7B model; the written file fixes it to S_max (dim_values: TensorRT needs it static).
        slots = DUMMY["cache_slots"]
        for i, name in enumerate(self.kv_names(ctx, KV_PAST)):
            cache = self._randn(ctx, 100 + i, b, d["num_kv_heads"], slots, d["head_dim"])
            cache[:, :, p:] = 0  # slots past the valid prefix hold nothing yet
            inputs[name] = cache
        kv_shape = (d["num_kv_heads"], mx, d["head_dim"])
        dyn = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "kv_len"}}
        dyn.update({name: {0: "batch", 2: "max_seq_len"} for name in self.kv_names(ctx, KV_PAST)})
        opt = min(mx, ctx.spec.num_image_tokens + 32)
        kv = {name: ((1, *kv_shape), (1, *kv_shape), (mb, *kv_shape)) for name in self.kv_names(ctx, KV_PAST)}
        prefill = self._profile(ctx, {"inputs_embeds": ((1, 1, c), (1, opt, c), (mb, mx, c)),
                                      "attention_mask": ((1, 1), (1, opt), (mb, mx)), **kv})
        decode = self._profile(ctx, {"inputs_embeds": ((1, 1, c), (1, 1, c), (mb, 1, c)),
                                     "attention_mask": ((1, 2), (1, min(mx, opt + 1)), (mb, mx)), **kv})
        return GraphSpec(LM_GRAPH, self.lm_module(ctx), inputs, ["logits"] + self.kv_names(ctx, KV_PRESENT), dyn,
                         prefill, profiles={"prefill": prefill, "decode": decode}, min_opset=TENSOR_SCATTER_OPSET,
                         dim_values={"max_seq_len": mx},
                         # cache slots past the dummy's hold zeros in and out (the step writes inside the dummy)
                         reference_pad={n: (2, mx) for n in self.kv_names(ctx, KV_PAST) + self.kv_names(ctx, KV_PRESENT)})


class LlavaSiglipFamily(LlavaFamily):
    """LLaVA with a SigLIP tower: no [CLS] (no ``cls_attention`` output), every patch token kept. Under
    ``w8a8`` the encoder becomes torch_ref's W8A8 SigLIP (NormQuant / W8A8Linear / GeluQuant / QuantizePerToken)."""

    name = "llava-siglip"
    vision = "siglip"

    def prepare(self, model, attention, precision="fp16"):
        hf_attention.set_attention(model, attention)
        if self.quantizes_vision(precision):
            from vlmx.torch_ref.siglip_w8a8 import QuantSiglipEncoder

            tower = model.model.vision_tower
            inner = getattr(tower, "vision_model", tower)
            inner.encoder = QuantSiglipEncoder(inner.encoder, bsz=1, seqlen=self_tokens(inner))
            inner.encoder.use_buffer = False
            self.set_attn_impl(tower, attention)
        return model

    def quantizes_vision(self, precision: str) -> bool:
        return precision == "w8a8"


class LlavaMptFamily(LlavaFamily):
    """LLaVA with MPT: ALiBi instead of rotary positions (no ``position_ids``), fused ``Wqkv``."""

    name = "llava-mpt"
    language = "mpt"
    position_ids = False
    decoder_class = lm_decoders.MptDecoder
    _MPT_IMPL = {"plugin": "vlmx", "native": "sdpa", "decomposed": "torch"}

    def prepare(self, model, attention, precision="fp16"):
        from vlmx.torch_ref.mpt_attention import swap_mpt_attention

        super().prepare(model, attention, precision)  # CLIP tower
        return swap_mpt_attention(model, self._MPT_IMPL[attention])

    def lm_dims(self, model) -> dict:
        c = model.config.text_config
        return {"lm_hidden": c.d_model, "num_layers": c.n_layers, "num_heads": c.n_heads,
                "num_kv_heads": c.n_heads, "head_dim": c.d_model // c.n_heads, "vocab_size": c.vocab_size}

    smooths_lm = False

    def smooth_language_model(self, model, precision, calib_ids=None, skip=None, calib_embeds=None):
        """MPT blocks are not Llama-shaped (fused Wqkv, LayerNorm without a foldable pair): linears are quantized
        as they are."""
        return None

    def score_modules(self, model):
        block = model.model.language_model.blocks[0]
        c = self.lm_dims(model)["lm_hidden"]
        wqkv = block.attn.Wqkv
        return block.norm_1, SliceProj(wqkv, 0, c), SliceProj(wqkv, c, 2 * c)


def _dinov2_cls_qk(tower, hidden, li):
    """Queries and keys of DINOv2 layer ``li`` (pre-norm ``norm1``, ``attention.q_proj`` / ``k_proj``)."""
    layer = tower.encoder.layer[li]
    x = layer.norm1(hidden[li])
    attn = layer.attention
    b, s, _ = x.shape
    h, d = attn.num_attention_heads, attn.head_dim
    q = attn.q_proj(x).view(b, s, h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, h, d).transpose(1, 2)
    return q, k, attn.scaling


class LlavaDinov2Family(LlavaFamily):
    """LLaVA with a DINOv2 tower (llava-micro): [CLS] kept by the tower and dropped by the feature selection, its
    attention read from DINOv2's own layers; the tower keeps transformers' modules (attention through the
    interface, so ``--attention`` covers it too); the Llama LM may use GQA."""

    name = "llava-dinov2"
    vision = "dinov2"

    def prepare(self, model, attention, precision="fp16"):
        hf_attention.set_attention(model, attention)
        return model

    @staticmethod
    def cls_qk(tower, hidden, li):
        return _dinov2_cls_qk(tower, hidden, li)


def self_tokens(vision_model) -> int:
    """Tokens per image of a transformers vision model (patches, plus [CLS] where it has one)."""
    emb = vision_model.embeddings
    return int(getattr(emb, "num_positions", None) or emb.num_patches)


FAMILIES: dict[str, LlavaFamily] = {f.name: f for f in (LlavaFamily(), LlavaSiglipFamily(), LlavaMptFamily(),
                                                         LlavaDinov2Family())}


def family_for(spec) -> LlavaFamily:
    """The family config whose vision tower and language model match the preset spec."""
    for fam in FAMILIES.values():
        if (fam.vision, fam.language) == (spec.vision, spec.language):
            return fam
    raise ValueError(f"preset {spec.name} pairs a {spec.vision} tower with a {spec.language} language model; "
                     f"vlm-export knows {[(f.vision, f.language) for f in FAMILIES.values()]}")

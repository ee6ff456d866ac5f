"""W8A8 language model, SmoothQuant-style, on the vlmx ops (Llama-shaped decoders: Llama, Mistral, Qwen2, SmolLM2).

Every linear of a decoder layer becomes :class:`W8A8Linear`: ``vlmx::quantize_per_token`` of the input (dynamic
per-token scale) then ``vlmx::w8a8_linear`` (int8 weight, per-output-channel scale; the W8A8 SigLIP machinery of
:mod:`vlmx.torch_ref.siglip_w8a8`). Before that, SmoothQuant migrates activation outliers into the weights with
per-input-channel factors ``s_j = max|X_j|^α / max|W_j|^(1-α)``, folded where the division is exact::

    input_layernorm.weight / s     →  q_proj, k_proj, v_proj  · s   (group "qkv")
    v_proj rows / s (per KV head)  →  o_proj                 · s   (group "o"; GQA: one s per KV channel)
    post_attention_layernorm / s   →  gate_proj, up_proj     · s   (group "gate_up")
    up_proj rows / s               →  down_proj              · s   (group "down": act(gate)·up is linear in up)

The float model computes the same function after smoothing; only the quantization error changes.

:func:`calibrate` streams the calibration tokens through the decoder one layer at a time (only the hidden states
of one layer and the inputs of its linears are held, so a 7B model calibrates in the memory of its weights). Per
layer and group it picks α from a grid (``None`` = no smoothing is a candidate) by the relative error of the
group's int8 output vs float on the calibration activations, applies the smoothing in place, and records each
linear's error; linears whose error stays above ``skip_threshold`` (at most ``max_skip``, worst first) go on the
skip list and stay float. ``skip=[names]`` overrides the automatic choice. :func:`quantize_linears` then swaps the
linears; ``quantize_lm`` does both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops  # noqa: F401  (defines torch.ops.vlmx.*)
from .siglip_w8a8 import W8A8OF16LinearDynamicInputScale

__all__ = ["ALPHAS", "SmoothQuantPlan", "W8A8Linear", "calibrate", "calibration_text", "calibration_ids",
           "decoder_parts", "quantize_linears", "quantize_lm"]

#: α grid of the calibration search (``None``: no smoothing).
ALPHAS = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Linears whose calibrated relative output error exceeds this stay float (automatic skip list).
SKIP_THRESHOLD = 0.10
#: Smoothing factors are clamped into this range (keeps norm weights finite in float16).
S_RANGE = (1e-3, 1e3)
#: Characters of the built-in calibration text: ``pydoc_data.topics`` from this offset on (the evaluation text of
#: bench/w8a8_real_weights.py starts after CALIB_CHARS, so calibration and evaluation never overlap).
CALIB_OFFSET, CALIB_CHARS = 0, 12_000
#: (sequences, tokens) of the export's default calibration.
EXPORT_CALIB = (4, 128)
#: Linears the export keeps float on top of the calibrated skip list (lm_head: +0.57 perplexity points on SmolLM2).
EXPORT_FLOAT = ("lm_head",)


class W8A8Linear(nn.Module):
    """``x → vlmx::quantize_per_token → vlmx::w8a8_linear``: a drop-in for ``nn.Linear`` (output in x's dtype)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        out = "float16" if linear.weight.dtype == torch.float16 else "float32"
        self.inner = W8A8OF16LinearDynamicInputScale.from_linear(linear, out_dtype=out)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = torch.ops.vlmx.quantize_per_token(x)
        return self.inner(q, s).to(x.dtype)


def quantize_linears(module: nn.Module, skip=(), include=None) -> list[str]:
    """Swap every ``nn.Linear`` below ``module`` (names relative to it) for :class:`W8A8Linear`, except the names
    in ``skip``; ``include(name)`` further limits which are swapped. Returns the swapped names."""
    skip = set(skip)
    done = []
    for name, sub in list(module.named_modules()):
        if isinstance(sub, nn.Linear) and name not in skip and (include is None or include(name)):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, W8A8Linear(sub))
            done.append(name)
    return done


# ---------------------------------------------------------------------------------------------- calibration data
def calibration_text(offset: int = CALIB_OFFSET, chars: int = CALIB_CHARS) -> str:
    """A fixed slice of English text that ships with every Python (``pydoc_data.topics``, the language reference)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[offset:offset + chars]


def calibration_ids(tokenizer=None, vocab_size: int | None = None, seq_len: int = 256, num_seqs: int = 4,
                    text: str | None = None) -> torch.Tensor:
    """``[num_seqs, seq_len]`` token ids of ``text`` (default :func:`calibration_text`). With a ``tokenizer``,
    its ids; without one (random-weight presets), the text's UTF-8 bytes modulo ``vocab_size``."""
    text = calibration_text() if text is None else text
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif vocab_size:
        ids = [b % vocab_size for b in text.encode()]
    else:
        raise ValueError("calibration_ids needs a tokenizer or the vocab_size of the model")
    need = seq_len * num_seqs
    if len(ids) < need:
        raise ValueError(f"calibration text has {len(ids)} tokens, {need} needed ({num_seqs} × {seq_len}); pass "
                         "more text or fewer/shorter sequences")
    return torch.tensor(ids[:need], dtype=torch.int64).view(num_seqs, seq_len)


# ---------------------------------------------------------------------------------------------- model access
def decoder_parts(model: nn.Module):
    """(embed_tokens, layers, rotary_emb) of a Llama-shaped causal LM (``LlamaForCausalLM``, a LLaVA model, or the
    bare decoder)."""
    for cand in (getattr(getattr(model, "model", None), "language_model", None), getattr(model, "model", None),
                 model):
        if cand is not None and hasattr(cand, "layers") and hasattr(cand, "embed_tokens"):
            layer = cand.layers[0]
            if not (hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj")
                    and hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj")):
                break
            return cand.embed_tokens, cand.layers, cand.rotary_emb
    raise TypeError(f"{type(model).__name__} is not a Llama-shaped decoder (layers with self_attn.q/k/v/o_proj and "
                    "mlp.gate/up/down_proj); W8A8 smoothing knows only those")


def _prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    return next(n for n, m in model.named_modules() if m is layers)


# ---------------------------------------------------------------------------------------------- error and scales
def _fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 round trip (the op's rounding), fp32."""
    from .reference import quantize_rows

    q, s = quantize_rows(x)
    return q.float() * s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def group_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None,
                refs: list[torch.Tensor] | None = None) -> tuple[float, list[float]]:
    """Relative error of ``int8(x / s) @ int8(W · s)^T`` vs ``x @ W^T`` (all of the group, then per weight);
    ``refs``: the float products, when already computed."""
    xs = x if s is None else x / s
    xq = _fake_quant_rows(xs)
    refs = refs if refs is not None else [x @ w.t() for w in weights]
    outs = []
    for w in weights:
        ws = w if s is None else w * s
        outs.append(xq @ _fake_quant_rows(ws).t())
    return _rel(torch.cat(outs, -1), torch.cat(refs, -1)), [_rel(o, r) for o, r in zip(outs, refs)]


def smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp(*S_RANGE)


@dataclass
class SmoothQuantPlan:
    """What calibration chose: α per ``layer.group`` (None = not smoothed), each linear's calibrated relative error
    (``name → error``, names relative to the model), the skip list, and the calibration size."""

    alphas: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    tokens: int = 0
    smooth: bool = True

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "errors": self.errors, "skip": self.skip, "tokens": self.tokens,
                "smooth": self.smooth}


@dataclass
class Group:
    """Linears that read one activation, and where its smoothing factors fold. ``fold(s)`` divides the producer
    (a norm's weight and bias, or a linear's output rows) by ``s`` given in fold space; ``reduce`` maps an
    input-space per-channel statistic to fold space and ``expand`` maps factors back (GQA: one factor per KV
    channel, shared by the query heads that read it). ``fold=None``: not smoothable."""

    name: str
    linears: list
    fold: object = None
    reduce: object = staticmethod(lambda t: t)
    expand: object = staticmethod(lambda t: t)


def _fold_rows(prev: nn.Linear):
    def fold(s):
        prev.weight.data.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    return fold


def _fold_norm(norm: nn.Module):
    def fold(s):
        norm.weight.data.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.data.div_(s.to(norm.bias.dtype))
    return fold


def _kv_maps(num_heads: int, num_kv_heads: int, head_dim: int):
    rep = num_heads // num_kv_heads
    return (lambda v: v.view(num_kv_heads, rep, head_dim).amax(1).reshape(-1),
            lambda s: s.view(num_kv_heads, 1, head_dim).expand(num_kv_heads, rep, head_dim).reshape(-1))


def llama_groups(layer, num_heads: int, num_kv_heads: int) -> list[Group]:
    """Smoothing groups of a Llama decoder layer, in the order smoothing must run (o before qkv, down before
    gate_up: folding into v_proj / up_proj rows changes the weights the later group quantizes)."""
    a, m = layer.self_attn, layer.mlp
    head_dim = a.o_proj.in_features // num_heads
    reduce, expand = _kv_maps(num_heads, num_kv_heads, head_dim)
    gqa_ok = a.v_proj.out_features == num_kv_heads * head_dim
    return [Group("o", [a.o_proj], _fold_rows(a.v_proj) if gqa_ok else None, reduce, expand),
            Group("qkv", [a.q_proj, a.k_proj, a.v_proj], _fold_norm(layer.input_layernorm)),
            Group("down", [m.down_proj], _fold_rows(m.up_proj)),
            Group("gate_up", [m.gate_proj, m.up_proj], _fold_norm(layer.post_attention_layernorm))]


def dinov2_groups(layer) -> list[Group]:
    """Pre-LN ViT layer (transformers ``Dinov2Layer``): v→o, norm1→qkv, norm2→fc1 (LayerNorm weight and bias);
    fc2 reads GELU(fc1), where nothing folds."""
    a, m = layer.attention, layer.mlp
    return [Group("o", [a.o_proj], _fold_rows(a.v_proj)),
            Group("qkv", [a.q_proj, a.k_proj, a.v_proj], _fold_norm(layer.norm1)),
            Group("fc1", [m.fc1], _fold_norm(layer.norm2)), Group("fc2", [m.fc2])]


def bert_groups(layer) -> list[Group]:
    """Post-LN BERT layer: only v→o folds (the LayerNorm outputs are also the residual stream)."""
    a = layer.attention
    return [Group("o", [a.output.dense], _fold_rows(a.self.value)),
            Group("qkv", [a.self.query, a.self.key, a.self.value]), Group("fc1", [layer.intermediate.dense]),
            Group("fc2", [layer.output.dense])]


def smooth_group(group: Group, x: torch.Tensor, alphas=ALPHAS) -> tuple[float | None, list[float]]:
    """Pick α for ``group`` (by the int8 output error on its float input ``x [T, K]``), fold the factors in place;
    returns (α or None, each linear's relative error at that α)."""
    ws = [lin.weight.float() for lin in group.linears]
    act_max, w_max = x.abs().amax(0), torch.stack([w.abs().amax(0) for w in ws]).amax(0)
    best = (math.inf, None, None, None)
    refs = [x @ w.t() for w in ws]
    for alpha in alphas if group.fold is not None else [None]:
        s_fold = None if alpha is None else smooth_scales(group.reduce(act_max), group.reduce(w_max), alpha)
        err, per = group_error(x, ws, None if s_fold is None else group.expand(s_fold), refs)
        if err < best[0]:
            best = (err, alpha, s_fold, per)
    _, alpha, s_fold, per = best
    if s_fold is not None:
        group.fold(s_fold)
        s = group.expand(s_fold)
        for lin in group.linears:
            lin.weight.data.mul_(s.to(lin.weight.dtype)[None, :])
    return alpha, per


def _causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _capture(linears):
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [lin.register_forward_hook(lambda mod, inp, out: seen.setdefault(mod, []).append(inp[0].detach()))
             for lin in linears]
    return seen, hooks


@torch.no_grad()
def calibrate(model: nn.Module, input_ids: torch.Tensor, alphas=ALPHAS, smooth: bool = True, skip=None,
              skip_threshold: float = SKIP_THRESHOLD, max_skip: int | None = None) -> SmoothQuantPlan:
    """Choose and apply (in place, on the float weights) SmoothQuant factors layer by layer; returns the plan.

    ``input_ids [B, S]``: calibration tokens (:func:`calibration_ids`). ``smooth=False`` measures without
    smoothing. ``skip``: explicit skip list (names relative to ``model``); None = automatic (``skip_threshold``,
    at most ``max_skip``). Streams one layer at a time: memory beyond the weights is one layer's activations.
    """
    embed, layers, rotary = decoder_parts(model)
    prefix = _prefix(model, layers)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    h = embed(input_ids).float()
    b, n = input_ids.shape
    pos = torch.arange(n).expand(b, n)
    pos_emb = rotary(h, pos)
    mask = _causal_mask(n, h.dtype)
    plan = SmoothQuantPlan(tokens=b * n, smooth=smooth)
    for li, layer in enumerate(layers):
        dtype = next(layer.parameters()).dtype
        layer.float()  # one layer in float32 at a time: exact statistics, fast CPU GEMMs, bounded memory
        groups = llama_groups(layer, heads, kv_heads)
        seen, hooks = _capture([g.linears[0] for g in groups])
        try:
            out = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos)
        finally:
            for hk in hooks:
                hk.remove()
        h = out[0] if isinstance(out, tuple) else out
        _smooth_layer(plan, f"{prefix}.{li}", layer, groups, seen, alphas if smooth else (None,))
        layer.to(dtype)
        del seen
    return _finish(plan, skip, skip_threshold, max_skip)


def _smooth_layer(plan, name, layer, groups, seen, alphas) -> None:
    for g in groups:
        x = torch.cat([t.reshape(-1, g.linears[0].in_features) for t in seen[g.linears[0]]]).float()
        alpha, per = smooth_group(g, x, alphas)
        plan.alphas[f"{name}.{g.name}"] = alpha
        for lin, e in zip(g.linears, per):
            plan.errors[f"{name}.{_leaf(layer, lin)}"] = e


def _finish(plan, skip, skip_threshold, max_skip):
    if skip is not None:
        plan.skip = list(skip)
    else:
        bad = sorted(((e, k) for k, e in plan.errors.items() if e > skip_threshold), reverse=True)
        plan.skip = [k for _, k in (bad[:max_skip] if max_skip is not None else bad)]
    return plan


ENCODERS = {"dinov2": dinov2_groups, "bert": bert_groups}


@torch.no_grad()
def calibrate_encoder(model: nn.Module, layers: nn.ModuleList, family: str, inputs: dict, alphas=ALPHAS,
                      smooth: bool = True, skip=None, skip_threshold: float = SKIP_THRESHOLD,
                      max_skip: int | None = None) -> SmoothQuantPlan:
    """:func:`calibrate` for small encoders (``family``: one of :data:`ENCODERS`): one forward over ``inputs``
    captures every linear's input (smoothing preserves the float function, so they stay valid), then each layer's
    groups are smoothed in order."""
    if family not in ENCODERS:
        raise ValueError(f"encoder family {family!r} is not known; choose one of {sorted(ENCODERS)}")
    prefix = _prefix(model, layers)
    all_groups = [ENCODERS[family](layer) for layer in layers]
    seen, hooks = _capture([g.linears[0] for gs in all_groups for g in gs])
    try:
        model(**inputs)
    finally:
        for hk in hooks:
            hk.remove()
    plan = SmoothQuantPlan(tokens=int(next(iter(seen.values()))[0].shape[:-1].numel()), smooth=smooth)
    for li, (layer, groups) in enumerate(zip(layers, all_groups)):
        _smooth_layer(plan, f"{prefix}.{li}", layer, groups, seen, alphas if smooth else (None,))
    return _finish(plan, skip, skip_threshold, max_skip)


def _leaf(layer: nn.Module, lin: nn.Module) -> str:
    return next(n for n, m in layer.named_modules() if m is lin)


def quantize_lm(model: nn.Module, input_ids: torch.Tensor, lm_head: bool = False, **calib) -> SmoothQuantPlan:
    """:func:`calibrate` then :func:`quantize_linears` on the decoder layers (and ``lm_head`` when asked); the
    skip list stays float. Returns the plan."""
    _, layers, _ = decoder_parts(model)
    prefix = _prefix(model, layers)
    plan = calibrate(model, input_ids, **calib)
    quantize_linears(model, plan.skip,
                     include=lambda n: n.startswith(prefix + ".") or (lm_head and n.endswith("lm_head")))
    return plan

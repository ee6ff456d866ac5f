"""The vlmx custom-op contract: every op defined once.

Domain ``vlmx``, opset version 1. The torch ops (``vlmx::<torch_name>``), the ONNX emission and function bodies,
the TensorRT plugin creators, the manifest validation and the docs all read :data:`OPS`. Extend the table; never
fork it.

Type variables follow ONNX: ``T`` is a float type (float16 or float32, the same for every input/output that names
it); ``int8``, ``int64``, ``float32`` are fixed. Per-token scales are always float32 of shape ``[..., 1]``.

Attribute kinds map to ONNX attribute types and to TensorRT PluginField types:
``int`` → INT → int32, ``float`` → FLOAT → float32, ``string`` → STRING → char. Booleans are ``int`` 0/1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DOMAIN = "vlmx"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "vlmx"
PLUGIN_VERSION = "1"

#: Activation clip range used by the W8A8 SigLIP reference (tinychat's CLIP_RANGE).
CLIP_RANGE = 5.0
#: Floor on max|x| before dividing by 127, so an all-zero token gets a finite scale (and q = 0).
QUANT_EPS = 1e-6
#: Every int8 quantizer rounds x / scale half-to-even (division, not multiplication by 1/scale) into [-127, 127].
QMAX = 127

FLOAT_TYPES = ("float16", "float32")
TYPE_VARS = {"T": FLOAT_TYPES}

ATTR_KINDS = ("int", "float", "string")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype (a type variable like ``T`` or a fixed dtype), optional flag, meaning.

    ``shape_input``: the tensor's values define output dimensions, so TensorRT passes it to the plugin as a shape
    input (the node carries ``tensorrt_plugin_shape_input_indices``), not as a device tensor.
    """

    name: str
    dtype: str
    doc: str
    optional: bool = False
    shape_input: bool = False

    def dtypes(self) -> tuple[str, ...]:
        """The concrete dtypes this tensor may take."""
        return TYPE_VARS.get(self.dtype, (self.dtype,))


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: name, kind (``int``/``float``/``string``), default (None = required), meaning, allowed values."""

    name: str
    kind: str
    default: int | float | str | None
    doc: str
    choices: tuple = ()

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"attribute {self.name}: kind {self.kind!r} not in {ATTR_KINDS}")


@dataclass(frozen=True)
class OpSpec:
    """One vlmx op: ONNX name, torch name, inputs, outputs, attributes, and the semantics in one paragraph."""

    name: str
    torch_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[AttrSpec, ...]
    doc: str
    tags: tuple[str, ...] = field(default=())

    def __post_init__(self):
        for i, t in enumerate(self.inputs):
            if t.shape_input and any(u.optional for u in self.inputs[:i]):
                raise ValueError(f"{self.name}.{t.name}: a shape input must not follow optional inputs (its index "
                                 "on the node would vary)")

    @property
    def shape_input_indices(self) -> list[int]:
        """Node input indices TensorRT passes to the plugin as shape inputs."""
        return [i for i, t in enumerate(self.inputs) if t.shape_input]

    @property
    def qualified_torch_name(self) -> str:
        return f"{DOMAIN}::{self.torch_name}"

    def attr(self, name: str) -> AttrSpec:
        for a in self.attrs:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no attribute {name!r}; it has {[a.name for a in self.attrs]}")

    def defaults(self) -> dict:
        """Attribute defaults (required attributes are absent)."""
        return {a.name: a.default for a in self.attrs if a.default is not None}

    def validate_attrs(self, attrs: dict) -> dict:
        """Fill defaults, reject unknown/missing attributes and values outside ``choices``. Returns the full dict."""
        unknown = set(attrs) - {a.name for a in self.attrs}
        if unknown:
            raise ValueError(f"vlmx.{self.name}: unknown attribute(s) {sorted(unknown)}; "
                             f"expected some of {[a.name for a in self.attrs]}")
        out = {}
        for a in self.attrs:
            if a.name in attrs:
                v = attrs[a.name]
            elif a.default is not None:
                v = a.default
            else:
                raise ValueError(f"vlmx.{self.name}: attribute {a.name!r} is required ({a.doc})")
            if a.kind == "int":
                v = int(v)
            elif a.kind == "float":
                v = float(v)
            else:
                v = str(v)
            if a.choices and v not in a.choices:
                raise ValueError(f"vlmx.{self.name}: {a.name}={v!r} is not allowed; choose one of {list(a.choices)}")
            out[a.name] = v
        return out


def _t(name, dtype, doc, optional=False, shape_input=False):
    return TensorSpec(name, dtype, doc, optional, shape_input)


def _a(name, kind, default, doc, choices=()):
    return AttrSpec(name, kind, default, doc, tuple(choices))


ATTENTION_LAYOUTS = ("bsd", "bhsd", "packed")
NORM_MODES = ("layernorm", "rmsnorm")
GELU_APPROX = ("none", "tanh")

FLASH_ATTENTION = OpSpec(
    name="FlashAttention",
    torch_name="flash_attention",
    inputs=(
        _t("q", "T", "queries: [B,Sq,H*D] (bsd), [B,H,Sq,D] (bhsd), or packed qkv [B,S,(H+2*Hkv)*D] (packed)"),
        _t("k", "T", "keys: [B,Sk,Hkv*D] (bsd) or [B,Hkv,Sk,D] (bhsd); absent for packed", optional=True),
        _t("v", "T", "values, same layout as k; absent for packed", optional=True),
        _t("bias", "T", "additive bias broadcastable to [B,H,Sq,Sk] (padding masks as -inf/-1e4 rows)",
           optional=True),
        _t("kv_len", "int64", "[B] valid keys per row of a fixed-size KV cache: keys j >= kv_len[b] are ignored, "
           "causal and ALiBi align to kv_len[b] instead of Sk (bhsd/bsd layouts)", optional=True),
    ),
    outputs=(_t("o", "T", "output: [B,Sq,H*D] for bsd/packed, [B,H,Sq,D] for bhsd"),),
    attrs=(
        _a("num_heads", "int", None, "query heads H"),
        _a("num_kv_heads", "int", 0, "key/value heads Hkv (0 = num_heads); must divide num_heads (GQA/MQA)"),
        _a("head_dim", "int", None, "head dimension D"),
        _a("scale", "float", 0.0, "softmax scale; 0 means 1/sqrt(head_dim)"),
        _a("causal", "int", 0, "1: query i sees keys j <= i + (L - Sq) (bottom-right aligned for KV caches; "
           "L = kv_len[b] when given, else Sk)"),
        _a("window", "int", -1, "sliding window: query i sees keys j > i + (L - Sq) - window; -1 = unlimited"),
        _a("alibi", "int", 0, "1: add ALiBi bias slope_h * (j - (L-1)) with MPT gen_slopes(num_heads, 8)"),
        _a("alibi_bias_max", "int", 8, "alibi_bias_max passed to gen_slopes"),
        _a("layout", "string", "bsd", "tensor layout", ATTENTION_LAYOUTS),
    ),
    doc="softmax(scale * q k^T + bias + alibi, masked by causal/window/kv_len) v, fp32 accumulation, output in T. "
        "With kv_len, k/v are a fixed-size cache [B,Hkv,S_max,D] of which only the first kv_len[b] slots are read.",
    tags=("attention",),
)

W8A8_LINEAR = OpSpec(
    name="W8A8Linear",
    torch_name="w8a8_linear",
    inputs=(
        _t("x", "int8", "quantized activations [..., K]"),
        _t("x_scale", "float32", "per-token scale [..., 1]"),
        _t("w", "int8", "quantized weight [N, K] (per output channel symmetric)"),
        _t("w_scale", "float32", "per-output-channel scale [N]"),
        _t("bias", "T", "bias [N]", optional=True),
    ),
    outputs=(_t("y", "T", "y[..., n] = (sum_k x[..., k] * w[n, k]) * x_scale[...] * w_scale[n] + bias[n]"),),
    attrs=(_a("out_dtype", "string", "float16", "dtype of y when no bias fixes it", FLOAT_TYPES),),
    doc="W8A8OF16LinearDynamicInputScale: exact int32 accumulation, then per-token x per-channel scaling.",
    tags=("gemm", "int8"),
)

QUANTIZE_PER_TOKEN = OpSpec(
    name="QuantizePerToken",
    torch_name="quantize_per_token",
    inputs=(_t("x", "T", "activations [..., C]"),),
    outputs=(
        _t("q", "int8", "round_half_even(x / scale) clamped to [-127, 127]"),
        _t("scale", "float32", "per-token scale [..., 1] = max(max|x|, QUANT_EPS) / 127"),
    ),
    attrs=(_a("clip_range", "float", 0.0, "if > 0, x is clamped to [-clip_range, clip_range] first"),),
    doc="Dynamic symmetric per-token int8 quantization.",
    tags=("quant",),
)

GELU_QUANT = OpSpec(
    name="GeluQuant",
    torch_name="gelu_quant",
    inputs=(_t("x", "T", "pre-activation [..., C]"),),
    outputs=(_t("q", "int8", "per-token int8 of gelu(x)"), _t("scale", "float32", "per-token scale [..., 1]")),
    attrs=(
        _a("approximate", "string", "tanh", "GELU variant (SigLIP uses tanh)", GELU_APPROX),
        _a("clip_range", "float", 0.0, "if > 0, gelu(x) is clamped to [-clip_range, clip_range] before quantizing"),
    ),
    doc="gelu_and_quant: GELU (computed in fp32) fused with per-token quantization of the fp32 result.",
    tags=("quant",),
)

NORM_QUANT = OpSpec(
    name="NormQuant",
    torch_name="norm_quant",
    inputs=(
        _t("x", "T", "hidden states [..., C]"),
        _t("weight", "T", "norm weight [C]"),
        _t("bias", "T", "norm bias [C] (layernorm; ignored for rmsnorm)", optional=True),
    ),
    outputs=(
        _t("q", "int8", "int8 of norm(x) (per-token scale, or per-tensor static_scale)"),
        _t("scale", "float32", "per-token scale [..., 1] (per-tensor: static_scale broadcast)"),
        _t("sum", "float32", "per-token sum of the dequantized row, sum_c q*scale [..., 1]", optional=True),
    ),
    attrs=(
        _a("mode", "string", "layernorm", "layernorm (mean-centred, SigLIP) or rmsnorm", NORM_MODES),
        _a("eps", "float", 1e-6, "variance epsilon"),
        _a("per_token", "int", 1, "1: dynamic per-token scale; 0: static per-tensor static_scale"),
        _a("static_scale", "float", 1.0, "per-tensor scale used when per_token = 0"),
        _a("clip_range", "float", 0.0, "if > 0, norm(x) is clamped to [-clip_range, clip_range] first"),
    ),
    doc="RMSNormGeneral: LayerNorm/RMSNorm (fp32 statistics) fused with int8 quantization.",
    tags=("quant", "norm"),
)

TOKEN_IMPORTANCE = OpSpec(
    name="TokenImportance",
    torch_name="token_importance",
    inputs=(
        _t("q_text", "T", "text queries [B, Tq, H*D]"),
        _t("k_vis", "T", "visual keys [B, N, Hkv*D]"),
    ),
    outputs=(_t("scores", "float32", "[B, N]: mean over heads and text tokens of softmax_N(scale q k^T)"),),
    attrs=(
        _a("num_heads", "int", None, "query heads H"),
        _a("num_kv_heads", "int", 0, "key heads (0 = num_heads)"),
        _a("head_dim", "int", None, "head dimension D"),
        _a("scale", "float", 0.0, "0 means 1/sqrt(head_dim)"),
    ),
    doc="Visual-token importance: text-query to visual-key attention, softmax over visual keys, averaged.",
    tags=("prune",),
)

GATHER_TOPK = OpSpec(
    name="GatherTopK",
    torch_name="gather_topk",
    inputs=(
        _t("x", "T", "tokens [B, N, C]"),
        _t("scores", "float32", "importance [B, N]"),
        _t("keep", "int64", "number of tokens to keep, shape [1], 1 <= keep <= N (a TensorRT shape input)",
           shape_input=True),
    ),
    outputs=(
        _t("x_kept", "T", "[B, keep, C], the kept tokens in their original order"),
        _t("idx", "int64", "[B, keep] ascending indices of the kept tokens"),
    ),
    attrs=(),
    doc="Keep the `keep` highest-scoring tokens (ties: lower index first), preserving token order.",
    tags=("prune",),
)

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (FLASH_ATTENTION, W8A8_LINEAR, QUANTIZE_PER_TOKEN, GELU_QUANT, NORM_QUANT, TOKEN_IMPORTANCE,
               GATHER_TOPK)
}
OPS_BY_TORCH_NAME: dict[str, OpSpec] = {op.torch_name: op for op in OPS.values()}


#: A graph holding several variants of one op (attributes, optional inputs/outputs) names them ``<Op>``,
#: ``<Op>_v1``, ``<Op>_v2``, ... (node op_type = model-local function name): function lookup by name alone
#: (TensorRT's ONNX parser ignores the IR-10 ``overload`` field) then finds each variant's own body.
VARIANT_SEP = "_v"


def variant_op_type(name: str, index: int) -> str:
    """The node op_type / function name of variant ``index`` of op ``name`` in one graph (0 keeps the op name)."""
    if name not in OPS:
        raise KeyError(f"{name!r} is not a vlmx op; known ops: {sorted(OPS)}")
    return name if index == 0 else f"{name}{VARIANT_SEP}{index}"


def op_for_type(op_type: str) -> OpSpec:
    """The op of a vlmx node op_type: the op name itself or a variant name ``<Op>_v<k>`` (k >= 1)."""
    if op_type in OPS:
        return OPS[op_type]
    base, sep, k = op_type.rpartition(VARIANT_SEP)
    if sep and k.isdigit() and int(k) >= 1 and base in OPS:
        return OPS[base]
    raise KeyError(f"{op_type!r} is neither a vlmx op nor a variant name <Op>{VARIANT_SEP}<k>; "
                   f"known ops: {sorted(OPS)}")


def get_op(name: str) -> OpSpec:
    """Look up an op by ONNX name (``FlashAttention``) or torch name (``flash_attention``)."""
    if name in OPS:
        return OPS[name]
    if name in OPS_BY_TORCH_NAME:
        return OPS_BY_TORCH_NAME[name]
    raise KeyError(f"{name!r} is not a vlmx op; known ops: {sorted(OPS)}")


def markdown_table() -> str:
    """The op table as Markdown (for docs and manifests)."""
    lines = [f"# `{DOMAIN}` custom ops (opset {OPSET_VERSION})", ""]
    for op in OPS.values():
        lines += [f"## {op.name} (`{op.qualified_torch_name}`)", "", op.doc, "", "| kind | name | dtype | meaning |",
                  "|---|---|---|---|"]
        for t in op.inputs:
            lines.append(f"| input{'?' if t.optional else ''} | `{t.name}` | {'/'.join(t.dtypes())} | {t.doc} |")
        for t in op.outputs:
            lines.append(f"| output{'?' if t.optional else ''} | `{t.name}` | {'/'.join(t.dtypes())} | {t.doc} |")
        for a in op.attrs:
            d = "required" if a.default is None else f"default {a.default!r}"
            c = f"; one of {list(a.choices)}" if a.choices else ""
            lines.append(f"| attr | `{a.name}` | {a.kind} | {a.doc} ({d}{c}) |")
        lines.append("")
    return "\n".join(lines)

"""Standard-ONNX bodies of the vlmx ops: the reference semantics (:mod:`vlmx.torch_ref.reference`) as ONNX nodes.

Each builder takes the node's attributes (validated against the op table), which optional inputs are present and
the default-domain opset, and returns the body nodes of a model-local function whose formal inputs/outputs are the
op-table names. Bodies compute in float32 and cast back with ``CastLike`` so one body serves float16 and float32.
Attributes are baked into the body (each variant of an op in a graph gets its own function, ``<Op>`` or
``<Op>_v<k>``, see :mod:`vlmx.export.functions`), so the body needs no ``ref_attr_name`` and runs on any ONNX runtime
and in TensorRT's parser (structural attributes such as ``layout`` or ``mode`` could not be references there).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlmx.torch_ref.alibi import gen_slopes
from vlmx.torch_ref.op_table import QMAX, QUANT_EPS

_FLOAT = TensorProto.FLOAT


class BodyBuilder:
    """Appends nodes with unique intermediate names; knows the opset for ops whose signature changed."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs, outputs: int | list[str] = 1, **attrs):
        if isinstance(outputs, int):
            names = [f"_{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        else:
            names = list(outputs)
        self._n += 1
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], names, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=numpy_helper.from_array(arr))

    def ints(self, *values) -> str:
        return self.const(list(values), np.int64)

    def reduce(self, kind: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """``Reduce<kind>`` over ``axes`` (axes became an input at opset 18, ReduceSum at 13)."""
        if kind == "Sum" or self.opset >= 18:
            return self.op(f"Reduce{kind}", x, self.ints(*axes), keepdims=keepdims)
        return self.op(f"Reduce{kind}", x, axes=axes, keepdims=keepdims)

    def to_float(self, x: str) -> str:
        return self.op("Cast", x, to=_FLOAT)

    def dim(self, x: str, axis: int) -> str:
        """The size of ``x`` along ``axis`` as an int64 [1] tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def heads(self, x: str, heads: int, head_dim: int) -> str:
        """``[B, S, heads*head_dim]`` → ``[B, heads, S, head_dim]``."""
        return self.op("Transpose", self.op("Reshape", x, self.ints(0, 0, heads, head_dim)), perm=[0, 2, 1, 3])

    def repeat_heads(self, x: str, rep: int, heads: int, head_dim: int) -> str:
        """repeat_interleave over the head axis: ``[B, Hkv, S, D]`` → ``[B, Hkv*rep, S, D]``."""
        if rep == 1:
            return x
        e = self.op("Expand", self.op("Unsqueeze", x, self.ints(2)), self.ints(1, 1, rep, 1, 1))
        return self.op("Reshape", e, self.ints(0, heads, -1, head_dim))

    def quantize_rows(self, xf: str, clip_range: float, q_out: str, scale_out: str) -> None:
        """Per-token int8 of float32 ``xf``: ``scale = max(max|x|, eps)/127``, ``q = round_half_even(x/scale)``."""
        if clip_range > 0:
            xf = self.op("Clip", xf, self.const(-clip_range), self.const(clip_range))
        amax = self.reduce("Max", self.op("Abs", xf), [-1])
        self.op("Div", self.op("Max", amax, self.const(QUANT_EPS)), self.const(float(QMAX)), outputs=[scale_out])
        self.round_to_int8(self.op("Div", xf, scale_out), q_out)

    def round_to_int8(self, y: str, q_out: str) -> None:
        r = self.op("Clip", self.op("Round", y), self.const(-float(QMAX)), self.const(float(QMAX)))
        self.op("Cast", r, to=TensorProto.INT8, outputs=[q_out])


# ---------------------------------------------------------------------------------------------------- bodies
def flash_attention(b: BodyBuilder, present: dict, a: dict) -> None:
    h, d, layout = a["num_heads"], a["head_dim"], a["layout"]
    hkv = a["num_kv_heads"] or h
    if layout == "packed":
        qkv = b.op("Reshape", "q", b.ints(0, 0, h + 2 * hkv, d))
        parts = b.op("Split", qkv, b.ints(h, hkv, hkv), axis=2, outputs=3)
        qh, kh, vh = (b.op("Transpose", p, perm=[0, 2, 1, 3]) for p in parts)
    elif layout == "bsd":
        qh, kh, vh = b.heads("q", h, d), b.heads("k", hkv, d), b.heads("v", hkv, d)
    else:
        qh, kh, vh = "q", "k", "v"
    qf = b.to_float(qh)
    kf = b.repeat_heads(b.to_float(kh), h // hkv, h, d)
    vf = b.repeat_heads(b.to_float(vh), h // hkv, h, d)
    scale = a["scale"] or d ** -0.5
    s = b.op("Mul", b.op("MatMul", qf, b.op("Transpose", kf, perm=[0, 1, 3, 2])), b.const(scale))
    sk = b.dim(kf, 2)
    zero, one = b.ints(0), b.ints(1)
    j = b.op("Range", b.op("Squeeze", zero, zero), b.op("Squeeze", sk, zero), b.op("Squeeze", one, zero))
    # L: the valid key length, [B,1,1,1] from kv_len (a fixed-size KV cache) or Sk
    length = b.op("Reshape", "kv_len", b.ints(-1, 1, 1, 1)) if present.get("kv_len") else sk
    if a["alibi"]:
        last = b.op("Cast", b.op("Sub", length, b.ints(1)), to=_FLOAT)
        pos = b.op("Sub", b.op("Reshape", b.op("Cast", j, to=_FLOAT), b.ints(1, 1, 1, -1)), last)
        slopes = gen_slopes(h, a["alibi_bias_max"]).numpy().astype(np.float32)
        s = b.op("Add", s, b.op("Mul", pos, b.const(slopes)))
    if present.get("bias"):
        s = b.op("Add", s, b.to_float("bias"))
    j4 = b.op("Reshape", j, b.ints(1, 1, 1, -1))
    masked = b.op("GreaterOrEqual", j4, length) if present.get("kv_len") else None
    if a["causal"] or a["window"] >= 0:
        sq = b.dim(qf, 2)
        i = b.op("Range", b.op("Squeeze", zero, zero), b.op("Squeeze", sq, zero), b.op("Squeeze", one, zero))
        i = b.op("Add", b.op("Reshape", i, b.ints(1, 1, -1, 1)), b.op("Sub", length, sq))  # bottom-right aligned
        if a["causal"]:
            later = b.op("Greater", j4, i)
            masked = later if masked is None else b.op("Or", masked, later)
        if a["window"] >= 0:
            outside = b.op("LessOrEqual", j4, b.op("Sub", i, b.ints(a["window"])))
            masked = outside if masked is None else b.op("Or", masked, outside)
    if masked is not None:
        s = b.op("Where", masked, b.const(-np.inf), s)
    m = b.reduce("Max", s, [-1])
    m = b.op("Where", b.op("IsInf", m), b.const(0.0), m)
    p = b.op("Exp", b.op("Sub", s, m))
    denom = b.reduce("Sum", p, [-1])
    denom = b.op("Where", b.op("Greater", denom, b.const(0.0)), denom, b.const(1.0))
    o = b.op("CastLike", b.op("Div", b.op("MatMul", p, vf), denom), "q")
    if layout == "bhsd":
        b.op("Identity", o, outputs=["o"])
    else:
        b.op("Reshape", b.op("Transpose", o, perm=[0, 2, 1, 3]), b.ints(0, 0, h * d), outputs=["o"])


def w8a8_linear(b: BodyBuilder, present: dict, a: dict) -> None:
    acc = b.op("MatMulInteger", "x", b.op("Transpose", "w", perm=[1, 0]))
    y = b.op("Mul", b.op("Mul", b.to_float(acc), "x_scale"), "w_scale")
    if present.get("bias"):
        b.op("CastLike", b.op("Add", y, b.to_float("bias")), "bias", outputs=["y"])
    else:
        to = helper.np_dtype_to_tensor_dtype(np.dtype(a["out_dtype"]))
        b.op("Cast", y, to=to, outputs=["y"])


def quantize_per_token(b: BodyBuilder, present: dict, a: dict) -> None:
    b.quantize_rows(b.to_float("x"), a["clip_range"], "q", "scale")


def gelu_quant(b: BodyBuilder, present: dict, a: dict) -> None:
    x = b.to_float("x")
    if b.opset >= 20:
        g = b.op("Gelu", x, approximate=a["approximate"])
    elif a["approximate"] == "tanh":
        inner = b.op("Mul", b.const(np.sqrt(2.0 / np.pi)),
                     b.op("Add", x, b.op("Mul", b.const(0.044715), b.op("Mul", x, b.op("Mul", x, x)))))
        g = b.op("Mul", b.op("Mul", b.const(0.5), x), b.op("Add", b.const(1.0), b.op("Tanh", inner)))
    else:
        erf = b.op("Erf", b.op("Div", x, b.const(np.sqrt(2.0))))
        g = b.op("Mul", b.op("Mul", b.const(0.5), x), b.op("Add", b.const(1.0), erf))
    b.quantize_rows(g, a["clip_range"], "q", "scale")


def norm_quant(b: BodyBuilder, present: dict, a: dict) -> None:
    x = b.to_float("x")
    if a["mode"] == "layernorm":
        x = b.op("Sub", x, b.reduce("Mean", x, [-1]))
    var = b.reduce("Mean", b.op("Mul", x, x), [-1])
    y = b.op("Mul", b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.const(a["eps"]))))),
             b.to_float("weight"))
    if present.get("bias"):
        y = b.op("Add", y, b.to_float("bias"))
    if a["per_token"]:
        b.quantize_rows(y, a["clip_range"], "q", "scale")
    else:
        if a["clip_range"] > 0:
            y = b.op("Clip", y, b.const(-a["clip_range"]), b.const(a["clip_range"]))
        b.round_to_int8(b.op("Div", y, b.const(a["static_scale"])), "q")
        lead = b.op("Shape", y, start=0, end=-1)
        b.op("Expand", b.const([a["static_scale"]]), b.op("Concat", lead, b.ints(1), axis=0), outputs=["scale"])
    if present.get("sum"):
        b.op("ReduceSum", b.op("Mul", b.to_float("q"), "scale"), b.ints(-1), keepdims=1, outputs=["sum"])


def token_importance(b: BodyBuilder, present: dict, a: dict) -> None:
    h, d = a["num_heads"], a["head_dim"]
    hkv = a["num_kv_heads"] or h
    q = b.heads(b.to_float("q_text"), h, d)
    k = b.repeat_heads(b.heads(b.to_float("k_vis"), hkv, d), h // hkv, h, d)
    s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.const(a["scale"] or d ** -0.5))
    p = b.op("Softmax", s, axis=-1)
    b.op("Identity", b.reduce("Mean", p, [1, 2], keepdims=0), outputs=["scores"])


def gather_topk(b: BodyBuilder, present: dict, a: dict) -> None:
    # TopK breaks ties towards the lower index (ONNX spec), as the reference's stable descending sort.
    _, order = b.op("TopK", "scores", "keep", axis=-1, largest=1, sorted=1, outputs=2)
    idx, _ = b.op("TopK", order, "keep", axis=-1, largest=0, sorted=1, outputs=["idx", "_idx_pos"])
    b.op("GatherND", "x", b.op("Unsqueeze", idx, b.ints(-1)), batch_dims=1, outputs=["x_kept"])


BODIES = {
    "FlashAttention": flash_attention,
    "W8A8Linear": w8a8_linear,
    "QuantizePerToken": quantize_per_token,
    "GeluQuant": gelu_quant,
    "NormQuant": norm_quant,
    "TokenImportance": token_importance,
    "GatherTopK": gather_topk,
}


def build_body(op_name: str, attrs: dict, present: dict, opset: int) -> list[onnx.NodeProto]:
    """Body nodes of ``op_name`` for these attributes and present optional inputs/outputs (``{name: bool}``)."""
    b = BodyBuilder(opset)
    BODIES[op_name](b, present, attrs)
    return b.nodes

"""``torch.library`` definitions of the ``vlmx::*`` ops, generated from the op table.

Importing this module defines every op with its reference kernel (CompositeExplicitAutograd, so it runs on any
device) and a fake kernel for tracing/export. Device backends (``vlmx.plugins``) register faster ``CUDA`` kernels
for the same names; a backend key beats the composite reference in the dispatcher.

Use the ops as ``torch.ops.vlmx.flash_attention(q, k, v, None, num_heads=..., ...)`` or through :func:`call`.
"""
from __future__ import annotations

import torch

from . import reference
from .op_table import DOMAIN, OPS, OpSpec

_SCHEMA_TYPES = {"int": "int", "float": "float", "string": "str"}

LIB = torch.library.Library(DOMAIN, "FRAGMENT")


def _schema_default(value, kind: str) -> str:
    if kind == "string":
        return '"' + str(value) + '"'
    if kind == "float":
        return repr(float(value))
    return str(int(value))


def schema(op: OpSpec) -> str:
    """The torch schema string of an op: tensors positional, attributes keyword-only (required ones first)."""
    args = [f"Tensor? {t.name}=None" if t.optional else f"Tensor {t.name}" for t in op.inputs]
    attrs = sorted(op.attrs, key=lambda a: a.default is not None)
    kw = [f"{_SCHEMA_TYPES[a.kind]} {a.name}" + ("" if a.default is None else "=" + _schema_default(a.default, a.kind))
          for a in attrs]
    sig = ", ".join(args + (["*"] + kw if kw else []))
    outs = ", ".join("Tensor" for _ in op.outputs)
    return f"({sig}) -> " + (f"({outs})" if len(op.outputs) > 1 else "Tensor")


# ---------------------------------------------------------------------------------------------- fake kernels
def _fake_flash_attention(q, k=None, v=None, bias=None, kv_len=None, *, num_heads, head_dim, num_kv_heads=0, layout="bsd", **_):
    if layout == "bhsd":
        return q.new_empty(q.shape)
    return q.new_empty((q.shape[0], q.shape[1], num_heads * head_dim))


def _fake_w8a8_linear(x, x_scale, w, w_scale, bias=None, *, out_dtype="float16"):
    dtype = bias.dtype if bias is not None else getattr(torch, out_dtype)
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype)


def _fake_quant(x, *_, **__):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _fake_norm_quant(x, weight, bias=None, **_):
    q, s = _fake_quant(x)
    return q, s, x.new_empty(s.shape, dtype=torch.float32)


def _fake_token_importance(q_text, k_vis, **_):
    return q_text.new_empty((q_text.shape[0], k_vis.shape[1]), dtype=torch.float32)


def _fake_gather_topk(x, scores, keep):
    kept = torch.library.get_ctx().new_dynamic_size(min=1)
    return x.new_empty((x.shape[0], kept, x.shape[2])), x.new_empty((x.shape[0], kept), dtype=torch.int64)


_FAKES = {
    "flash_attention": _fake_flash_attention,
    "w8a8_linear": _fake_w8a8_linear,
    "quantize_per_token": _fake_quant,
    "gelu_quant": _fake_quant,
    "norm_quant": _fake_norm_quant,
    "token_importance": _fake_token_importance,
    "gather_topk": _fake_gather_topk,
}


def _define_all() -> None:
    for op in OPS.values():
        LIB.define(op.torch_name + schema(op))
        LIB.impl(op.torch_name, getattr(reference, op.torch_name), "CompositeExplicitAutograd")
        torch.library.register_fake(op.qualified_torch_name, _FAKES[op.torch_name], lib=LIB)


_define_all()


def call(name: str, *tensors, **attrs):
    """Run ``vlmx::<name>`` with attributes checked and defaulted against the op table."""
    from .op_table import get_op

    op = get_op(name)
    full = op.validate_attrs(attrs)
    return getattr(torch.ops.vlmx, op.torch_name)(*tensors, **full)

"""The ``vlmx`` ONNX domain, generated from the op table: ONNX schemas and the torch → ONNX translation table.

- :func:`register_schemas` registers one ``onnx.defs.OpSchema`` per op (inputs, outputs, type constraints,
  attributes with their defaults, plus ``plugin_namespace`` / ``plugin_version``), so onnx, onnxscript and the
  checker know the ops' signatures in this process.
- :func:`translation_table` maps every ``torch.ops.vlmx.*`` overload to a function that emits one ``vlmx`` node
  (domain ``vlmx``, attributes validated and defaulted against the table, plugin attributes stamped). It is the
  ``custom_translation_table`` of ``torch.onnx.export(dynamo=True)``.
"""
from __future__ import annotations

import functools

import onnx
from onnx import defs
from onnx.defs import OpSchema

from vlmx.torch_ref import ops as _torch_ops  # noqa: F401  (defines torch.ops.vlmx.*)
from vlmx.torch_ref.op_table import (DOMAIN, OPS, OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION, OpSpec,
                                     op_for_type)

#: Attributes every vlmx node carries besides the op-table attributes (TensorRT's plugin-override rule).
PLUGIN_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
#: TensorRT's ONNX parser attribute naming the node inputs it hands a plugin as shape inputs (ops with one).
SHAPE_INPUTS_ATTR = "tensorrt_plugin_shape_input_indices"


def parser_attrs(op: OpSpec) -> dict:
    """The TensorRT attributes of a node of ``op``: plugin namespace/version, and its shape-input indices."""
    return {**PLUGIN_ATTRS, **({SHAPE_INPUTS_ATTR: op.shape_input_indices} if op.shape_input_indices else {})}

_ONNX_TENSOR_TYPES = {"float16": "tensor(float16)", "float32": "tensor(float)", "int8": "tensor(int8)",
                      "int64": "tensor(int64)", "int32": "tensor(int32)"}
_ATTR_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "string": OpSchema.AttrType.STRING}


def _type_str(dtype: str) -> str:
    return dtype if dtype == "T" else _ONNX_TENSOR_TYPES[dtype]


def _param(t) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if t.optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(t.name, _type_str(t.dtype), t.doc, param_option=option)


def op_schema(op: OpSpec) -> OpSchema:
    """The ONNX schema of one op (domain ``vlmx``, since version 1)."""
    attrs = []
    for a in op.attrs:
        if a.default is None:
            attrs.append(OpSchema.Attribute(a.name, _ATTR_TYPES[a.kind], a.doc, required=True))
        else:
            attrs.append(OpSchema.Attribute(a.name, onnx.helper.make_attribute(a.name, a.default), a.doc))
    for name, value in parser_attrs(op).items():
        attrs.append(OpSchema.Attribute(name, onnx.helper.make_attribute(name, value),
                                        "TensorRT plugin lookup (IPluginV3 creator namespace / version) or "
                                        "the inputs TensorRT passes the plugin as shape inputs"))
    uses_t = any(t.dtype == "T" for t in op.inputs + op.outputs)
    constraints = [("T", [_ONNX_TENSOR_TYPES[d] for d in ("float16", "float32")], "float type")] if uses_t else []
    return OpSchema(op.name, DOMAIN, OPSET_VERSION, doc=op.doc, inputs=[_param(t) for t in op.inputs],
                    outputs=[_param(t) for t in op.outputs], type_constraints=constraints, attributes=attrs)


@functools.cache
def register_schemas() -> None:
    """Register every vlmx schema with onnx (idempotent; a schema another copy already registered is kept)."""
    for op in OPS.values():
        if defs.has(op.name, OPSET_VERSION, DOMAIN):
            continue
        defs.register_schema(op_schema(op))


def node_attrs(op: OpSpec, attrs: dict) -> dict:
    """The full attribute dict of a vlmx node: validated op-table attributes plus the TensorRT attributes."""
    return {**op.validate_attrs(attrs), **parser_attrs(op)}


def _emitter(op: OpSpec):
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)
    n_in = len(op.inputs)

    def emit(*tensors, **attrs):
        tensors = list(tensors) + [None] * (n_in - len(tensors))
        while tensors and tensors[-1] is None:  # trailing absent optional inputs are omitted
            tensors.pop()
        return getattr(opset, op.name)(*tensors, **node_attrs(op, attrs))

    emit.__name__ = f"vlmx_{op.torch_name}"
    return emit


#: Opset of ONNX ``TensorScatter`` (the in-place KV-cache update).
TENSOR_SCATTER_OPSET = 24


def _tensor_scatter(past, update, write_indices, axis=-2):
    """``vlmx_onnx::tensor_scatter`` → one standard ONNX ``TensorScatter`` (opset 24, linear mode)."""
    import onnxscript

    return onnxscript.values.Opset("", TENSOR_SCATTER_OPSET).TensorScatter(past, update, write_indices, axis=axis)


def translation_table() -> dict:
    """``{torch.ops.vlmx.<op>.default: emitter}`` for ``torch.onnx.export(custom_translation_table=...)``, plus
    ``vlmx_onnx::tensor_scatter`` (standard ONNX TensorScatter; graphs using it are exported at opset 24)."""
    import torch

    from vlmx.torch_ref import kv_cache  # noqa: F401  (defines torch.ops.vlmx_onnx.*)

    register_schemas()
    table = {getattr(torch.ops.vlmx, op.torch_name).default: _emitter(op) for op in OPS.values()}
    table[torch.ops.vlmx_onnx.tensor_scatter.default] = _tensor_scatter
    return table


def vlmx_nodes(graph: onnx.GraphProto):
    """Every vlmx node of a graph (not descending into subgraphs: exported graphs have none)."""
    return [n for n in graph.node if n.domain == DOMAIN]


def ops_used(model: onnx.ModelProto) -> list[str]:
    """Sorted names of the vlmx ops a model uses (variant node names ``<Op>_v<k>`` count as ``<Op>``)."""
    return sorted({op_for_type(n.op_type).name for n in vlmx_nodes(model.graph)})

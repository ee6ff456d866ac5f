"""Back every vlmx node of a model with a model-local function (domain ``vlmx``, name = op name).

Nodes of one op that share attributes and optional-input/output presence (the usual case: every attention layer
of a tower) share one function without an overload, the form every ONNX consumer understands. When a model holds
several variants of one op, each variant gets its own function distinguished by the IR-10 ``overload`` field
(same domain and name; ONNX Runtime resolves ``domain:name:overload``).
"""
from __future__ import annotations

import onnx
from onnx import helper

from vlmx.torch_ref.op_table import DOMAIN, OPS

from .domain import PLUGIN_ATTRS, vlmx_nodes
from .function_bodies import build_body

#: IR version that introduced function overloads.
IR_OVERLOADS = 10


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise ValueError("model imports no default-domain opset; it is not a valid ONNX model")


def node_attributes(node: onnx.NodeProto) -> dict:
    """The op-table attributes of a vlmx node, validated and defaulted (plugin attributes dropped)."""
    op = OPS[node.op_type]
    raw = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in PLUGIN_ATTRS}
    raw = {k: v.decode() if isinstance(v, bytes) else v for k, v in raw.items()}
    return op.validate_attrs(raw)


def presence(node: onnx.NodeProto) -> dict:
    """``{tensor name: present}`` for the op's inputs and outputs (absent = missing or empty name)."""
    op = OPS[node.op_type]
    ins = {t.name: i < len(node.input) and bool(node.input[i]) for i, t in enumerate(op.inputs)}
    outs = {t.name: i < len(node.output) and bool(node.output[i]) for i, t in enumerate(op.outputs)}
    return {**ins, **outs}


def variant_key(node: onnx.NodeProto) -> tuple:
    return node.op_type, tuple(sorted(node_attributes(node).items())), tuple(sorted(presence(node).items()))


def make_function(node: onnx.NodeProto, opset: int, overload: str = "") -> onnx.FunctionProto:
    """The model-local function of one node's variant."""
    op = OPS[node.op_type]
    present = presence(node)
    n_in = max((i + 1 for i, t in enumerate(op.inputs) if present[t.name]), default=0)
    n_out = max(i + 1 for i, t in enumerate(op.outputs) if present[t.name])
    body = build_body(op.name, node_attributes(node), present, opset)
    attrs = [a.name for a in op.attrs] + list(PLUGIN_ATTRS)
    return helper.make_function(DOMAIN, op.name, [t.name for t in op.inputs[:n_in]],
                                [t.name for t in op.outputs[:n_out]], body, [helper.make_opsetid("", opset)],
                                attributes=attrs, doc_string=op.doc, overload=overload)


def strip_vlmx_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the vlmx functions and node overloads (bare custom nodes; see the ``strip_functions`` pass)."""
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    for n in vlmx_nodes(model.graph):
        n.overload = ""
    return model


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """(Re)build the function of every vlmx node variant in ``model`` (in place, idempotent); returns it."""
    strip_vlmx_functions(model)
    opset = default_opset(model)
    variants: dict[str, dict[tuple, list[onnx.NodeProto]]] = {}
    for n in vlmx_nodes(model.graph):
        variants.setdefault(n.op_type, {}).setdefault(variant_key(n), []).append(n)
    for op_name, by_key in variants.items():
        for i, nodes in enumerate(by_key.values()):
            overload = "" if len(by_key) == 1 else f"v{i}"
            for n in nodes:
                n.overload = overload
            model.functions.append(make_function(nodes[0], opset, overload))
        if len(by_key) > 1 and model.ir_version < IR_OVERLOADS:
            model.ir_version = IR_OVERLOADS
    if variants and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model

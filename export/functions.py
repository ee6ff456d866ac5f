"""Back every vlmx node of a model with a model-local function (domain ``vlmx``) that computes its semantics.

The variant rule (the op contract; README "Export" and docs/tensorrt.md say the same):

- A *variant* of an op is one combination of attribute values and optional-input/output presence. Attributes are
  baked into the body (:mod:`vlmx.export.function_bodies`), so every variant needs its own function.
- Node op_type = function name. The first variant of an op in a graph (graph order) whose present inputs have
  no gap is named after the op (``FlashAttention``); every other variant is ``FlashAttention_v1``,
  ``FlashAttention_v2``, ... (:func:`vlmx.torch_ref.op_table.variant_op_type`). A node lists only the inputs it
  has; a node named after its op therefore reads the same positionally, and ``<Op>_v<k>`` nodes are read through
  their function's formal input names, so re-attaching after passes that add positional nodes stays correct. The names differ because TensorRT's ONNX parser looks model
  local functions up by name alone (it ignores the IR-10 ``overload`` field and the domain), and requires a
  node's input count to equal its function's; ONNX Runtime resolves the same names. No overloads are written.
- Plugins: TensorRT takes a registered creator over the body when the node's op_type names one and the node
  carries ``plugin_namespace``/``plugin_version``. The library registers one creator per op, under the op name,
  so ``<Op>`` nodes can become plugins while ``<Op>_v<k>`` nodes always run their (correct) bodies. To run every
  vlmx node as a plugin, build from bare nodes: :func:`strip_vlmx_functions` (the ``--plugins-only`` export, and
  what ``vlm-build --plugin-lib`` parses) drops the bodies and names every node after its op again; the node's
  attributes carry its variant to the creator.
"""
from __future__ import annotations

import onnx
from onnx import helper

from vlmx.torch_ref.op_table import DOMAIN, op_for_type, variant_op_type

from .domain import PLUGIN_ATTRS, SHAPE_INPUTS_ATTR, parser_attrs, vlmx_nodes
from .function_bodies import build_body


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise ValueError("model imports no default-domain opset; it is not a valid ONNX model")


def node_attributes(node: onnx.NodeProto) -> dict:
    """The op-table attributes of a vlmx node, validated and defaulted (plugin attributes dropped)."""
    op = op_for_type(node.op_type)
    raw = {a.name: helper.get_attribute_value(a) for a in node.attribute
           if a.name not in PLUGIN_ATTRS and a.name != SHAPE_INPUTS_ATTR}
    raw = {k: v.decode() if isinstance(v, bytes) else v for k, v in raw.items()}
    return op.validate_attrs(raw)


def presence(node: onnx.NodeProto, function: onnx.FunctionProto | None = None) -> dict:
    """``{tensor name: present}`` for the op's inputs and outputs.

    Inputs are read positionally (absent = missing or empty name), or, for a node already backed by ``function``,
    from the function's formal input names (attached nodes list only the inputs they have).
    """
    op = op_for_type(node.op_type)
    if function is not None:
        ins = {t.name: t.name in function.input for t in op.inputs}
    else:
        ins = {t.name: i < len(node.input) and bool(node.input[i]) for i, t in enumerate(op.inputs)}
    outs = {t.name: i < len(node.output) and bool(node.output[i]) for i, t in enumerate(op.outputs)}
    return {**ins, **outs}


def positional_inputs(node: onnx.NodeProto, function: onnx.FunctionProto | None = None) -> list[str]:
    """The node's inputs at their op-table positions (``""`` where absent).

    A node named after its op is positional (its compact and positional forms agree by the naming rule); a
    variant node ``<Op>_v<k>`` is read through its function's formal input names.
    """
    op = op_for_type(node.op_type)
    if function is None or node.op_type == op.name:
        return [node.input[i] if i < len(node.input) else "" for i in range(len(op.inputs))]
    given = dict(zip(function.input, node.input))
    return [given.get(t.name, "") for t in op.inputs]


def variant_key(node: onnx.NodeProto) -> tuple:
    """What makes two (positional) nodes of one op need different bodies: attribute values and optional-tensor
    presence."""
    return (op_for_type(node.op_type).name, tuple(sorted(node_attributes(node).items())),
            tuple(sorted(presence(node).items())))


def make_function(node: onnx.NodeProto, opset: int, name: str | None = None) -> onnx.FunctionProto:
    """The model-local function ``name`` (default: the node's op_type) computing this node's variant.

    ``node`` is positional (absent optional inputs empty). The function's formal inputs are the op-table names of
    the inputs present, in table order (nodes are given the same list: TensorRT requires equal counts and cannot
    map an empty name); its outputs are the op-table names up to the last one used.
    """
    op = op_for_type(node.op_type)
    present = presence(node)
    n_out = max(i + 1 for i, t in enumerate(op.outputs) if present[t.name])
    body = build_body(op.name, node_attributes(node), present, opset)
    attrs = [a.name for a in op.attrs] + list(parser_attrs(op))
    return helper.make_function(DOMAIN, name or node.op_type, [t.name for t in op.inputs if present[t.name]],
                                [t.name for t in op.outputs[:n_out]], body, [helper.make_opsetid("", opset)],
                                attributes=attrs, doc_string=op.doc)


def _has_input_gap(node: onnx.NodeProto) -> bool:
    """Whether a (positional) node lacks an optional input before one it has: its compact form then differs."""
    present = [bool(i) for i in node.input]
    return any(not p and any(present[j + 1:]) for j, p in enumerate(present))


def _vlmx_functions(model: onnx.ModelProto) -> dict[str, onnx.FunctionProto]:
    return {f.name: f for f in model.functions if f.domain == DOMAIN}


def _set_inputs(node: onnx.NodeProto, names: list[str]) -> None:
    del node.input[:]
    node.input.extend(names)


def _drop_vlmx_functions(model: onnx.ModelProto) -> None:
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)


def strip_vlmx_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the vlmx functions and name every vlmx node after its op (bare plugin nodes; ``--plugins-only``).

    Nodes keep the inputs they have, in op-table order, without empty names (the plugin creators' convention).
    """
    functions = _vlmx_functions(model)
    for n in vlmx_nodes(model.graph):
        _set_inputs(n, [i for i in positional_inputs(n, functions.get(n.op_type)) if i])
        n.op_type, n.overload = op_for_type(n.op_type).name, ""
    _drop_vlmx_functions(model)
    return model


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """(Re)build the function of every vlmx node variant in ``model`` (in place, idempotent); returns it.

    Nodes already backed by a vlmx function are read through it; other nodes positionally (as the exporter and
    the passes emit them, empty names for absent optional inputs).
    """
    functions = _vlmx_functions(model)
    opset = default_opset(model)
    variants: dict[str, dict[tuple, list[onnx.NodeProto]]] = {}
    for n in vlmx_nodes(model.graph):
        _set_inputs(n, positional_inputs(n, functions.get(n.op_type)))
        n.op_type, n.overload = op_for_type(n.op_type).name, ""
        while n.output and not n.output[-1]:
            n.output.pop()
        variants.setdefault(n.op_type, {}).setdefault(variant_key(n), []).append(n)
    _drop_vlmx_functions(model)
    for op_name, by_key in variants.items():
        plain_free, k = True, 1
        for nodes in by_key.values():
            if plain_free and not _has_input_gap(nodes[0]):
                name, plain_free = op_name, False
            else:
                name, k = variant_op_type(op_name, k), k + 1
            fn = make_function(nodes[0], opset, name)
            model.functions.append(fn)
            for n in nodes:
                _set_inputs(n, [i for i in n.input if i])
                n.op_type = fn.name
    if variants and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model

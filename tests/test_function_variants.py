"""Several variants of every vlmx op in one graph: each node runs its own function body.

A variant is one combination of attribute values and optional-input/output presence; each gets its own
model-local function, named ``<Op>`` / ``<Op>_v<k>`` (node op_type = function name; see vlmx.export.functions).
Checked twice on the same mixed graphs:
- ONNX Runtime: every output against the torch reference (vlmx.torch_ref.reference), fresh random inputs.
- TensorRT-RTX's ONNX parser (it looks functions up by name and ignores IR-10 overloads): from the parsed network,
  every node's layers come from its own function (layer metadata ``[ONNX Layer: ... | <node> (<function>)]``) and
  contain its own attribute constants (the scale, clip range, eps of that node, not another's).
W8A8Linear bodies use MatMulInteger, which TensorRT-RTX cannot import: ONNX Runtime only (tests/test_trt_build.py
asserts the parser's refusal). GatherTopK has no attributes and no optional tensors: one variant by construction.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from test_export_helpers import assert_close, run
from vlmx.export.domain import node_attrs
from vlmx.export.functions import attach_functions
from vlmx.torch_ref import reference as R
from vlmx.torch_ref.op_table import OPS, QMAX, op_for_type

RNG = np.random.default_rng(20261201)
_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int8): TensorProto.INT8,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.float16): TensorProto.FLOAT16}


def _f32(*shape, std=1.0):
    return (RNG.standard_normal(shape) * std).astype(np.float32)


class Variant:
    """One node: op, named inputs (None = absent optional), attributes, outputs used, the torch reference call,
    and the constants its body must contain (``marks``)."""

    def __init__(self, op, inputs: dict, attrs: dict, ref, marks=(), outputs=None):
        self.op, self.inputs, self.attrs, self.ref, self.marks = op, inputs, attrs, ref, tuple(marks)
        spec = OPS[op]
        self.outputs = outputs or [t.name for t in spec.outputs if not t.optional]


def _attention_cases():
    b, s, h, d = 2, 6, 2, 8
    q, k, v = _f32(b, s, h * d), _f32(b, s, h * d), _f32(b, s, h * d)
    k1, v1 = _f32(b, s, d), _f32(b, s, d)
    bias = _f32(b, 1, s, s)
    qkv = _f32(b, s, 3 * h * d)
    qh, kh, vh = _f32(b, h, s, d), _f32(b, h, s, d), _f32(b, h, s, d)
    A = R.flash_attention
    t = torch.from_numpy
    return [
        Variant("FlashAttention", dict(q=q, k=k, v=v), dict(num_heads=h, head_dim=d, scale=0.125),
                lambda: [A(t(q), t(k), t(v), num_heads=h, head_dim=d, scale=0.125)], marks=[0.125]),
        Variant("FlashAttention", dict(q=q, k=k1, v=v1, bias=bias),
                dict(num_heads=h, num_kv_heads=1, head_dim=d, scale=0.375, causal=1),
                lambda: [A(t(q), t(k1), t(v1), t(bias), num_heads=h, num_kv_heads=1, head_dim=d, scale=0.375,
                           causal=1)], marks=[0.375]),
        Variant("FlashAttention", dict(q=qkv), dict(num_heads=h, head_dim=d, scale=0.625, window=2, layout="packed"),
                lambda: [A(t(qkv), num_heads=h, head_dim=d, scale=0.625, window=2, layout="packed")], marks=[0.625]),
        Variant("FlashAttention", dict(q=qkv, k=None, v=None, bias=bias),
                dict(num_heads=h, head_dim=d, scale=0.8125, layout="packed"),
                lambda: [A(t(qkv), None, None, t(bias), num_heads=h, head_dim=d, scale=0.8125, layout="packed")],
                marks=[0.8125]),
        Variant("FlashAttention", dict(q=qh, k=kh, v=vh), dict(num_heads=h, head_dim=d, scale=0.875, alibi=1,
                                                               causal=1, layout="bhsd"),
                lambda: [A(t(qh), t(kh), t(vh), num_heads=h, head_dim=d, scale=0.875, alibi=1, causal=1,
                           layout="bhsd")], marks=[0.875]),
    ]


def _quant_cases():
    x1, x2, x3, x4 = _f32(3, 40, std=2), _f32(3, 40, std=2), _f32(3, 40, std=2), _f32(3, 40, std=2)
    t = torch.from_numpy
    return [
        Variant("QuantizePerToken", dict(x=x1), {}, lambda: R.quantize_per_token(t(x1))),
        Variant("QuantizePerToken", dict(x=x2), dict(clip_range=2.5), lambda: R.quantize_per_token(t(x2), 2.5),
                marks=[2.5]),
        Variant("GeluQuant", dict(x=x3), dict(approximate="tanh"), lambda: R.gelu_quant(t(x3), "tanh"),
                marks=["GELU_TANH"]),
        Variant("GeluQuant", dict(x=x4), dict(approximate="none", clip_range=1.5),
                lambda: R.gelu_quant(t(x4), "none", 1.5), marks=[1.5, "GELU_ERF"]),
    ]


def _norm_cases():
    c = 48
    xs = [_f32(2, 5, c, std=2) for _ in range(3)]
    w, bias = _f32(c), _f32(c)
    t = torch.from_numpy
    return [
        Variant("NormQuant", dict(x=xs[0], weight=w, bias=bias), dict(mode="layernorm", eps=1e-5),
                lambda: R.norm_quant(t(xs[0]), t(w), t(bias), mode="layernorm", eps=1e-5)[:2], marks=[1e-5]),
        Variant("NormQuant", dict(x=xs[1], weight=w), dict(mode="rmsnorm", eps=3e-6),
                lambda: R.norm_quant(t(xs[1]), t(w), None, mode="rmsnorm", eps=3e-6), marks=[3e-6],
                outputs=["q", "scale", "sum"]),
        Variant("NormQuant", dict(x=xs[2], weight=w, bias=bias),
                dict(mode="layernorm", eps=7e-6, per_token=0, static_scale=0.0625),
                lambda: R.norm_quant(t(xs[2]), t(w), t(bias), mode="layernorm", eps=7e-6, per_token=0,
                                     static_scale=0.0625)[:2], marks=[7e-6, 0.0625]),
    ]


def _prune_cases():
    h, d = 2, 8
    q, kv, k1 = _f32(2, 3, h * d), _f32(2, 10, h * d), _f32(2, 10, d)
    x1, x2 = _f32(2, 10, 4), _f32(2, 10, 4)
    s1, s2 = RNG.integers(0, 4, (2, 10)).astype(np.float32), _f32(2, 10)
    keep1, keep2 = np.array([4], np.int64), np.array([7], np.int64)
    t = torch.from_numpy
    return [
        Variant("TokenImportance", dict(q_text=q, k_vis=kv), dict(num_heads=h, head_dim=d),
                lambda: [R.token_importance(t(q), t(kv), num_heads=h, head_dim=d)], marks=[d ** -0.5]),
        Variant("TokenImportance", dict(q_text=q, k_vis=k1), dict(num_heads=h, num_kv_heads=1, head_dim=d,
                                                                  scale=0.0875),
                lambda: [R.token_importance(t(q), t(k1), num_heads=h, num_kv_heads=1, head_dim=d, scale=0.0875)],
                marks=[0.0875]),
        Variant("GatherTopK", dict(x=x1, scores=s1, keep=keep1), {}, lambda: R.gather_topk(t(x1), t(s1), 4)),
        Variant("GatherTopK", dict(x=x2, scores=s2, keep=keep2), {}, lambda: R.gather_topk(t(x2), t(s2), 7)),
    ]


def _w8a8_cases():
    k, n = 32, 16
    x = RNG.integers(-127, 128, (2, 5, k)).astype(np.int8)
    xs = (RNG.random((2, 5, 1)) * 1e-2 + 1e-3).astype(np.float32)
    w = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    ws = (RNG.random(n) * 1e-2 + 1e-3).astype(np.float32)
    b = _f32(n)
    t = torch.from_numpy
    return [
        Variant("W8A8Linear", dict(x=x, x_scale=xs, w=w, w_scale=ws, bias=b), {},
                lambda: [R.w8a8_linear(t(x), t(xs), t(w), t(ws), t(b))]),
        Variant("W8A8Linear", dict(x=x, x_scale=xs, w=w, w_scale=ws), dict(out_dtype="float32"),
                lambda: [R.w8a8_linear(t(x), t(xs), t(w), t(ws), None, out_dtype="float32")]),
    ]


GROUPS = {"attention": _attention_cases, "quant": _quant_cases, "norm": _norm_cases, "prune": _prune_cases,
          "w8a8": _w8a8_cases}


def mixed_model(variants: list[Variant], opset: int = 23):
    """One graph holding every variant as an independent node (node i: inputs ``n{i}_<name>``, outputs
    ``n{i}_<out>``), backed by attach_functions. Returns (model, feed, node names)."""
    nodes, inputs, outputs, feed = [], [], [], {}
    for i, var in enumerate(variants):
        spec = OPS[var.op]
        names = []
        for t in spec.inputs:
            arr = var.inputs.get(t.name)
            if arr is None:
                names.append("")
                continue
            name = f"n{i}_{t.name}"
            names.append(name)
            feed[name] = arr
            inputs.append(helper.make_tensor_value_info(name, _NP_TO_ONNX[arr.dtype], arr.shape))
        while names and not names[-1]:
            names.pop()
        outs = [f"n{i}_{o}" if o in var.outputs else "" for o in [t.name for t in spec.outputs]]
        while outs and not outs[-1]:
            outs.pop()
        nodes.append(helper.make_node(var.op, names, outs, domain="vlmx", name=f"node{i}",
                                      **node_attrs(spec, var.attrs)))
        refs = dict(zip(var.outputs, var.ref()))
        outputs += [helper.make_tensor_value_info(o, _NP_TO_ONNX[np.dtype(str(refs[o.split("_", 1)[1]].dtype)
                                                                          .replace("torch.", ""))],
                                                  list(refs[o.split("_", 1)[1]].shape)) for o in outs if o]
    graph = helper.make_graph(nodes, "mixed_variants", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("vlmx", 1)])
    model.ir_version = 10
    attach_functions(model)
    return model, feed, [n.name for n in nodes]


def _variant_count(variants):
    return len({(v.op, tuple(sorted(v.attrs.items())), tuple(k for k, a in v.inputs.items() if a is not None),
                 tuple(v.outputs)) for v in variants})


def test_every_op_with_attributes_or_optional_tensors_has_two_variants_here():
    """The groups below cover >= 2 variants of every op that can vary (attributes or optional tensors)."""
    variants = [v for make in GROUPS.values() for v in make()]
    for op in OPS.values():
        mine = [v for v in variants if v.op == op.name]
        assert mine, f"no case for {op.name}"
        if op.attrs or any(t.optional for t in op.inputs + op.outputs):
            assert _variant_count(mine) >= 2, op.name
            varied_optional = {k for v in mine for k, a in v.inputs.items() if a is None} | \
                {t.name for t in op.outputs if t.optional and any(t.name in v.outputs for v in mine)}
            if any(t.optional for t in op.inputs):
                assert varied_optional or any(set(v.inputs) != set(mine[0].inputs) for v in mine), op.name


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_onnxruntime_runs_each_variant_with_its_own_semantics(group):
    variants = GROUPS[group]()
    model, feed, names = mixed_model(variants)
    onnx.checker.check_model(model, full_check=True)
    fn_names = sorted(f.name for f in model.functions)
    assert len(fn_names) == len(set(fn_names)) == _variant_count(variants), fn_names
    assert all(not f.overload for f in model.functions) and all(not n.overload for n in model.graph.node)
    for n in model.graph.node:
        assert n.op_type in fn_names and op_for_type(n.op_type).name == variants[names.index(n.name)].op
    out_names = [o.name for o in model.graph.output]
    results = dict(zip(out_names, run(model, feed)))
    for i, var in enumerate(variants):
        refs = [r for r in var.ref()]
        for o, ref in zip(var.outputs, refs):
            got, ref = results[f"n{i}_{o}"], ref.numpy()
            what = f"{var.op} node{i} {o} {var.attrs}"
            if got.dtype == np.int8:
                diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-2 and np.abs(got).max() <= QMAX, what
            elif got.dtype == np.int64:
                np.testing.assert_array_equal(got, ref, err_msg=what)
            else:
                assert_close(got, ref.astype(np.float64), "fp32_exact_math" if o != "sum" else "fp32", what)


# ------------------------------------------------------------------------------------------------ TensorRT-RTX
_META = re.compile(r"\[ONNX Layer: [^|]*\| (\S+) \((\S+)\)\]")


def _parse_rtx(model):
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (the vlmx[trt-rtx] "
                                                              "extra)")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    assert ok, f"TensorRT-RTX {trt.__version__} refused the mixed graph: {errors}"
    return trt, network, (builder, parser)


def _mark(m):
    """A mark as network_semantics records it: a float32 magnitude, or an activation type name."""
    return m if isinstance(m, str) else float(np.float32(abs(m)))


def network_semantics(trt, network) -> tuple[dict, dict]:
    """From a parsed network: ``{node: {function names of its layers}}`` and ``{node: {float constants}}``.

    Constants are the values of constant layers (no metadata: each is credited to the node of its first consumer,
    through broadcast shuffles, that has some) and the alpha/beta of activation layers (Clip becomes kCLIP).
    """
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    consumers: dict[str, list] = {}
    for layer in layers:
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is not None:
                consumers.setdefault(t.name, []).append(layer)

    def owner(layer, depth=0):
        m = _META.search(layer.metadata or "")
        if m or depth > 4:
            return m
        for j in range(layer.num_outputs):
            for c in consumers.get(layer.get_output(j).name, []):
                found = owner(c, depth + 1)
                if found:
                    return found
        return None

    functions, constants = {}, {}
    for layer in layers:
        m = owner(layer)
        if m is None:
            continue
        node, fn = m.groups()
        functions.setdefault(node, set()).add(fn)
        if layer.type == trt.LayerType.CONSTANT:
            layer.__class__ = trt.IConstantLayer
            w = np.asarray(layer.weights)
            if w.dtype.kind == "f" and w.size <= 64:
                constants.setdefault(node, set()).update(float(np.float32(abs(x))) for x in w.ravel())
        elif layer.type == trt.LayerType.ACTIVATION:
            layer.__class__ = trt.IActivationLayer
            constants.setdefault(node, set()).update({float(np.float32(abs(layer.alpha))),
                                                      float(np.float32(abs(layer.beta))), layer.type.name})
    return functions, constants


@pytest.mark.parametrize("group", sorted(set(GROUPS) - {"w8a8"}))
def test_tensorrt_rtx_parser_gives_each_node_its_own_body(group):
    variants = GROUPS[group]()
    model, _, names = mixed_model(variants)
    trt, network, _keep = _parse_rtx(model)
    functions, constants = network_semantics(trt, network)
    op_types = {n.name: n.op_type for n in model.graph.node}
    print(f"TensorRT-RTX {trt.__version__}: {network.num_layers} layers;",
          {n: sorted(f) for n, f in functions.items()})
    all_marks = {_mark(m) for v in variants for m in v.marks}
    for name, var in zip(names, variants):
        assert functions.get(name) == {op_types[name]}, f"{name}: layers from {functions.get(name)}"
        mine = {_mark(m) for m in var.marks}
        got = constants.get(name, set())
        assert mine <= got, f"{name} ({op_types[name]} {var.attrs}): constants {sorted(got)} lack {sorted(mine)}"
        foreign = (all_marks - mine) & got
        assert not foreign, f"{name} ({op_types[name]}) holds another variant's constants {sorted(foreign)}"


def test_tensorrt_rtx_parser_all_ops_in_one_graph():
    """Every op's variants (except W8A8Linear) in one graph: still one function per node, as named."""
    variants = [v for g, make in GROUPS.items() if g != "w8a8" for v in make()]
    model, _, names = mixed_model(variants)
    trt, network, _keep = _parse_rtx(model)
    functions, _ = network_semantics(trt, network)
    op_types = {n.name: n.op_type for n in model.graph.node}
    assert {n: functions.get(n) for n in names} == {n: {op_types[n]} for n in names}
    assert len({f.name for f in model.functions}) == _variant_count(variants)


def test_tensorrt_rtx_would_mix_bodies_under_overloads():
    """Control: the old form (one name, IR-10 overloads) gives both nodes one body in TensorRT-RTX; so the test
    above can fail."""
    variants = _attention_cases()[:2]
    model, _, names = mixed_model(variants)
    for i, f in enumerate(model.functions):
        f.overload, f.name = f"v{i}", "FlashAttention"
    for i, n in enumerate(model.graph.node):
        n.overload, n.op_type = f"v{i}", "FlashAttention"
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    errors = " ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
    # node1 has 4 inputs, the first FlashAttention function 3: the parser refuses (or, same arity, mixes bodies)
    assert not ok and "input" in errors, errors


def test_reattaching_after_a_pass_adds_positional_nodes_keeps_every_variant():
    """A pass adds a positional FlashAttention node to an attached graph (op-named nodes are always positional,
    compacted variants are <Op>_v<k>): attach_functions again gives every node its own semantics."""
    variants = _attention_cases()
    packed_bias, plain = variants[3], variants[0]
    model, feed, _ = mixed_model([packed_bias])
    assert [n.op_type for n in model.graph.node] == ["FlashAttention_v1"]  # (q, bias): a gap, so not the op name
    spec = OPS["FlashAttention"]
    for name in ("q", "k", "v"):
        feed[f"p_{name}"] = plain.inputs[name]
        model.graph.input.append(helper.make_tensor_value_info(f"p_{name}", TensorProto.FLOAT,
                                                               plain.inputs[name].shape))
    model.graph.node.append(helper.make_node("FlashAttention", ["p_q", "p_k", "p_v"], ["p_o"], domain="vlmx",
                                             name="added", **node_attrs(spec, plain.attrs)))
    model.graph.output.append(helper.make_tensor_value_info("p_o", TensorProto.FLOAT, None))
    attach_functions(model)
    attach_functions(model)  # idempotent
    assert sorted(n.op_type for n in model.graph.node) == ["FlashAttention", "FlashAttention_v1"]
    got = dict(zip([o.name for o in model.graph.output], run(model, feed)))
    assert_close(got["n0_o"], packed_bias.ref()[0].numpy().astype(np.float64), "fp32_exact_math", "packed+bias")
    assert_close(got["p_o"], plain.ref()[0].numpy().astype(np.float64), "fp32_exact_math", "added bsd node")

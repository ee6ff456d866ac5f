"""insert_quant (vlmx W8A8Linear with per-token dynamic scales, or static Q/DQ from calibration) and
strip_functions: numerics against the float graph on random inputs, idempotence, what each form contains."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from test_export_helpers import assert_close, run
from vlmx.export.passes import calibrate, insert_quant, run_passes, strip_functions
from vlmx.export.passes.insert_quant import quantize_weight
from vlmx.torch_ref import reference as R
from vlmx.torch_ref.op_table import op_for_type


def _mlp(dtype, k=64, hidden=256, n=48, batch=2, seq=9, seed=0):
    """x ─ MatMul(W1) ─ Add(b1) ─ Gelu-ish(Tanh) ─ MatMul(W2) ─ y: two linears, one with bias."""
    rng = np.random.default_rng(seed)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array((rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(dtype), "w1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(dtype) * 0.1, "b1"),
             numpy_helper.from_array((rng.standard_normal((hidden, n)) / np.sqrt(hidden)).astype(dtype), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", t, ["batch", "seq", k])],
                              [helper.make_tensor_value_info("y", t, ["batch", "seq", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return model, {"x": rng.standard_normal((batch, seq, k)).astype(dtype)}


def _ops(model):
    """Node op types, vlmx variant names (``<Op>_v<k>``) as their op."""
    return [op_for_type(n.op_type).name if n.domain == "vlmx" else n.op_type for n in model.graph.node]


def test_quantize_weight_is_symmetric_per_channel():
    w = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and s.shape == (40,) and np.abs(q).max() == 127
    np.testing.assert_allclose(np.abs(q * s).max(0), np.abs(w).max(0), rtol=1e-6)
    assert np.abs(q * s - w).max() <= s.max() / 2 + 1e-7


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, "w8a8"), (np.float16, "w8a8")])
def test_insert_quant_dynamic_w8a8(dtype, tolerance):
    model, feed = _mlp(dtype)
    (ref,) = run(model, feed)
    quant = run_passes(model, [lambda g: insert_quant(g, "dynamic")])
    ops = _ops(quant)
    assert ops.count("W8A8Linear") == 2 and ops.count("QuantizePerToken") == 2 and "MatMul" not in ops, ops
    assert {op_for_type(f.name).name for f in quant.functions} == {"W8A8Linear", "QuantizePerToken"}
    (out,) = run(quant, feed)
    assert out.dtype == dtype
    assert_close(out, ref, tolerance, f"W8A8Linear MLP {np.dtype(dtype).name}")
    again = run_passes(quant, [lambda g: insert_quant(g, "dynamic")])
    assert _ops(again) == ops


def test_insert_quant_dynamic_matches_torch_w8a8_reference():
    """The rewritten graph computes exactly the torch reference: quantize_per_token → w8a8_linear."""
    model, feed = _mlp(np.float32, seed=3)
    quant = run_passes(model, [lambda g: insert_quant(g, "dynamic")])
    (out,) = run(quant, feed)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = torch.from_numpy(feed["x"])

    def linear(x, w, b=None):
        wq, ws = quantize_weight(w)
        q, s = R.quantize_per_token(x)
        return R.w8a8_linear(q, s, torch.from_numpy(wq.T.copy()), torch.from_numpy(ws),
                             None if b is None else torch.from_numpy(b), out_dtype="float32")

    h = torch.tanh(linear(x, inits["w1"], inits["b1"]))
    ref = linear(h, inits["w2"])
    assert_close(out, ref.numpy(), "fp32", "W8A8 graph vs torch W8A8 reference")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_insert_quant_static_qdq(dtype):
    model, feed = _mlp(dtype)
    (ref,) = run(model, feed)
    rng = np.random.default_rng(7)
    calib = [{"x": rng.standard_normal(feed["x"].shape).astype(dtype)} for _ in range(4)] + [feed]
    amax = calibrate(model, calib)
    assert set(amax) == {"x", "h2"} and all(v > 0 for v in amax.values())
    quant = run_passes(model, [lambda g: insert_quant(g, "static", amax)])
    ops = _ops(quant)
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4, ops
    assert not any(n.domain == "vlmx" for n in quant.graph.node)
    wdq = [n for n in quant.graph.node if n.op_type == "DequantizeLinear" and
           any(a.name == "axis" for a in n.attribute)]
    assert len(wdq) == 2  # per-channel weight scales
    (out,) = run(quant, feed)
    assert_close(out, ref, "w8a8", f"static Q/DQ MLP {np.dtype(dtype).name}")
    assert _ops(run_passes(quant, [lambda g: insert_quant(g, "static", amax)])) == ops


def test_insert_quant_static_needs_calibration():
    model, _ = _mlp(np.float32)
    with pytest.raises(ValueError, match="--calib"):
        run_passes(model, [lambda g: insert_quant(g, "static")])
    with pytest.raises(ValueError, match="choose one of"):
        run_passes(model, [lambda g: insert_quant(g, "int4")])


def test_strip_functions_leaves_bare_plugin_nodes():
    model, feed = _mlp(np.float16)
    quant = run_passes(model, [lambda g: insert_quant(g, "dynamic")])
    stripped = run_passes(quant, [strip_functions], functions=False)
    assert not stripped.functions
    assert _ops(stripped) == _ops(quant)
    for n in stripped.graph.node:
        if n.domain == "vlmx":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["plugin_namespace"] == b"vlmx" and attrs["plugin_version"] == b"1"
    assert not run_passes(stripped, [strip_functions], functions=False).functions
    onnx.checker.check_model(stripped)

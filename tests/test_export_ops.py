"""vlmx ONNX domain: every op's function body (standard ONNX, run by ONNX Runtime) against the torch reference
kernels, schemas generated from the op table, the dynamo translation table, and function overloads."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from test_export_helpers import assert_close, run, single_op_model
from vlmx.export import domain
from vlmx.export.functions import attach_functions, strip_vlmx_functions
from vlmx.torch_ref import reference as R
from vlmx.torch_ref.op_table import OPS, QMAX

RNG = np.random.default_rng(1234)


def _randn(*shape, dtype=np.float32, std=1.0):
    return (RNG.standard_normal(shape) * std).astype(dtype)


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def _check_quant(q, scale, rq, rs, what):
    """int8 outputs: dequantized values within one quantization step; identical codes almost everywhere."""
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert_close(scale, rs.numpy(), "fp32_exact_math", f"{what} scale")
    codes_diff = np.abs(q.astype(np.int32) - rq.numpy().astype(np.int32))
    assert codes_diff.max() <= 1 and (codes_diff > 0).mean() < 1e-3, f"{what}: codes differ ({codes_diff.max()})"
    assert np.all(np.abs(q) <= QMAX)


ATTN_CASES = [  # (B, Sq, Sk, H, Hkv, D, attrs) - ViT-L/14-336 heads, GQA, MQA, causal decode, window, ALiBi, odd sizes
    (1, 577, 577, 16, 16, 64, dict(layout="bsd")),
    (2, 7, 7, 4, 2, 16, dict(layout="bhsd", causal=1)),
    (2, 1, 9, 4, 1, 32, dict(layout="bhsd", causal=1)),
    (1, 13, 13, 6, 6, 8, dict(layout="bsd", causal=1, window=4)),
    (2, 5, 11, 8, 8, 16, dict(layout="bhsd", alibi=1, causal=1)),
    (2, 9, 9, 6, 2, 24, dict(layout="packed", causal=1)),
    (1, 3, 5, 2, 2, 72, dict(layout="bsd", scale=0.3)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,extra", ATTN_CASES)
def test_flash_attention_body_matches_reference(b, sq, sk, h, hkv, d, extra, dtype):
    layout = extra["layout"]
    if layout == "packed":
        q, k, v = _randn(b, sq, (h + 2 * hkv) * d, dtype=dtype), None, None
    elif layout == "bsd":
        q, k, v = _randn(b, sq, h * d, dtype=dtype), _randn(b, sk, hkv * d, dtype=dtype), _randn(b, sk, hkv * d,
                                                                                                   dtype=dtype)
    else:
        q, k, v = _randn(b, h, sq, d, dtype=dtype), _randn(b, hkv, sk, d, dtype=dtype), _randn(b, hkv, sk, d,
                                                                                                 dtype=dtype)
    bias = None
    if b == 2 and layout != "packed":  # padding mask on the second row: -inf on its first two keys
        bias = np.zeros((b, 1, 1, sk), dtype)
        bias[1, ..., :2] = -np.inf
    attrs = dict(num_heads=h, num_kv_heads=hkv, head_dim=d, **extra)
    full = OPS["FlashAttention"].validate_attrs(attrs)
    ref = R.flash_attention(_t(q), _t(k), _t(v), _t(bias), **full)
    model, feed = single_op_model("FlashAttention", [q, k, v, bias], attrs)
    (out,) = run(model, feed)
    assert out.dtype == dtype
    assert_close(out, ref.float().numpy(), "fp32_exact_math" if dtype == np.float32 else "fp16",
                 f"FlashAttention {extra}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("clip", [0.0, 2.5])
def test_quantize_per_token_body(dtype, clip):
    x = _randn(3, 17, 96, dtype=dtype, std=2.0)
    x[0, 0] = 0  # an all-zero token gets the QUANT_EPS floor, q = 0
    model, feed = single_op_model("QuantizePerToken", [x], {"clip_range": clip})
    q, s = run(model, feed)
    rq, rs = R.quantize_per_token(_t(x), clip)
    _check_quant(q, s, rq, rs, "QuantizePerToken")
    assert np.all(q[0, 0] == 0)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("opset", [18, 20])
def test_gelu_quant_body(approximate, opset):
    x = _randn(2, 9, 64, dtype=np.float16, std=3.0)
    model, feed = single_op_model("GeluQuant", [x], {"approximate": approximate, "clip_range": 5.0}, opset=opset)
    q, s = run(model, feed)
    rq, rs = R.gelu_quant(_t(x), approximate, 5.0)
    _check_quant(q, s, rq, rs, f"GeluQuant {approximate} opset {opset}")


@pytest.mark.parametrize("mode,bias,per_token", [("layernorm", True, 1), ("rmsnorm", False, 1),
                                                 ("layernorm", True, 0)])
def test_norm_quant_body(mode, bias, per_token):
    c = 1152  # SigLIP width
    x, w = _randn(2, 5, c, dtype=np.float16, std=2.0), _randn(c, dtype=np.float16)
    b = _randn(c, dtype=np.float16) if bias else None
    attrs = {"mode": mode, "per_token": per_token, "static_scale": 0.05, "eps": 1e-6}
    model, feed = single_op_model("NormQuant", [x, w, b], attrs)
    model.graph.node[0].output.append("sum_out")
    model.graph.output.append(onnx.helper.make_tensor_value_info("sum_out", onnx.TensorProto.FLOAT, None))
    attach_functions(model)
    q, s, total = run(model, feed)
    rq, rs, rt = R.norm_quant(_t(x), _t(w), _t(b), mode=mode, eps=1e-6, per_token=per_token, static_scale=0.05)
    _check_quant(q, s, rq, rs, f"NormQuant {mode}")
    assert_close(total, (q.astype(np.float32) * s).sum(-1, keepdims=True), "fp32_exact_math", "NormQuant sum")
    assert_close(total, rt.numpy(), "fp32", "NormQuant sum vs reference")


@pytest.mark.parametrize("k,n", [(64, 32), (4096, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_linear_body_exact_int32_accumulation(k, n, with_bias):
    x = RNG.integers(-127, 128, (2, 7, k)).astype(np.int8)
    xs = (RNG.random((2, 7, 1)) * 1e-3 + 1e-4).astype(np.float32)
    w = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    ws = (RNG.random(n) * 1e-2 + 1e-3).astype(np.float32)
    b = _randn(n, dtype=np.float16) if with_bias else None
    model, feed = single_op_model("W8A8Linear", [x, xs, w, ws, b], {"out_dtype": "float32"})
    (y,) = run(model, feed)
    ref = R.w8a8_linear(_t(x), _t(xs), _t(w), _t(ws), _t(b), out_dtype="float32")
    assert y.dtype == (np.float16 if with_bias else np.float32)
    assert_close(y, ref.float().numpy(), "fp32_exact_math" if not with_bias else "fp16", f"W8A8Linear K={k}")


@pytest.mark.parametrize("h,hkv,d", [(32, 32, 128), (4, 2, 16)])
def test_token_importance_body(h, hkv, d):
    q, k = _randn(2, 11, h * d, dtype=np.float16), _randn(2, 24, hkv * d, dtype=np.float16)
    attrs = dict(num_heads=h, num_kv_heads=hkv, head_dim=d)
    model, feed = single_op_model("TokenImportance", [q, k], attrs)
    (s,) = run(model, feed)
    ref = R.token_importance(_t(q), _t(k), **OPS["TokenImportance"].validate_attrs(attrs))
    assert s.dtype == np.float32
    assert_close(s, ref.numpy(), "fp32_exact_math", "TokenImportance")
    np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("n,keep", [(576, 144), (9, 1), (9, 9), (16, 5)])
def test_gather_topk_body_order_and_ties(n, keep):
    x = _randn(3, n, 8)
    scores = RNG.integers(0, 4, (3, n)).astype(np.float32)  # many ties: lower index must win
    model, feed = single_op_model("GatherTopK", [x, scores, np.array([keep], np.int64)], {})
    kept, idx = run(model, feed)
    rx, ri = R.gather_topk(_t(x), _t(scores), keep)
    np.testing.assert_array_equal(idx, ri.numpy())
    np.testing.assert_array_equal(kept, rx.numpy())


def test_schemas_and_checker_accept_a_vlmx_model():
    domain.register_schemas()
    for op in OPS.values():
        assert onnx.defs.has(op.name, 1, "vlmx")
        schema = onnx.defs.get_schema(op.name, 1, "vlmx")
        assert [i.name for i in schema.inputs] == [t.name for t in op.inputs]
        assert {"plugin_namespace", "plugin_version"} <= set(schema.attributes)
    q = _randn(1, 4, 32)
    model, _ = single_op_model("FlashAttention", [q, q, q, None], dict(num_heads=2, head_dim=16),
                               out_shapes=[[1, 4, 32]])
    onnx.checker.check_model(model, full_check=True)


def test_two_variants_get_their_own_function_names_and_both_run():
    """Two FlashAttention nodes with different attributes: one function per variant, named per variant (node
    op_type = function name, no overloads: TensorRT's parser ignores them)."""
    from onnx import TensorProto, helper

    op = OPS["FlashAttention"]
    n1 = helper.make_node("FlashAttention", ["x", "x", "x"], ["y"], domain="vlmx",
                          **domain.node_attrs(op, dict(num_heads=2, head_dim=8)))
    n2 = helper.make_node("FlashAttention", ["y", "y", "y"], ["z"], domain="vlmx",
                          **domain.node_attrs(op, dict(num_heads=4, head_dim=4, causal=1)))
    g = helper.make_graph([n1, n2], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5, 16])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vlmx", 1)])
    attach_functions(model)
    assert sorted((f.name, f.overload) for f in model.functions) == [("FlashAttention", ""),
                                                                     ("FlashAttention_v1", "")]
    assert [n.op_type for n in model.graph.node] == ["FlashAttention", "FlashAttention_v1"]
    assert domain.ops_used(model) == ["FlashAttention"]
    onnx.checker.check_model(model, full_check=True)
    attach_functions(model)  # idempotent
    assert len(model.functions) == 2
    x = _randn(2, 5, 16)
    (z,) = run(model, {"x": x})
    y = R.flash_attention(_t(x), _t(x), _t(x), num_heads=2, head_dim=8)
    ref = R.flash_attention(y, y, y, num_heads=4, head_dim=4, causal=1)
    assert_close(z, ref.numpy(), "fp32_exact_math", "two FlashAttention variants")
    strip_vlmx_functions(model)
    assert not model.functions and [n.op_type for n in model.graph.node] == ["FlashAttention"] * 2


class _AllOps(torch.nn.Module):
    def forward(self, x, keep):
        a = torch.ops.vlmx.flash_attention(x, x, x, None, num_heads=2, head_dim=8, causal=1)
        q, s = torch.ops.vlmx.quantize_per_token(a)
        scores = torch.ops.vlmx.token_importance(a, x, num_heads=2, head_dim=8)
        kept, idx = torch.ops.vlmx.gather_topk(a, scores, keep)
        return q, s, kept, idx


def test_dynamo_export_emits_vlmx_nodes_with_plugin_attributes(tmp_path):
    from vlmx.export.exporter import export_graph
    from vlmx.export.model_configs import GraphSpec

    x = torch.randn(2, 6, 16)
    spec = GraphSpec("allops", _AllOps(), {"x": x, "keep": torch.tensor([3])}, ["q", "scale", "kept", "idx"],
                     {"x": {0: "batch", 1: "seq"}})
    path = export_graph(spec, tmp_path)
    model = onnx.load(str(path))
    nodes = {n.op_type: n for n in model.graph.node if n.domain == "vlmx"}
    assert set(nodes) == {"FlashAttention", "QuantizePerToken", "TokenImportance", "GatherTopK"}
    for n in nodes.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"vlmx" and attrs["plugin_version"] == b"1"
    assert {f.name for f in model.functions} == set(nodes)
    assert domain.ops_used(model) == sorted(nodes)
    outs = run(model, {"x": x.numpy(), "keep": np.array([3])})
    ref = _AllOps()(x, torch.tensor([3]))
    _check_quant(outs[0], outs[1], ref[0], ref[1], "exported QuantizePerToken")
    assert_close(outs[2], ref[2].numpy(), "fp32_exact_math", "exported GatherTopK features")
    np.testing.assert_array_equal(outs[3], ref[3].numpy())

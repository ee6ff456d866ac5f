"""fuse_qkv and fuse_attention: numerics-preserving (ONNX Runtime before vs after on random inputs), idempotent,
and firing on hypothesis-generated graphs and on graphs exported from stock transformers modules (no vlmx ops)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from stock_onnx import randomize
from test_export_helpers import assert_close, run
from vlmx.export.passes import cleanup, fuse_attention, fuse_qkv, run_passes
from vlmx.torch_ref.op_table import op_for_type


def _ops(model):
    """Node op types, vlmx variant names (``<Op>_v<k>``) as their op."""
    return [op_for_type(n.op_type).name if n.domain == "vlmx" else n.op_type for n in model.graph.node]


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


# ------------------------------------------------------------------------------------------------- fuse_qkv
@st.composite
def qkv_graphs(draw):
    b, s, k = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(2, 24))
    n_proj = draw(st.integers(2, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    nodes, inits, outputs = [], [], []
    for i in range(n_proj):
        n = draw(st.integers(1, 16))
        inits.append(_init(f"w{i}", rng.standard_normal((k, n)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]))
        out = f"m{i}"
        if draw(st.booleans()):
            inits.append(_init(f"b{i}", rng.standard_normal(n).astype(np.float32)))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"]))
            out = f"y{i}"
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    if draw(st.booleans()):  # another consumer of x that is not a projection
        nodes.append(helper.make_node("Relu", ["x"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, s, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((b, s, k)).astype(np.float32)
    return model, {"x": x}, n_proj


@settings(max_examples=25, deadline=None)
@given(qkv_graphs())
def test_fuse_qkv_on_generated_graphs(case):
    model, feed, n_proj = case
    before = run(model, feed)
    fused = run_passes(model, [fuse_qkv])
    ops = _ops(fused)
    if n_proj >= 3:
        assert ops.count("MatMul") == 1 and ops.count("Split") == 1, ops
    else:
        assert ops.count("MatMul") == n_proj and "Split" not in ops, ops
    after = run(fused, feed)
    for i, (a, r) in enumerate(zip(after, before)):
        assert_close(a, r, "fp32_exact_math", f"fuse_qkv output {i}")
    again = run_passes(fused, [fuse_qkv])
    assert _ops(again) == ops  # idempotent


# ------------------------------------------------------------------------------------------------- fuse_attention
@st.composite
def attention_graphs(draw):
    b, h, sq, sk = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    d = draw(st.sampled_from([4, 8, 16]))
    scale_kind = draw(st.sampled_from(["none", "mul", "div", "prescale"]))
    mask_kind = draw(st.sampled_from(["none", "input", "const"]))
    casts = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    nodes, inits = [], []
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f32, [b, h, s, d]) for n, s in (("q", sq), ("k", sk), ("v", sk))]
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]))
    qn, kn = "q", "kt"
    if scale_kind == "prescale":  # how torch lowers SDPA below opset 23
        c = float(d) ** -0.25
        inits.append(_init("c", np.asarray(c, np.float32)))
        nodes += [helper.make_node("Mul", ["q", "c"], ["qs"]), helper.make_node("Mul", ["kt", "c"], ["kts"])]
        qn, kn = "qs", "kts"
    nodes.append(helper.make_node("MatMul", [qn, kn], ["s0"]))
    cur = "s0"
    if scale_kind in ("mul", "div"):
        inits.append(_init("scale", np.asarray(rng.uniform(0.05, 2.0), np.float32)))
        nodes.append(helper.make_node("Mul" if scale_kind == "mul" else "Div", [cur, "scale"], ["s1"]))
        cur = "s1"
    feed = {n: rng.standard_normal((b, h, s, d)).astype(np.float32) for n, s in (("q", sq), ("k", sk), ("v", sk))}
    if mask_kind != "none":
        mask = np.where(rng.random((b, 1, sq, sk)) < 0.3, -1e9, 0.0).astype(np.float32)
        mask[..., 0] = 0.0  # every query keeps at least one key
        if mask_kind == "input":
            inputs.append(helper.make_tensor_value_info("mask", f32, [b, 1, sq, sk]))
            feed["mask"] = mask
        else:
            inits.append(_init("mask", mask[:1, :, :1]))
        order = draw(st.booleans())
        nodes.append(helper.make_node("Add", [cur, "mask"] if order else ["mask", cur], ["s2"]))
        cur = "s2"
    if casts:
        nodes.append(helper.make_node("Cast", [cur], ["s3"], to=f32))
        cur = "s3"
    nodes.append(helper.make_node("Softmax", [cur], ["p0"], axis=-1))
    cur = "p0"
    if casts:
        nodes.append(helper.make_node("Cast", [cur], ["p1"], to=f32))
        cur = "p1"
    nodes.append(helper.make_node("MatMul", [cur, "v"], ["o"]))
    graph = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("o", f32, [b, h, sq, d])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model, feed  # no value_info: run_passes infers shapes itself


@settings(max_examples=25, deadline=None)
@given(attention_graphs())
def test_fuse_attention_on_generated_graphs(case):
    model, feed = case
    (before,) = run(model, feed)
    fused = run_passes(model, [fuse_attention])
    ops = _ops(fused)
    assert ops.count("FlashAttention") == 1 and "Softmax" not in ops, ops
    (after,) = run(fused, feed)
    assert_close(after, before, "fp32_exact_math", "fuse_attention")
    assert _ops(run_passes(fused, [fuse_attention])) == ops  # idempotent


def test_fuse_attention_leaves_softmax_with_other_consumers():
    """Attention probabilities that are also a graph output (need_weights) must stay decomposed."""
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "k"], ["o"])]
    vi = [helper.make_tensor_value_info(n, f32, [1, 2, 3, 4]) for n in ("q", "k")]
    graph = helper.make_graph(nodes, "g", vi, [helper.make_tensor_value_info("o", f32, None),
                                               helper.make_tensor_value_info("p", f32, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert "FlashAttention" not in _ops(run_passes(model, [fuse_attention]))


# ------------------------------------------------------------------------------------------------- stock modules
def _export_stock(module, args, names, tmp_path):
    from vlmx.export.exporter import _quiet

    path = tmp_path / "stock.onnx"
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(module, args, input_names=names, dynamo=True, opset_version=18)
        prog.save(str(path))
    return onnx.load(str(path))


def test_passes_fire_on_stock_transformers_clip_vision(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=14, attn_implementation="eager")
    model = randomize(CLIPVisionModel(cfg).eval())  # non-zero biases, non-unit norm scales
    px = torch.randn(2, 3, 56, 56)
    onnx_model = _export_stock(model, (px,), ["pixel_values"], tmp_path)
    assert not any(n.domain == "vlmx" for n in onnx_model.graph.node)
    feed = {"pixel_values": px.numpy()}
    before = run(onnx_model, feed)
    fused = run_passes(onnx_model, [fuse_qkv, fuse_attention, cleanup])
    ops = _ops(fused)
    assert ops.count("Split") == 3 and ops.count("FlashAttention") == 3 and "Softmax" not in ops, ops
    after = run(fused, feed)
    for i, (a, r) in enumerate(zip(after, before)):
        assert_close(a, r, "fp32", f"stock CLIP output {i}")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_passes_fire_on_stock_transformers_llama(tmp_path, kv_heads):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=64, attention_bias=True, attn_implementation="eager")
    model = randomize(LlamaModel(cfg).eval())

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, embeds, mask):
            return self.m(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    embeds = torch.randn(2, 7, 64)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0
    onnx_model = _export_stock(Wrap(), (embeds, mask), ["embeds", "mask"], tmp_path)
    feed = {"embeds": embeds.numpy(), "mask": mask.numpy()}
    (before,) = run(onnx_model, feed)
    fused = run_passes(onnx_model, [fuse_qkv, fuse_attention, cleanup])
    ops = _ops(fused)
    assert ops.count("FlashAttention") == 2 and "Softmax" not in ops, ops
    assert ops.count("Split") == 2, ops
    (after,) = run(fused, feed)
    assert_close(after[0], before[0], "fp32", "stock Llama, unpadded row")
    assert_close(after[1, 2:], before[1, 2:], "fp32", "stock Llama, padded row (real tokens)")

"""vlm-optimize on stock transformers graphs (random non-zero biases and norm scales) in every form torch.onnx
writes: CLIP, SigLIP, Llama MHA/GQA/MQA with a left-padded mask, MPT with ALiBi; dynamo and legacy exporters, eager
and sdpa attention, static and dynamic shapes. Every attention layer and every Q/K/V group must fuse, and the
numeric check (ONNX Runtime, output vs input on fresh random inputs) must pass at the fp32 threshold.

Optimum's exports are not covered: optimum-onnx 0.1.0 (the only release) requires transformers < 4.58, and vlmx
pins transformers 5.23-5.24, so it cannot be installed here.
"""
from __future__ import annotations

import itertools

import onnx
import pytest
import torch

import stock_onnx as S
from vlmx.export.optimize import Options, optimize

pytestmark = pytest.mark.slow  # 56 torch.onnx exports: ~2 min of CPU
LAYERS = 2
KV_HEADS = {"llama-mha": 4, "llama-gqa": 2, "llama-mqa": 1}
FORMS = [f for f in itertools.product(S.FAMILIES, S.EXPORTERS, S.ATTENTIONS, ("static", "dynamic"))
         if not (f[0] == "mpt" and f[2] == "sdpa")]  # transformers' MPT has no sdpa path


def _id(f):
    return "-".join(f)


@pytest.mark.parametrize("form", FORMS, ids=_id)
def test_every_stock_form_fuses_and_passes_the_check(tmp_path, form):
    family, exporter, attention, shapes = form
    src = tmp_path / "in.onnx"
    S.export(family, exporter, attention, shapes == "dynamic", src, layers=LAYERS)
    dst = tmp_path / "out.onnx"
    report = optimize(src, dst, Options(qkv=True, attention="vlmx", seed=0))
    rows = report["passes"]["fuse_attention"]
    assert [r["status"] for r in rows] == ["fused"] * LAYERS, rows
    if family != "mpt":  # MPT's Wqkv is already one projection
        assert report["summary"]["fuse_qkv"]["fused"] == LAYERS, report["passes"]["fuse_qkv"]
    assert report["check"]["verdict"] == "PASS", report["check"]
    out = onnx.load(str(dst))
    fa = [n for n in out.graph.node if n.op_type == "FlashAttention"]
    assert len(fa) == LAYERS and not any(n.op_type == "Softmax" for n in out.graph.node)
    attrs = {a.name: a.i for a in fa[0].attribute}
    assert attrs["num_kv_heads"] == KV_HEADS.get(family, 4)  # GQA/MQA expansion undone: the true kv heads
    # MPT: a static export's ALiBi constant is verified and becomes alibi=1; a sliced (dynamic) one stays a bias
    assert attrs["alibi"] == int(family == "mpt" and shapes == "static")


ONNX_FORMS = [("clip", "legacy", "eager"), ("clip", "legacy", "sdpa"), ("clip", "dynamo", "eager"),
              ("llama-gqa", "legacy", "sdpa"), ("llama-mqa", "legacy", "eager"), ("mpt", "legacy", "eager")]


@pytest.mark.parametrize("form", ONNX_FORMS, ids=_id)
def test_fusion_to_the_standard_onnx_attention(tmp_path, form):
    family, exporter, attention = form
    src = tmp_path / "in.onnx"
    S.export(family, exporter, attention, True, src, opset=23, layers=LAYERS)
    dst = tmp_path / "out.onnx"
    report = optimize(src, dst, Options(attention="onnx", seed=1))
    assert report["summary"]["fuse_attention"] == {"fused": LAYERS, "not matched": 0}, report["passes"]
    assert report["check"]["verdict"] == "PASS", report["check"]
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("Attention") == LAYERS and "Softmax" not in ops and "FlashAttention" not in ops


FP16_FORMS = [("clip", "legacy", "eager"), ("llama-gqa", "legacy", "eager"), ("llama-gqa", "legacy", "sdpa")]


@pytest.mark.parametrize("form", FP16_FORMS, ids=_id)
def test_float16_forms(tmp_path, form):
    """float16 graphs: Casts around Softmax, and SDPA's upcast of only V to float32 (the fused op casts the kv
    heads to q's type and the output back to what the graph expects); fp16 threshold."""
    family, exporter, attention = form
    src = tmp_path / "in.onnx"
    S.export(family, exporter, attention, True, src, layers=LAYERS, dtype=torch.float16)
    report = optimize(src, tmp_path / "out.onnx", Options(qkv=True, attention="vlmx", seed=2))
    assert report["summary"]["fuse_attention"] == {"fused": LAYERS, "not matched": 0}, report["passes"]
    assert report["check"]["precision"] == "fp16" and report["check"]["verdict"] == "PASS", report["check"]

"""vlm-export runs ``fuse_attention`` on every graph (``--attention plugin`` → vlmx FlashAttention, ``native`` → the
ONNX Attention op; not ``decomposed``) and records what matched in the manifest's passes. On our presets every
attention is already swapped, so it fuses nothing; an attention the swap missed (simulated: the vision tower and
the language model left in their eager MatMul/Softmax form) is fused, in memory and on the streamed (7B) path, and
the accuracy report still passes."""
from __future__ import annotations

import json

import onnx
import pytest

from vlmx.export import kv_attention
from vlmx.export.driver import ExportOptions, export_model
from vlmx.export.model_configs import LlavaFamily

FUSED_OP = {"plugin": "FlashAttention", "native": "Attention"}


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.slow
@pytest.mark.parametrize("attention,streamed", [("plugin", False), ("native", True)])
def test_attention_the_swap_missed_is_fused(tmp_path, monkeypatch, attention, streamed):
    monkeypatch.setitem(LlavaFamily.ATTN_IMPL, attention, LlavaFamily.ATTN_IMPL["decomposed"])
    monkeypatch.setitem(kv_attention.HF_NAMES, attention, kv_attention.HF_NAMES["decomposed"])
    out = tmp_path / "export"
    manifest = export_model(ExportOptions(model="llava-tiny", out=out, precision="fp32", attention=attention,
                                          external_threshold=0 if streamed else None))
    target = "vlmx" if attention == "plugin" else "onnx"
    passes = {g: e["passes"][0] for g, e in manifest["graphs"].items()}
    # vision: the one encoder layer fused; the [CLS] attention probabilities (a graph output for pruning) are not
    assert passes["vision"].startswith(f"fuse_attention({target}): 1 fused, 1 not matched (Softmax output feeds"), \
        passes
    assert passes["lm"] == f"fuse_attention({target}): 2 fused, 0 not matched", passes
    assert passes["embed"] == f"fuse_attention({target}): 0 fused, 0 not matched", passes
    for g, fused, left in (("vision", 1, 1), ("lm", 2, 0)):  # left: the [CLS] probabilities' Softmax
        ops = _ops(out / f"{g}.onnx")
        assert (ops.count(FUSED_OP[attention]), ops.count("Softmax")) == (fused, left), (g, ops)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"], {g: {k: v["relative"] for k, v in r.items()} for g, r in report["graphs"].items()}


def test_decomposed_export_is_left_decomposed(tmp_path):
    out = tmp_path / "export"
    manifest = export_model(ExportOptions(model="llava-tiny", out=out, precision="fp32", attention="decomposed",
                                          report=False))
    assert not any(p.startswith("fuse_attention") for e in manifest["graphs"].values() for p in e["passes"])
    assert "FlashAttention" not in _ops(out / "lm.onnx") and "Softmax" in _ops(out / "lm.onnx")

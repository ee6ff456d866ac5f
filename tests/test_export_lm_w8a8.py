"""--precision w8a8 on the language model: SmoothQuant smoothing in torch, then W8A8Linear for every LM linear,
through the in-memory passes and through the large-graph (external data, streamed) path forced by a small
threshold; the accuracy report judges both against the float32 reference."""
from __future__ import annotations

import json

import onnx
import pytest

from vlmx.export.driver import LM_W8A8_FILE, QUANT_GRAPHS, ExportOptions, export_model

LM_GRAPHS = tuple(g for g in QUANT_GRAPHS if g != "vision")  # prefill + decode, or the one LM graph


def _float_linears(model: onnx.ModelProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2)


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True])
def test_llava_tiny_w8a8_language_model(tmp_path, streamed):
    out = tmp_path / "export"
    skip = ("model.language_model.layers.0.mlp.down_proj",) if streamed else None
    manifest = export_model(ExportOptions(model="llava-tiny", out=out, precision="w8a8", lm_skip=skip,
                                          external_threshold=0 if streamed else None))
    report = json.loads((out / "report.json").read_text())
    print(json.dumps({g: {k: v["relative"] for k, v in r.items()} for g, r in report["graphs"].items()}))
    assert report["passed"], report
    plan = json.loads((out / LM_W8A8_FILE).read_text())
    assert plan["tokens"] > 0 and any(a is not None for a in plan["alphas"].values()), plan["alphas"]
    assert plan["skip"] == list(skip or plan["skip"])
    for g in LM_GRAPHS:
        model = onnx.load(str(out / f"{g}.onnx"), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        passes = manifest["graphs"][g]["passes"]
        assert ("insert_quant(dynamic, streamed)" in passes) == streamed, passes
        # 2 layers × (q, k, v or one fused qkv; o, gate, up, down) + lm_head, less the skipped ones
        per_layer = 7 if streamed else 5
        assert ops.count("W8A8Linear") == 2 * per_layer + 1 - len(plan["skip"]), ops
        assert ops.count("QuantizePerToken") == ops.count("W8A8Linear")
        assert _float_linears(model) == len(plan["skip"]), plan["skip"]
        if streamed:
            assert (out / f"{g}.onnx.data").exists()
    assert not any("stay float" in n for n in manifest["notes"]), manifest["notes"]

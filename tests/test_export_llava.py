"""End-to-end exports of the tiny presets: the artifact contract (files, manifest, I/O names, dynamic axes),
ONNX Runtime vs torch through the accuracy report, KV-cache consistency of prefill + decode, dynamic shapes."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from test_export_helpers import assert_close, session
from vlmx.export.cli import main
from vlmx.export.driver import ExportOptions, export_model
from vlmx.torch_ref.contract import FORMAT_VERSION, GRAPH_NAMES as GRAPHS, THRESHOLDS


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llava-tiny"
    rc = main(["--model", "llava-tiny", "--precision", "fp32", "--out", str(out), "--quiet", "--keep", "0.5"])
    assert rc == 0
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _names(entries):
    return [e["name"] for e in entries]


def test_directory_holds_the_contract_files(fp32_export):
    files = {p.name for p in fp32_export.iterdir()}
    assert {f"{g}.onnx" for g in GRAPHS} | {"manifest.json", "reference.npz", "report.json", "report.md",
                                           "vision_layer_error.png", "vlmx_ops.md"} <= files
    assert not list(fp32_export.parent.glob("*.vlmx-tmp-*"))


def test_manifest_matches_the_contract(fp32_export):
    m = _manifest(fp32_export)
    assert (m["format"], m["format_version"], m["model"], m["checkpoint"]) == ("vlmx-export", FORMAT_VERSION, "llava-tiny", None)
    assert (m["target"], m["sm"], m["precision"], m["attention"], m["opset"]) == ("trt-sm75", 75, "fp32", "plugin",
                                                                                  18)
    assert (m["keep"], m["prune"], m["seed"], m["reference"]) == (0.5, "text", 0, "reference.npz")
    assert m["ops_used"] == ["FlashAttention", "GatherTopK", "TokenImportance"]
    info = m["model_info"]
    assert info["vision"] == "clip" and info["language"] == "llama" and info["has_cls"] and info["position_ids"]
    assert (info["num_image_tokens"], info["lm_hidden"], info["num_layers"], info["head_dim"]) == (16, 128, 2, 32)
    for key in ("image_size", "num_heads", "num_kv_heads", "vocab_size", "bos_token_id", "eos_token_id",
                "image_token_id", "dtype"):
        assert key in info
    g = m["graphs"]
    assert set(g) == set(GRAPHS)
    assert _names(g["vision"]["inputs"]) == ["pixel_values"]
    assert _names(g["vision"]["outputs"]) == ["image_features", "cls_attention"]
    assert g["vision"]["outputs"][0]["shape"] == ["batch", 16, 128]
    assert _names(g["embed"]["inputs"]) == ["input_ids"] and g["embed"]["inputs"][0]["dtype"] == "int64"
    assert _names(g["score"]["inputs"]) == ["text_embeds", "image_features"]
    assert g["score"]["outputs"] == [{"name": "scores", "shape": ["batch", 16], "dtype": "float32"}]
    assert _names(g["prune"]["inputs"]) == ["image_features", "scores", "keep"]
    assert _names(g["prune"]["outputs"]) == ["kept_features", "kept_index"]
    assert g["prune"]["outputs"][1]["shape"] == ["batch", "keep"]
    kv = [f"{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert "prefill" not in g and "decode" not in g  # one LM graph, the weights stored once
    assert _names(g["lm"]["inputs"]) == ["inputs_embeds", "attention_mask"] + [f"past.{n}" for n in kv]
    assert _names(g["lm"]["outputs"]) == ["logits"] + [f"present.{n}" for n in kv]
    assert g["lm"]["inputs"][2]["shape"] == ["batch", 4, 512, 32] == g["lm"]["outputs"][1]["shape"]
    assert g["lm"]["dynamic_axes"]["past.0.key"] == {"0": "batch"}
    assert g["lm"]["profiles"]["decode"]["past.0.key"] == {"min": [1, 4, 512, 32], "opt": [1, 4, 512, 32],
                                                          "max": [4, 4, 512, 32]}
    assert g["lm"]["outputs"][0] == {"name": "logits", "shape": ["batch", 1, 1024], "dtype": "float32"}
    assert info["max_seq_len"] == 512 and g["lm"]["opset"] == 24
    assert set(g["lm"]["profiles"]) == {"prefill", "decode"} and g["lm"]["profile"] == g["lm"]["profiles"]["prefill"]
    assert g["lm"]["profiles"]["decode"]["inputs_embeds"]["max"][1] == 1
    assert g["lm"]["profiles"]["prefill"]["attention_mask"]["max"][1] == 512
    for rel, meta in m["files"].items():
        data = (fp32_export / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["bytes"]
    assert set(m["versions"]) == {"vlmx", "torch", "onnx", "transformers", "onnxruntime", "polygraphy", "python"}
    assert m["created"].endswith("+00:00") and len(m["manifest_sha256"]) == 64


def test_every_vlmx_node_is_a_plugin_node_backed_by_a_function(fp32_export):
    for g in GRAPHS:
        model = onnx.load(str(fp32_export / f"{g}.onnx"))
        onnx.checker.check_model(model)
        functions = {(f.domain, f.name, f.overload) for f in model.functions}
        for n in model.graph.node:
            if n.domain == "vlmx":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                assert attrs["plugin_namespace"] == b"vlmx" and attrs["plugin_version"] == b"1"
                assert ("vlmx", n.op_type, n.overload) in functions


def test_report_passes_at_fp32_threshold(fp32_export):
    report = json.loads((fp32_export / "report.json").read_text())
    assert report["threshold"] == THRESHOLDS["fp32"] and report["passed"]
    assert set(report["graphs"]) == set(GRAPHS)
    assert report["vision_layers"] and all(r["relative"] <= 1e-5 for r in report["vision_layers"])
    assert "PASSED" in (fp32_export / "report.md").read_text()


def test_decode_continues_prefill_exactly(fp32_export):
    """lm(S tokens) then lm(token S+1, the presents as past) == lm(S+1 tokens): logits and the whole cache."""
    lm = session(onnx.load(str(fp32_export / "lm.onnx")))
    names = [o.name for o in lm.get_outputs()]
    rng = np.random.default_rng(5)
    emb = (rng.standard_normal((1, 12, 128)) * 0.5).astype(np.float32)
    empty = {i.name: np.zeros((1, 4, 512, 32), np.float32) for i in lm.get_inputs() if i.name.startswith("past.")}

    def run(e, past, length):
        out = dict(zip(names, lm.run(None, {"inputs_embeds": e, "attention_mask": np.ones((1, length), np.int64),
                                            **past})))
        return out, {f"past.{k[len('present.'):]}": v for k, v in out.items() if k.startswith("present.")}

    full, _ = run(emb, empty, 12)
    _, past = run(emb[:, :11], empty, 11)
    assert not np.any(past["past.0.key"][:, :, 11:]), "slots past the prompt must stay untouched"
    step, _ = run(emb[:, 11:], past, 12)
    assert_close(step["logits"], full["logits"], "fp32", "decode logits vs prefill")
    assert_close(step["present.1.value"], full["present.1.value"], "fp32", "decode present vs prefill")


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(fp32_export, batch):
    vision = session(onnx.load(str(fp32_export / "vision.onnx")))
    px = np.random.default_rng(batch).standard_normal((batch, 3, 56, 56)).astype(np.float32)
    feats, cls = vision.run(None, {"pixel_values": px})
    assert feats.shape == (batch, 16, 128) and cls.shape == (batch, 16)
    np.testing.assert_allclose(cls.sum(-1), 1.0, rtol=1e-5)
    prune = session(onnx.load(str(fp32_export / "prune.onnx")))
    kept, idx = prune.run(None, {"image_features": feats, "scores": cls, "keep": np.array([4])})
    assert kept.shape == (batch, 4, 128) and np.all(np.diff(idx, axis=-1) > 0)


CONFIGS = [  # preset, precision, attention, checks
    ("llava-siglip-tiny", "w8a8", "plugin", {"ops": ["NormQuant", "GeluQuant", "W8A8Linear", "QuantizePerToken"],
                                             "no_output": "cls_attention"}),
    ("llava-mpt-tiny", "fp16", "decomposed", {"no_op": "FlashAttention", "no_input": "position_ids"}),
    ("llava-tiny", "fp16", "native", {"onnx_op": "Attention", "no_op": "FlashAttention"}),
]


@pytest.mark.parametrize("preset,precision,attention,checks", CONFIGS)
def test_other_families_precisions_and_attention_modes(tmp_path, preset, precision, attention, checks):
    out = tmp_path / "export"
    manifest = export_model(ExportOptions(model=preset, out=out, precision=precision, attention=attention))
    report = json.loads((out / "report.json").read_text())
    print(json.dumps({g: {k: v["relative"] for k, v in r.items()} for g, r in report["graphs"].items()}))
    assert report["passed"], report
    ops = Counter()
    for g in GRAPHS:
        ops.update(f"{n.domain}:{n.op_type}" for n in onnx.load(str(out / f"{g}.onnx")).graph.node)
    for op in checks.get("ops", []):
        assert ops[f"vlmx:{op}"] > 0 and op in manifest["ops_used"], op
    if "no_op" in checks:
        assert ops[f"vlmx:{checks['no_op']}"] == 0 and checks["no_op"] not in manifest["ops_used"]
    if "onnx_op" in checks:
        assert ops[f":{checks['onnx_op']}"] > 0 and manifest["opset"] == 23
    if "no_output" in checks:
        assert checks["no_output"] not in _names(manifest["graphs"]["vision"]["outputs"])
    if "no_input" in checks:
        assert checks["no_input"] not in _names(manifest["graphs"]["lm"]["inputs"])
        assert manifest["model_info"]["position_ids"] is False


def test_plugins_only_export_has_bare_vlmx_nodes(tmp_path):
    out = tmp_path / "bare"
    manifest = export_model(ExportOptions(model="llava-tiny", out=out, precision="fp32", plugins_only=True))
    assert manifest["plugins_only"] and manifest["report"] is None
    for g in GRAPHS:
        model = onnx.load(str(out / f"{g}.onnx"))
        assert not model.functions
        assert "strip_functions" in manifest["graphs"][g]["passes"]
    assert set(manifest["ops_used"]) == {"FlashAttention", "GatherTopK", "TokenImportance"}


def test_meta_device_random_model_is_complete():
    """Large presets are built on the meta device and filled in place: every tensor real, rotary tables right."""
    import torch

    from vlmx.export.weights import random_model
    from vlmx.torch_ref import models

    spec, model, _ = random_model("llava-tiny", seed=1, dtype=torch.float32)
    assert all(not t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    rotary = model.model.language_model.rotary_emb
    fresh = type(rotary)(rotary.config)
    torch.testing.assert_close(rotary.inv_freq, fresh.inv_freq)
    ids = torch.tensor([[models.BOS_ID, 5, 6] + [spec.image_token_id] * spec.num_image_tokens + [7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56)).logits
    assert torch.isfinite(logits).all() and logits.std() > 0

"""The VLM runtime end to end on CPU: llava-tiny exported to ONNX, run by ONNX Runtime (and the torch backend)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlmx.torch_ref import models
from vlmx.trt_runtime import compare, run_cli
from vlmx.trt_runtime.artifacts import ArtifactError, load_artifacts
from vlmx.trt_runtime.pipeline import PipelineError, VLMPipeline

PRESET = "llava-tiny"
PROMPT = "What is shown in this picture?"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    """The session's fp32 llava-tiny export with vlmx plugin attention (ORT runs the vlmx function bodies)."""
    return tiny_export


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng()  # fresh image every test
    path = tmp_path / "image.png"
    Image.fromarray((rng.random((90, 70, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pipe(export_dir):
    with VLMPipeline(export_dir, backend="onnxruntime") as p:
        yield p


def torch_greedy(export_dir, pipe, image_path) -> list[int]:
    """transformers' own LLaVA generate() on the same weights, image and prompt: the reference tokens."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    model = models.build_model(PRESET, seed=manifest["seed"])
    prefix, suffix = pipe.prompt_ids(PROMPT)
    n = manifest["model_info"]["num_image_tokens"]
    ids = np.concatenate([prefix, np.full(n, manifest["model_info"]["image_token_id"]), suffix])
    input_ids = torch.from_numpy(ids).long()[None]
    pixel_values = torch.from_numpy(pipe.preprocess(image_path))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values,
                             attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=manifest["model_info"]["eos_token_id"], pad_token_id=0)
    return out[0, input_ids.shape[1]:].tolist()


def test_keep_1_reproduces_torch_reference_greedy_tokens(export_dir, pipe, image_path):
    res = pipe.generate(image_path, PROMPT, keep=1.0, max_new_tokens=NEW_TOKENS)
    ref = torch_greedy(export_dir, pipe, image_path)
    print("onnxruntime tokens", res.tokens, "torch reference tokens", ref)
    assert res.tokens == ref
    assert res.kept == res.num_visual_tokens == 16
    assert np.array_equal(res.kept_index[0], np.arange(16))


@pytest.mark.parametrize("keep, expected", [(0.5, 8), (0.25, 4), (5, 5)])
def test_pruning_keeps_top_tokens_in_order(pipe, image_path, keep, expected):
    res = pipe.generate(image_path, PROMPT, keep=keep, max_new_tokens=4)
    idx = res.kept_index[0]
    assert res.kept == expected and len(res.tokens) >= 1
    assert np.all(np.diff(idx) > 0), f"kept tokens out of order: {idx}"
    # The kept tokens are the highest-scoring ones, recomputed here from the graphs' own scores.
    pixel_values = pipe.preprocess(image_path)
    feats = pipe.runners["vision"].infer({"pixel_values": pixel_values})["image_features"]
    prefix, suffix = pipe.prompt_ids(PROMPT)
    text = np.concatenate([pipe._embed(prefix), pipe._embed(suffix)], axis=1)
    scores = pipe.runners["score"].infer({"text_embeds": text, "image_features": feats})["scores"][0]
    assert np.isclose(scores.sum(), 1.0, atol=1e-5)
    assert scores[idx].min() >= np.delete(scores, idx).max() - 1e-7


def test_cls_pruning_uses_the_vision_graph_attention(export_dir, image_path):
    with VLMPipeline(export_dir, prune="cls") as p:
        res = p.generate(image_path, PROMPT, keep=0.25, max_new_tokens=2)
        cls = p.runners["vision"].infer({"pixel_values": p.preprocess(image_path)})["cls_attention"][0]
    assert res.kept == 4 and np.all(np.diff(res.kept_index[0]) > 0)
    assert set(res.kept_index[0]) == set(np.argsort(-cls, kind="stable")[:4])


def test_torch_backend_matches_onnxruntime(export_dir, pipe, image_path):
    ort_res = pipe.generate(image_path, PROMPT, keep=0.5, max_new_tokens=6)
    with VLMPipeline(export_dir, backend="torch") as tp:
        torch_res = tp.generate(image_path, PROMPT, keep=0.5, max_new_tokens=6)
    assert torch_res.tokens == ort_res.tokens
    assert np.array_equal(torch_res.kept_index, ort_res.kept_index)


def test_vlm_run_cli_prints_text_and_timings(export_dir, image_path, capsys):
    rc = run_cli.main(["--artifacts", str(export_dir), "--image", str(image_path), "--prompt", PROMPT,
                       "--keep", "0.5", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("tokens:", "visual tokens kept: 8 of 16", "vision", "prefill", "time to first token", "tokens/s"):
        assert word in out


def test_vlm_compare_passes_on_the_export(export_dir, capsys):
    res = compare.compare(export_dir)
    assert res["passed"] and res["threshold"] == 1e-5
    assert {"vision", "lm"} <= set(res["graphs"])
    errs = [e for g in res["graphs"].values() for r in g.values() for e in r.values()]
    assert errs and max(errs) <= 1e-5
    assert compare.main(["--artifacts", str(export_dir)]) == 0
    assert "PASSED" in capsys.readouterr().out
    # The verdict really depends on the errors: an impossible threshold fails with exit 1.
    assert compare.main(["--artifacts", str(export_dir), "--threshold", "1e-12"]) == 1
    assert "FAIL" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bad inputs
def _copy(export_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(export_dir, dst)
    return dst


def _run(artifacts, image, keep="1.0"):
    return run_cli.main(["--artifacts", str(artifacts), "--image", str(image), "--prompt", PROMPT, "--keep", keep,
                         "--max-new-tokens", "2"])


def test_missing_artifacts(tmp_path, image_path, capsys):
    assert _run(tmp_path / "nope", image_path) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifacts(tmp_path)


def test_corrupt_manifest(export_dir, tmp_path, image_path, capsys):
    d = _copy(export_dir, tmp_path)
    (d / "manifest.json").write_text("{ not json")
    assert _run(d, image_path) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (d / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a vlmx-export manifest"):
        load_artifacts(d)


def test_checksum_mismatch(export_dir, tmp_path, image_path, capsys):
    d = _copy(export_dir, tmp_path)
    data = bytearray((d / "prune.onnx").read_bytes())
    data[-1] ^= 0xFF
    (d / "prune.onnx").write_bytes(bytes(data))
    assert _run(d, image_path) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    (d / "lm.onnx").unlink()
    with pytest.raises(ArtifactError, match="lm.onnx is missing"):
        load_artifacts(d)


def test_wrong_image(export_dir, tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text")
    assert _run(export_dir, bad) == 2
    assert "is not a readable image" in capsys.readouterr().err
    assert _run(export_dir, tmp_path / "missing.jpg") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("keep", ["0", "-0.5", "1.5", "abc"])
def test_keep_outside_range_is_refused(export_dir, image_path, keep, capsys):
    with pytest.raises(SystemExit) as e:
        _run(export_dir, image_path, keep)
    assert e.value.code == 2
    assert "--keep" in capsys.readouterr().err


def test_keep_budget_larger_than_visual_tokens(pipe, image_path):
    with pytest.raises(PipelineError, match="--keep 100"):
        pipe.generate(image_path, PROMPT, keep=100, max_new_tokens=1)


def test_cls_is_refused_without_a_cls_token(export_dir):
    from vlmx.trt_runtime.artifacts import Artifacts

    m = json.loads((export_dir / "manifest.json").read_text())
    m["graphs"]["vision"]["outputs"] = [o for o in m["graphs"]["vision"]["outputs"] if o["name"] != "cls_attention"]
    m["model_info"]["vision"] = "siglip"
    with pytest.raises(PipelineError, match="--prune cls needs a \\[CLS\\] token.*siglip.*use --prune text"):
        VLMPipeline(Artifacts(export_dir, m), prune="cls")

"""The torch backend runs the EXPORTED weights: modules built on the meta device from the export's recorded config,
filled from the ONNX files' initializers through the manifest's weight map (renamed, transposed and fused
tensors). Every graph equals ONNX Runtime on fresh inputs within the fp32 threshold for all three families,
generation gives ONNX Runtime's tokens, and it works with the checkpoint deleted and no model rebuilt from it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vlmx.export.cli import main as export_main
from vlmx.torch_ref.contract import LM_GRAPH, relative_error, threshold_for
from vlmx.trt_runtime.artifacts import load_artifacts
from vlmx.trt_runtime.pipeline import VLMPipeline
from vlmx.trt_runtime.runner import graph_runners

torch = pytest.importorskip("torch")

PRESETS = ("llava-tiny", "llava-siglip-tiny", "llava-mpt-tiny")
PROMPT = "What is shown in this picture?"


def distinct_weights(build):
    """``models.build_model`` with every float tensor moved off its init (biases no longer zero, norms no longer
    one), so no weight can be found in a graph by a coincidence of equal values."""
    def wrapped(*args, **kwargs):
        model = build(*args, **kwargs)
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
        return model

    return wrapped


@pytest.fixture(scope="module", params=PRESETS)
def export(request, tmp_path_factory):
    from vlmx.torch_ref import models

    out = tmp_path_factory.mktemp("torch-backend") / request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "build_model", distinct_weights(models.build_model))
        assert export_main(["--model", request.param, "--precision", "fp32", "--out", str(out), "--quiet",
                            "--no-report", "--seed", "6", "--max-seq-len", "96"]) == 0
    return out


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng().integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def fresh_feeds(export) -> dict[str, dict[str, np.ndarray]]:
    """Per graph: the export's reference inputs with every float input re-drawn at its own scale (ids, masks and
    keep stay valid as they are)."""
    rng = np.random.default_rng()
    ref = np.load(export / "reference.npz")
    art = load_artifacts(export)
    feeds: dict[str, dict] = {}
    for graph in art.manifest["graphs"]:
        feeds[graph] = {}
        for name in art.input_names(graph):
            a = ref[f"{graph}.{name}"]
            if np.issubdtype(a.dtype, np.floating):
                std = float(a.std()) or 1.0
                a = (rng.standard_normal(a.shape) * std).astype(a.dtype)
                if name == "scores":
                    a = np.abs(a)
                if name.startswith("past."):  # slots past the valid prefix hold nothing yet (as in the reference)
                    a[:, :, 6:] = 0
            feeds[graph][name] = a
    return feeds


def test_every_graph_equals_onnxruntime_on_fresh_inputs(export):
    compare_graphs(export, "fp32")


def compare_graphs(export, precision: str) -> dict:
    """Every graph of ``export`` on the torch backend vs ONNX Runtime, fresh inputs; returns the torch runners."""
    art = load_artifacts(export)
    torch_runners, ort_runners = graph_runners("torch", art, device="cpu"), graph_runners("onnxruntime", art)
    limit = threshold_for(precision)
    for graph, feed in fresh_feeds(export).items():
        got = torch_runners[graph].activate().infer(feed)
        want = ort_runners[graph].activate().infer(feed)
        for name in art.output_names(graph):
            err = relative_error(got[name].detach().float().numpy(), np.asarray(want[name], np.float32))
            print(export.name, precision, graph, name, f"{err:.2e}")
            assert err <= limit, f"{export.name} {graph}.{name}: relative error {err:.2e} > {limit}"
    return torch_runners


@pytest.fixture(scope="module", params=PRESETS)
def w8a8_export(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-backend-w8a8") / request.param
    assert export_main(["--model", request.param, "--precision", "w8a8", "--out", str(out), "--quiet",
                        "--no-report", "--seed", "6", "--max-seq-len", "96"]) == 0
    return out


def test_fp16_export_equals_onnxruntime(tmp_path):
    """float16 weights load as they are (the CPU runs them too, slowly; a GPU runs our kernels)."""
    out = tmp_path / "fp16"
    assert export_main(["--model", "llava-tiny", "--out", str(out), "--quiet", "--no-report", "--seed", "2",
                        "--max-seq-len", "64"]) == 0
    runners = compare_graphs(out, "fp16")
    assert next(runners[LM_GRAPH].module.parameters()).dtype == torch.float16


def test_w8a8_export_runs_its_int8_weights(w8a8_export):
    """The W8A8Linear nodes' int8 weights and scales run in torch_ref W8A8 modules (vlmx::quantize_per_token +
    vlmx::w8a8_linear: our CUDA kernels on a GPU, the reference kernels here), within the w8a8 threshold of ORT;
    the score graph keeps LM layer 0's projections in float, as its ONNX file does."""
    from vlmx.torch_ref.lm_w8a8 import W8A8Linear

    runners = compare_graphs(w8a8_export, "w8a8")
    lm = runners[LM_GRAPH].module
    int8 = [n for n, m in lm.named_modules() if isinstance(m, W8A8Linear)]
    floats = [n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    assert int8 and floats in (["lm_head"], []), (int8, floats)  # lm_head stays float (MPT: quantized)
    assert not any(isinstance(m, W8A8Linear) for m in runners["score"].module.modules())


def test_weight_map_covers_every_tensor_the_graphs_read(export):
    m = json.loads((export / "manifest.json").read_text())
    w = m["weights"]
    assert (export / w["config"]).is_file() and w["config"] in m["files"]
    tensors = {n: ref for refs in w["graphs"].values() for n, ref in refs.items()}
    fused = [n for n, ref in tensors.items() if ref["columns"]]
    if any("self_attn.q_proj" in n for n in tensors):  # Llama: fuse_qkv merged q/k/v of the LM layers
        assert any("layers.1.self_attn.k_proj" in n for n in fused), "fused projections must be mapped"
    # only the vision layers past the feature layer (and derived buffers) are absent from every graph
    assert all(n.startswith("model.vision_tower.") for n in w["unmapped"]), w["unmapped"]
    assert not any("language_model" in n or n.startswith("lm_head") for n in w["unmapped"])


def test_generation_equals_onnxruntime(export, image_path):
    with VLMPipeline(export) as pipe:
        want = pipe.generate(image_path, PROMPT, keep=0.5, max_new_tokens=6)
    with VLMPipeline(export, backend="torch") as tp:
        assert tp.arrays.name == "torch"
        got = tp.generate(image_path, PROMPT, keep=0.5, max_new_tokens=6)
    assert got.tokens == want.tokens and np.array_equal(got.kept_index, want.kept_index)


@pytest.fixture(scope="module")
def checkpoint_export(tmp_path_factory):
    """An export of a saved checkpoint (SmolLM2's tokenizer, random tiny LLaVA weights) whose checkpoint is then
    deleted."""
    from smollm2_fixture import save_llava_checkpoint, save_smollm2_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    ckpt = save_llava_checkpoint(save_smollm2_tokenizer(root / "tokenizer"), root / "checkpoint", seed=9)
    out = root / "export"
    assert export_main(["--model", "llava-tiny", "--checkpoint", str(ckpt), "--precision", "fp32", "--out", str(out),
                        "--quiet", "--no-report", "--max-seq-len", "128"]) == 0
    shutil.rmtree(root / "checkpoint")
    shutil.rmtree(root / "tokenizer")
    return out


def test_torch_backend_needs_no_checkpoint(checkpoint_export, image_path, monkeypatch):
    from vlmx.torch_ref import models

    def refuse(*a, **k):
        raise AssertionError("the torch backend must not rebuild the model from a checkpoint or a seed")

    for name in ("build_model", "load_checkpoint", "check_checkpoint"):
        monkeypatch.setattr(models, name, refuse)
    with VLMPipeline(checkpoint_export) as pipe:
        want = pipe.generate(image_path, PROMPT, keep=1.0, max_new_tokens=8)
    with VLMPipeline(checkpoint_export, backend="torch") as tp:
        got = tp.generate(image_path, PROMPT, keep=1.0, max_new_tokens=8)
    print("torch", got.tokens, "onnxruntime", want.tokens)
    assert got.tokens == want.tokens and got.text == want.text


def test_export_without_weight_map_is_refused(tiny_export, tmp_path):
    from vlmx.trt_runtime.torch_backend import NotRunnable, check_runnable

    art = load_artifacts(tiny_export)
    art.manifest = {**art.manifest, "weights": None}
    with pytest.raises(NotRunnable, match="records no map of its weights .* re-export, or use --backend onnxruntime"):
        check_runnable(art, "cpu")

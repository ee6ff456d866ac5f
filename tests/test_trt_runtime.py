"""The TensorRT runner: refusal of mismatched engines (CPU), and inference with dynamic shapes where TensorRT and a
GPU are present (skipped with a printed reason elsewhere)."""
import json

import numpy as np
import pytest
import torch

from test_trt_build import RTX, attention_graph, make_export, matmul_softmax_graph, needs_rtx
from vlmx.trt_runtime.artifacts import load_artifacts
from vlmx.trt_runtime.engine_build import build_engines
from vlmx.trt_runtime.trt_backend import EngineMismatch, TensorRTRunner, check_engine_compat, graph_runners
from vlmx.trt_runtime.trt_import import TensorRTUnavailable, import_tensorrt

META = {"format": "vlmx-engines", "backend": "tensorrt", "tensorrt_version": "10.16.0.1", "target_sm": 75,
        "plugin_lib": None}


def test_compatible_engine_passes():
    check_engine_compat(META, "tensorrt", "10.16.0.1", 75, "Tesla T4")


@pytest.mark.parametrize("flavour, version, sm, match", [
    ("tensorrt", "10.16.1.2", 75, r"built with tensorrt 10.16.0.1 but this runtime is tensorrt 10.16.1.2.*rebuild"),
    ("tensorrt-rtx", "10.16.0.1", 75, r"built with tensorrt 10.16.0.1 but this runtime is tensorrt-rtx"),
    ("tensorrt", "10.16.0.1", 90, r"targets sm_75 but this GPU \(NVIDIA H100\) is sm_90.*--target sm90"),
    ("tensorrt", "10.16.0.1", None, r"no CUDA GPU is visible; the engine targets sm_75"),
])
def test_mismatched_engines_are_refused_with_what_to_do(flavour, version, sm, match):
    with pytest.raises(EngineMismatch, match=match):
        check_engine_compat(META, flavour, version, sm, "NVIDIA H100")


def test_plugin_library_must_be_the_one_the_engine_was_built_with(tmp_path):
    lib = tmp_path / "libvlmx_trt_plugins.so"
    lib.write_bytes(b"a different build")
    meta = dict(META, plugin_lib={"path": "/build/libvlmx_trt_plugins.so", "sha256": "0" * 64})
    with pytest.raises(EngineMismatch, match="differs \\(sha256\\)"):
        check_engine_compat(meta, "tensorrt", "10.16.0.1", 75, "Tesla T4", str(lib))


@needs_rtx
def test_runner_refuses_rtx_engine_from_another_version_or_without_gpu(tmp_path):
    export = make_export(tmp_path / "e")
    paths = build_engines(export, backend="tensorrt-rtx", graphs=["embed"], progress=False)
    runner = TensorRTRunner(paths["embed"])
    if not torch.cuda.is_available():
        with pytest.raises(EngineMismatch, match="no CUDA GPU is visible; the engine targets sm_75"):
            runner.activate()
        # TensorRT-RTX's own validity check agrees: the plan cannot run on this machine.
        mod = RTX.module
        validity, _ = mod.Runtime(mod.Logger(mod.Logger.ERROR)).get_engine_validity(paths["embed"].read_bytes())
        print("TensorRT-RTX engine validity on this machine:", validity)
        assert validity != mod.EngineValidity.VALID
    meta_path = paths["embed"].with_name("engines.json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, tensorrt_version="0.0.1")))
    with pytest.raises(EngineMismatch, match=f"built with tensorrt-rtx 0.0.1 but this runtime is tensorrt-rtx "
                                             f"{RTX.version}"):
        TensorRTRunner(paths["embed"]).activate()


def test_graph_runners_need_built_engines(tmp_path):
    art = load_artifacts(make_export(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match="vlm-build --artifacts"):
        graph_runners(art)


def _tensorrt_gpu():
    try:
        trt = import_tensorrt("tensorrt")
    except TensorRTUnavailable as e:
        return None, f"TensorRT is not installed ({str(e)[:80]}...)"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"
    return trt, ""


TRT_GPU, TRT_GPU_REASON = _tensorrt_gpu()


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


FP16_TOL = 2e-2  # fp16 storage and matmul; reference in float64


@pytest.mark.gpu
@pytest.mark.skipif(TRT_GPU is None, reason=f"needs TensorRT on a GPU: {TRT_GPU_REASON}")
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (1, 32)])
def test_tensorrt_runner_dynamic_shapes_vs_numpy(tmp_path, batch, seq):
    sm = torch.cuda.get_device_capability()
    export = make_export(tmp_path / "e", {"embed": matmul_softmax_graph(3), "vision": attention_graph()})
    paths = build_engines(export, backend="tensorrt", graphs=["embed"], target=10 * sm[0] + sm[1], progress=False)
    import onnx
    from onnx import numpy_helper

    w = numpy_helper.to_array(onnx.load(str(export / "embed.onnx")).graph.initializer[0]).astype(np.float64)
    x = np.random.default_rng(batch * 100 + seq).standard_normal((batch, seq, 64)).astype(np.float16)
    t = x.astype(np.float64) @ w
    ref = np.exp(t - t.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    with TensorRTRunner(paths["embed"]) as runner:
        out = runner.infer({"input_ids": x})["inputs_embeds"]
        out_t = runner.infer({"input_ids": torch.from_numpy(x).cuda()})["inputs_embeds"]
    err = rel_err(out, ref)
    print(f"TensorRT embed [{batch},{seq}]: rel err {err:.2e}")
    assert err < FP16_TOL and np.array_equal(out, out_t)


def test_vlm_compare_registers_the_engines_plugin_library_before_deserializing(tmp_path, monkeypatch):
    """vlm-compare's TensorRT runner: the library recorded in engines.json goes into TensorRT's plugin registry
    (load_library, which calls getCreators) before polygraphy deserializes the plan."""
    import types

    pytest.importorskip("polygraphy.backend.trt")
    from vlmx.trt_runtime import compare, trt_backend, trt_import

    lib = tmp_path / "libvlmx_trt_plugins.so"
    lib.write_bytes(b"\0")
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "vision.plan").write_bytes(b"plan")
    (tmp_path / "engines" / "engines.json").write_text(json.dumps({**META, "plugin_lib": {"path": str(lib)}}))
    loaded = []
    registry = types.SimpleNamespace(load_library=lambda p: loaded.append(p) or object())
    fake = trt_import.TensorRT(types.SimpleNamespace(get_plugin_registry=lambda: registry, __version__="10.16.0.1"),
                               "tensorrt")
    monkeypatch.setattr(trt_import, "import_tensorrt", lambda backend="auto": fake)
    art = types.SimpleNamespace(root=tmp_path, graph_path=lambda g: tmp_path / f"{g}.onnx")
    monkeypatch.setattr("polygraphy.backend.onnxrt.SessionFromOnnx", lambda *a, **k: None)
    runners = compare.polygraphy_runners(art, "vision", with_tensorrt=True)
    assert loaded == [str(lib)] and [r.name for r in runners] == ["onnxruntime:vision", "tensorrt:vision"]
    lib.unlink()
    with pytest.raises(FileNotFoundError, match="pass --plugin-lib or rebuild"):
        compare.polygraphy_runners(art, "vision", with_tensorrt=True)
    rtx = trt_import.TensorRT(fake.module, "tensorrt-rtx")
    with pytest.raises(EngineMismatch, match="TensorRT-RTX cannot load plugin libraries"):
        trt_backend.load_plugin_library(rtx, registry, lib)

"""The TensorRT runner: refusal of mismatched engines (CPU), and inference with dynamic shapes where TensorRT and a
GPU are present (skipped with a printed reason elsewhere)."""
import json
import types

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


class _FakeEngine:
    """The engine API the runner reads: an LM-like engine with a prefill and a decode profile, a shape input, an
    output aliased to an input (the KV cache) and a plain output."""

    io = {"x": ("INPUT", np.float32), "past": ("INPUT", np.float32), "keep": ("INPUT", np.int64),
          "y": ("OUTPUT", np.float32), "present": ("OUTPUT", np.float32)}
    profiles = [{"x": ((1, 1), (1, 16), (1, 32)), "past": ((1, 4), (1, 4), (1, 4))},
                {"x": ((1, 1), (1, 1), (1, 1)), "past": ((1, 4), (1, 4), (1, 4))}]
    num_optimization_profiles = 2

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, n):
        return self.io[n][0]

    def get_tensor_dtype(self, n):
        return self.io[n][1]

    def is_shape_inference_io(self, n):
        return n == "keep"

    def get_tensor_profile_shape(self, n, p):
        return self.profiles[p][n]


class _FakePolygraphyRunner:
    """polygraphy's TrtRunner as the adapter uses it: reuses its output buffer across calls, aliases present to
    past, records profile switches."""

    def __init__(self, loader, name):
        self.engine, self.name, self.is_active = _FakeEngine(), name, False
        self.context = types.SimpleNamespace(set_input_shape=lambda n, s: True, set_tensor_address=lambda n, p: True)
        self.switches, self.y = [], torch.zeros(1, 32)

    def activate(self):
        self.is_active = True

    def deactivate(self):
        self.is_active = False

    def set_profile(self, index):
        self.switches.append(index)

    def infer(self, feed, copy_outputs_to_host=True):
        assert all(isinstance(v, torch.Tensor) for v in feed.values()) and feed["keep"].device.type == "cpu"
        n = feed["x"].shape[1]
        self.y[0, :n] = feed["x"][0] * 2  # the same buffer every call, like polygraphy's output allocator
        return {"y": self.y[:, :n], "present": feed["past"]}


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):


    from vlmx.trt_runtime import trt_backend

    plan = tmp_path / "lm.plan"
    plan.write_bytes(b"plan")
    mod = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="INPUT"), nptype=lambda dt: dt)
    pg = types.SimpleNamespace(TrtRunner=_FakePolygraphyRunner)
    monkeypatch.setattr(trt_backend, "open_engine", lambda path, lib=None: (
        types.SimpleNamespace(module=mod), pg, "loader"))
    return plan


def test_runner_picks_the_nearest_profile_binds_once_and_returns_its_own_outputs(fake_engine):
    """Prefill (S=5) runs profile 0, the one-token steps switch to the decode profile once; outputs are copies
    (polygraphy reuses its buffers); a bound past/present buffer is returned as the same object."""
    runner = TensorRTRunner(fake_engine).activate()
    past = torch.randn(1, 4)
    runner.bind({"past": past, "present": past})
    keep = np.array([1], np.int64)
    x5 = np.random.default_rng(0).standard_normal((1, 5)).astype(np.float32)
    out = runner.infer({"x": x5, "keep": keep})
    assert runner.runner.switches == [] and np.allclose(out["y"], 2 * x5) and out["present"] is past
    steps = [runner.infer({"x": np.full((1, 1), v, np.float32), "keep": keep})["y"] for v in (3.0, 4.0)]
    assert runner.runner.switches == [1], "the decode profile is selected once, not per step"
    assert np.allclose(out["y"], 2 * x5) and [float(s[0, 0]) for s in steps] == [6.0, 8.0]
    with pytest.raises(ValueError, match="fit none of the engine's profiles"):
        runner.infer({"x": np.zeros((1, 40), np.float32), "keep": keep})
    runner.deactivate()
    assert not runner.bound


def test_select_profile_prefers_the_nearest_opt():
    from vlmx.trt_runtime.trt_backend import select_profile

    profiles = _FakeEngine.profiles
    assert select_profile(profiles, {"x": (1, 1), "past": (1, 4)}) == 1
    assert select_profile(profiles, {"x": (1, 2), "past": (1, 4)}) == 0
    assert select_profile(profiles[:1], {"x": (1, 1), "past": (1, 4)}) == 0


def test_every_command_opens_engines_through_one_runner_that_registers_the_plugin_library(tmp_path, monkeypatch):
    """vlm-compare's TensorRT runner is trt_backend.trt_runner (as vlm-run's and --print-layers'): the library
    recorded in engines.json goes into TensorRT's plugin registry (load_library, which calls getCreators) before
    polygraphy's EngineFromPath loader exists, let alone deserializes the plan."""
    import types

    from vlmx.torch_ref.contract import sha256_file
    from vlmx.trt_runtime import compare, trt_backend, trt_import

    lib = tmp_path / "libvlmx_trt_plugins.so"
    lib.write_bytes(b"\0")
    (tmp_path / "engines").mkdir()
    plan = tmp_path / "engines" / "vision.plan"
    plan.write_bytes(b"plan")
    (tmp_path / "engines" / "engines.json").write_text(json.dumps(
        {**META, "plugin_lib": {"path": str(lib), "sha256": sha256_file(lib)}}))
    events = []
    registry = types.SimpleNamespace(load_library=lambda p: events.append(("load_library", p)) or object())
    fake = trt_import.TensorRT(types.SimpleNamespace(get_plugin_registry=lambda: registry, __version__="10.16.0.1"),
                               "tensorrt")
    pg = types.SimpleNamespace(EngineFromPath=lambda p: events.append(("EngineFromPath", p)) or p,
                               TrtRunner=lambda loader, name: types.SimpleNamespace(loader=loader, name=name))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda backend="auto": fake)
    monkeypatch.setattr(trt_backend, "_device", lambda: (75, "Tesla T4"))
    monkeypatch.setattr(trt_backend, "polygraphy_trt", lambda trt: pg)
    art = types.SimpleNamespace(root=tmp_path, graph_path=lambda g: tmp_path / f"{g}.onnx")
    monkeypatch.setattr("polygraphy.backend.onnxrt.SessionFromOnnx", lambda *a, **k: None)
    monkeypatch.setattr(trt_import, "_LOADED_LIBRARIES", {})  # this process has registered no library yet
    assert compare.tensorrt_usable(art)
    runners = compare.polygraphy_runners(art, "vision", with_tensorrt=True)
    # registered once (a second load_library of one file fails), before any engine loader exists
    assert events == [("load_library", str(lib.resolve()))] + [("EngineFromPath", str(plan))] * 2
    assert [r.name for r in runners] == ["onnxruntime:vision", "tensorrt:vision"]
    lib.unlink()
    with pytest.raises(trt_import.PluginLibraryError, match="does not exist; pass --plugin-lib"):
        compare.polygraphy_runners(art, "vision", with_tensorrt=True)
    monkeypatch.setattr(trt_backend, "_device", lambda: (None, ""))
    assert not compare.tensorrt_usable(art, quiet=True)


def _kv_engine(tmp_path, sm: int = 75):
    """A two-profile engine with an in-place KV-cache update (ONNX TensorScatter -> KV_CACHE_UPDATE, present aliased
    to past) built for SM75 by TensorRT-RTX on the CPU, as the LM graph's prefill / decode profiles are."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh

    from vlmx.trt_runtime.engine_build import build_engine

    f16 = TP.FLOAT16
    nodes = [oh.make_node("TensorScatter", ["past", "upd", "wi"], ["present"], axis=2),
             oh.make_node("Add", ["upd", "upd"], ["y"])]
    g = oh.make_graph(nodes, "kv", [oh.make_tensor_value_info("past", f16, [1, 2, 32, 4]),
                                    oh.make_tensor_value_info("upd", f16, [1, 2, "s", 4]),
                                    oh.make_tensor_value_info("wi", TP.INT64, [1])],
                      [oh.make_tensor_value_info("present", f16, [1, 2, 32, 4]),
                       oh.make_tensor_value_info("y", f16, [1, 2, "s", 4])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 24)])
    m.ir_version = 10
    path = tmp_path / "kv.onnx"
    onnx.save(m, str(path))
    profiles = {"prefill": {"upd": {"min": [1, 2, 1, 4], "opt": [1, 2, 8, 4], "max": [1, 2, 32, 4]}},
                "decode": {"upd": {"min": [1, 2, 1, 4], "opt": [1, 2, 1, 4], "max": [1, 2, 1, 4]}}}
    plan = tmp_path / "kv.plan"
    return build_engine(RTX, path, plan, target_sm=sm, progress=False, profiles=profiles), plan


@needs_rtx
def test_rtx_builds_a_two_profile_kv_cache_engine_on_the_cpu(tmp_path):
    entry, plan = _kv_engine(tmp_path)
    print("kv engine:", entry["bytes"], "bytes; network", entry["network_layers"])
    assert entry["profiles"] == ["prefill", "decode"] and plan.stat().st_size == entry["bytes"] > 0
    assert any("[KV_CACHE_UPDATE]" in ln for ln in entry["network_layers"])


def _rtx_gpu_reason():
    if RTX is None:
        return "TensorRT-RTX is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if not hasattr(RTX.module.ComputeCapability, f"SM{major}{minor}"):
        return f"TensorRT-RTX {RTX.version} has no runtime for sm_{major}{minor}"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(_rtx_gpu_reason()), reason=f"needs TensorRT-RTX on a GPU it supports: {_rtx_gpu_reason()}")
def test_runner_binds_the_kv_cache_once_and_switches_to_the_decode_profile_on_a_gpu(tmp_path):
    """Prefill (6 rows) on profile 0, then one-token steps on the decode profile; the cache bound as past and
    present is written in place and returned as the same tensor."""
    major, minor = torch.cuda.get_device_capability()
    _, plan = _kv_engine(tmp_path, 10 * major + minor)
    with TensorRTRunner(plan, return_torch=True) as runner:
        cache = runner.alloc("past", (1, 2, 32, 4), "float16")
        runner.bind({"past": cache, "present": cache})
        rows = torch.randn(1, 2, 6, 4, dtype=torch.float16, device="cuda")
        out = runner.infer({"upd": rows, "wi": np.array([0], np.int64)})
        assert out["present"] is cache and runner.profile == 0
        for step in range(6, 9):
            one = torch.randn(1, 2, 1, 4, dtype=torch.float16, device="cuda")
            out = runner.infer({"upd": one, "wi": np.array([step], np.int64)})
            assert runner.profile == 1 and out["present"] is cache and torch.equal(cache[:, :, step:step + 1], one)
            assert torch.equal(out["y"], one + one)
        assert torch.equal(cache[:, :, :6], rows) and not cache[:, :, 9:].any()

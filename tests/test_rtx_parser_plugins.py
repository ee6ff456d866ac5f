"""How far TensorRT-RTX's ONNX parser goes with our plugins (findings: docs/tensorrt.md "TensorRT-RTX and plugins").

Each sequence runs in a child process (a TensorRT-RTX abort must fail a test, not the session) and the test
asserts today's outcome, so a release that changes it shows up here:

- 1.6.1.120 (the pinned vlmx[trt-rtx]): a bare plugin node is refused by the parser's static check, before any
  registry lookup, even for a control plugin (no fields, one input).
- 1.7.1.116 (installed at test time with pip into ~/.cache/vlmx, not into the venv): the parser finds the creator
  and createPlugin succeeds, then ``std::terminate`` — the parser dlopens the unversioned ``libtensorrt_rtx.so``,
  which the wheel lacks (it ships ``libtensorrt_rtx.so.1``), from a function-local static in a noexcept path.
  With a ``libtensorrt_rtx.so`` symlink on LD_LIBRARY_PATH the same sequence builds SM75 engines on the CPU whose
  layers are our plugin layers, and the plugin trace (VLMX_PLUGIN_TRACE=1) shows every build-time method called.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmx.plugins import trt_build, triton_aot

pytestmark = pytest.mark.nvcc
REPO = Path(__file__).resolve().parents[1]
PROBE_SRC = REPO / "plugins" / "trt" / "tests" / "parser_probe_plugin.cpp"
RTX_171 = "1.7.1.116"
BUILD_METHODS = {"createPlugin", "getCapabilityInterface", "clone", "getNbOutputs", "getOutputDataTypes",
                 "getOutputShapes", "supportsFormatCombination", "configurePlugin", "getWorkspaceSize",
                 "getFieldsToSerialize"}
TRITON_KERNELS = ["quantize_per_token", "gelu_quant", "norm_quant", "token_importance", "topk_rank", "topk_compact",
                  "gather_rows"]

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (the vlmx[trt-rtx] extra)")


def _cuda_include() -> Path:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cands = [Path(os.path.realpath(nvcc)).parent.parent / "include",
             Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include", Path("/usr/local/cuda/include")]
    return next((c for c in cands if (c / "cuda_runtime_api.h").is_file()), cands[-1])


@pytest.fixture(scope="session")
def headers() -> Path:
    return trt_build.fetch_tensorrt_headers() / "include"


@pytest.fixture(scope="session")
def probe_lib(headers, tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the control plugin")
    out = tmp_path_factory.mktemp("probe") / "libvlmx_probe.so"
    r = subprocess.run(["g++", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-isystem", str(headers),
                        "-isystem", str(_cuda_include()), str(PROBE_SRC), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def vlmx_lib() -> Path:
    import importlib.util

    from test_plugin_registry_rtx import BUILD_DIR

    if shutil.which("cmake") is None or shutil.which("nvcc") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("needs cmake, nvcc and Triton to build the plugin library and its sm_75 kernels")

    lib = trt_build.build_plugin_library(75, trt_build.fetch_tensorrt_headers(), BUILD_DIR)
    triton_aot.compile_all("trt-sm75", lib.parent / "triton", kernels=TRITON_KERNELS)
    return lib


@pytest.fixture(scope="session")
def rtx171() -> dict:
    """TensorRT-RTX 1.7.1.116 in a cache directory (pip --target), plus a directory with the missing soname link."""
    root = trt_build.cache_dir() / f"tensorrt-rtx-{RTX_171}"
    site, links = root / "site", root / "solink"
    lib = site / "tensorrt_rtx_libs" / "libtensorrt_rtx.so.1"
    if not lib.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                            f"tensorrt-rtx-cu12-libs=={RTX_171}", f"tensorrt-rtx-cu12-bindings=={RTX_171}"],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0 and lib.is_file(), f"pip could not install TensorRT-RTX {RTX_171}: {r.stderr[-2000:]}"
    links.mkdir(parents=True, exist_ok=True)
    link = links / "libtensorrt_rtx.so"
    if not link.is_symlink():
        link.symlink_to(lib)
    return {"site": site, "links": links}


_PROBE = r"""
import json, sys
import onnx
from onnx import helper, TensorProto as TP
import tensorrt_rtx_bindings as trt
lib, case = sys.argv[1], json.loads(sys.argv[2])
print("VERSION", trt.__version__, flush=True)
logger = trt.Logger(trt.Logger.INFO)
builder = trt.Builder(logger)
builder.get_plugin_registry().load_library(lib)
ins = [helper.make_tensor_value_info(n, getattr(TP, t), s) for n, t, s in case["inputs"]]
outs = [helper.make_tensor_value_info(n, getattr(TP, t), s) for n, t, s in case["outputs"]]
node = helper.make_node(case["op"], [i[0] for i in case["inputs"]], [o[0] for o in case["outputs"]],
                        domain=case["domain"], name="node0", **case["attrs"])
m = helper.make_model(helper.make_graph([node], "g", ins, outs),
                      opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(case["domain"], 1)])
m.ir_version = 10
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
parser = trt.OnnxParser(network, logger)
ok = parser.parse(m.SerializeToString())
print("PARSED", json.dumps([ok] + [parser.get_error(i).desc() for i in range(parser.num_errors)]), flush=True)
if not ok:
    sys.exit(3)
print("LAYERS", json.dumps([str(network.get_layer(i).type) for i in range(network.num_layers)]), flush=True)
config = builder.create_builder_config()
config.num_compute_capabilities = 1
config.set_compute_capability(trt.ComputeCapability.SM75, 0)
for name, values in case.get("shape_values", {}).items():
    p = builder.create_optimization_profile()
    p.set_shape_input(name, *values)
    config.add_optimization_profile(p)
plan = builder.build_serialized_network(network, config)
print("BUILT", plan is not None and plan.nbytes, flush=True)
sys.exit(0 if plan is not None else 4)
"""


def run_probe(lib: Path, case: dict, rtx: dict | None = None, link: bool = True) -> subprocess.CompletedProcess:
    """One parse + SM75 build in a child process: the pinned TensorRT-RTX, or ``rtx`` (1.7.1) with or without the
    soname link directory on LD_LIBRARY_PATH."""
    env = dict(os.environ, VLMX_PLUGIN_TRACE="1", VLMX_TRITON_MANIFEST=str(lib.parent / "triton" / "manifest.json"))
    if rtx is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(rtx["site"]), env.get("PYTHONPATH", "")])
        if link:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(rtx["links"]), env.get("LD_LIBRARY_PATH", "")])
    r = subprocess.run([sys.executable, "-c", _PROBE, str(lib), json.dumps(case)], capture_output=True, text=True,
                       env=env, timeout=600)
    print(f"--- rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


PROBE_CASE = {"op": "VlmxProbe", "domain": "vlmxprobe", "attrs": {"plugin_namespace": "vlmxprobe",
                                                                 "plugin_version": "1"},
              "inputs": [["x", "FLOAT", [2, 4]]], "outputs": [["y", "FLOAT", [2, 4]]]}
VLMX_CASES = {  # one bare node per op, shapes the kernels accept, float16 where the CUDA kernels need it
    "FlashAttention": {"attrs": {"num_heads": 2, "head_dim": 64, "causal": 1},
                       "inputs": [[n, "FLOAT16", [1, 160, 128]] for n in "qkv"],
                       "outputs": [["o", "FLOAT16", [1, 160, 128]]]},
    "W8A8Linear": {"attrs": {"out_dtype": "float16"},
                   "inputs": [["x", "INT8", [4, 64]], ["x_scale", "FLOAT", [4, 1]], ["w", "INT8", [32, 64]],
                              ["w_scale", "FLOAT", [32]]], "outputs": [["y", "FLOAT16", [4, 32]]]},
    "QuantizePerToken": {"attrs": {"clip_range": 2.5}, "inputs": [["x", "FLOAT16", [4, 64]]],
                         "outputs": [["q", "INT8", [4, 64]], ["scale", "FLOAT", [4, 1]]]},
    "GeluQuant": {"attrs": {"approximate": "tanh", "clip_range": 0.0}, "inputs": [["x", "FLOAT16", [4, 64]]],
                  "outputs": [["q", "INT8", [4, 64]], ["scale", "FLOAT", [4, 1]]]},
    "NormQuant": {"attrs": {"mode": "layernorm", "eps": 1e-6, "per_token": 1, "static_scale": 1.0, "clip_range": 0.0},
                  "inputs": [["x", "FLOAT16", [4, 64]], ["weight", "FLOAT16", [64]], ["bias", "FLOAT16", [64]]],
                  "outputs": [["q", "INT8", [4, 64]], ["scale", "FLOAT", [4, 1]], ["sum", "FLOAT", [4, 1]]]},
    "TokenImportance": {"attrs": {"num_heads": 2, "head_dim": 64},
                        "inputs": [["q_text", "FLOAT16", [1, 5, 128]], ["k_vis", "FLOAT16", [1, 20, 128]]],
                        "outputs": [["scores", "FLOAT", [1, 20]]]},
    "GatherTopK": {"attrs": {},
                   "inputs": [["x", "FLOAT16", [1, 20, 32]], ["scores", "FLOAT", [1, 20]], ["keep", "INT64", [1]]],
                   "outputs": [["x_kept", "FLOAT16", [1, "k", 32]], ["idx", "INT64", [1, "k"]]],
                   "shape_values": {"keep": [[1], [5], [20]]}},
}


def _vlmx_case(op: str) -> dict:
    """The node as vlm-export writes it: op-table attributes with defaults plus TensorRT's (vlmx.export.domain)."""
    from vlmx.export.domain import node_attrs
    from vlmx.torch_ref.op_table import OPS

    c = dict(VLMX_CASES[op])
    return {**c, "op": op, "domain": "vlmx", "attrs": node_attrs(OPS[op], c["attrs"])}


def test_every_op_has_a_parser_case():
    from vlmx.torch_ref.op_table import OPS

    assert sorted(VLMX_CASES) == sorted(OPS)
    assert _vlmx_case("GatherTopK")["attrs"]["tensorrt_plugin_shape_input_indices"] == [2]
    assert _vlmx_case("FlashAttention")["attrs"]["plugin_namespace"] == "vlmx"


def test_pinned_rtx_parser_refuses_plugin_nodes_before_the_registry(probe_lib):
    """1.6.1.120: `parseNodeStaticCheck: Op type VlmxProbe is not supported in TensorRT-RTX`, no creator call."""
    r = run_probe(probe_lib, PROBE_CASE)
    assert r.returncode == 3, "1.6.1's parser now accepts plugin nodes: update docs/tensorrt.md and vlm-build"
    assert "is not supported in TensorRT-RTX" in r.stdout and "createPlugin" not in r.stderr


def test_rtx171_terminates_after_createPlugin_without_the_soname_link(probe_lib, rtx171):
    """The control plugin (no fields, one input): createPlugin, then std::terminate before any plugin method.

    Our terminate handler's backtrace ends in libtensorrt_onnxparser_rtx.so.1; the parser's code there is a
    function-local static that dlopens "libtensorrt_rtx.so" and throws when it is missing (guard abort, terminate).
    """
    r = run_probe(probe_lib, PROBE_CASE, rtx171, link=False)
    assert "VERSION " + RTX_171 in r.stdout
    assert r.returncode == -6, "TensorRT-RTX 1.7.1 no longer aborts here: the soname link may be unnecessary"
    log = r.stderr
    before = log[:log.index("[probe] std::terminate")]
    assert "[probe] creator.createPlugin(nbFields=0, phase=BUILD)" in before
    assert "[probe] getCapabilityInterface" not in before  # TensorRT never touched the plugin
    assert "libtensorrt_onnxparser_rtx.so.1" in log[log.index("[probe] std::terminate"):]


def test_rtx171_builds_the_control_plugin_with_the_soname_link(probe_lib, rtx171):
    r = run_probe(probe_lib, PROBE_CASE, rtx171)
    assert r.returncode == 0, "control plugin did not build with libtensorrt_rtx.so on LD_LIBRARY_PATH"
    assert '"LayerType.PLUGIN_V3"' in r.stdout and "[probe] configurePlugin" in r.stderr


@pytest.mark.parametrize("op", sorted(VLMX_CASES))
def test_rtx171_builds_sm75_engines_with_every_vlmx_plugin(vlmx_lib, rtx171, op):
    """Our library's creators through TensorRT-RTX 1.7.1's parser and SM75 builder on the CPU: the network is one
    PLUGIN_V3 layer, the engine builds, and the trace shows every build-time method called."""
    r = run_probe(vlmx_lib, _vlmx_case(op), rtx171)
    assert r.returncode == 0, f"{op}: {r.stdout[-1500:]} {r.stderr[-1500:]}"
    layers = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("LAYERS"))[len("LAYERS"):])
    assert layers == ["LayerType.PLUGIN_V3"], layers
    called = {ln.split()[3] for ln in r.stderr.splitlines() if ln.startswith(f"[vlmx trace] {op} ")}
    assert BUILD_METHODS <= called, f"{op}: not called {sorted(BUILD_METHODS - called)}"

"""The TensorRT plugin library driven without TensorRT: creators + enqueue() on a GPU vs the torch reference.

``scripts/plugin_enqueue_check.py`` builds the plugin library against TensorRT's public headers only (the IPluginV3
interfaces are header-only) and runs ``plugins/trt/tests/plugin_enqueue_check.cpp``, which makes TensorRT's calls
(creator by name, fields, build-phase queries, serialization round trip, attachToContext, onShapeChange, enqueue).
Headers: TENSORRT_INCLUDE_DIR (first dir with NvInferRuntime.h) or a git-ignored ``.trt_headers/include``.
On a machine without a GPU the harness compile and the comparison code are still checked; the GPU test skips
with a printed reason. Evidence from the lent H100: bench/results/plugins_enqueue_h100.{json,md}.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import plugin_enqueue_check as pec  # noqa: E402


def _headers() -> Path | None:
    cands = [*os.environ.get("TENSORRT_INCLUDE_DIR", "").split(os.pathsep), str(REPO / ".trt_headers" / "include")]
    return next((Path(c) for c in cands if c and (Path(c) / "NvInferRuntime.h").is_file()), None)


HEADERS = _headers()
CUDA_OK = (pec.cuda_home() / "include" / "cuda_runtime_api.h").is_file()
needs_headers = pytest.mark.skipif(HEADERS is None or shutil.which("g++") is None or not CUDA_OK,
                                   reason="needs TensorRT headers (TENSORRT_INCLUDE_DIR or .trt_headers/include), g++ "
                                          "and the CUDA toolkit headers")


def _skip_reason_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: the plugins' enqueue() cannot run (host checks ran instead)"
    if HEADERS is None:
        return "no TensorRT headers: set TENSORRT_INCLUDE_DIR to NVIDIA/TensorRT's include/"
    for tool in ("g++", "cmake", "nvcc"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (AOT compiler for the Triton plugins)"
    return None


@needs_headers
def test_harness_compiles_against_the_tensorrt_headers(tmp_path):
    exe = pec.compile_harness(HEADERS.resolve(), tmp_path)
    r = subprocess.run([str(exe)], capture_output=True, text=True,
                       env=dict(os.environ, LD_LIBRARY_PATH=str(pec.cuda_home() / "lib64")))
    assert r.returncode == 2 and "usage: plugin_enqueue_check" in r.stderr
    print(f"harness compiled against TensorRT {pec.trt_version(HEADERS)} headers")


def test_reference_comparisons_accept_the_reference_itself():
    """The comparison code on CPU: reference outputs (cast as the plugins return them) pass every check."""
    import torch.nn.functional  # noqa: F401
    from vlmx.torch_ref import reference as ref

    cases = pec.make_cases(torch.device("cpu"), torch.Generator().manual_seed(0))
    for c in cases:
        ins, a, op = c["inputs"], c["attrs"], c["op"]
        if op == "FlashAttention":
            f = [t.float() for t in ins]
            args = (f[0], None, None, f[1] if len(f) > 1 else None) if a.get("layout") == "packed" else \
                (f[0], f[1], f[2], f[3] if len(f) > 3 else None)
            outs = [ref.flash_attention(*args, **a).half()]
        elif op == "W8A8Linear":
            outs = [ref.w8a8_linear(*ins)]
        elif op == "QuantizePerToken":
            outs = list(ref.quantize_per_token(ins[0].float(), a.get("clip_range", 0.0)))
        elif op == "GeluQuant":
            outs = list(ref.gelu_quant(ins[0].float(), a["approximate"], a.get("clip_range", 0.0)))
        elif op == "NormQuant":
            outs = list(ref.norm_quant(ins[0].float(), ins[1].float(), ins[2].float() if len(ins) > 2 else None,
                                       mode=a["mode"], eps=a["eps"], clip_range=a.get("clip_range", 0.0)))
        elif op == "TokenImportance":
            outs = [ref.token_importance(ins[0].float(), ins[1].float(), **a)]
        else:
            x, idx = ref.gather_topk(*ins, c["shape_inputs"][0][0])  # keep: a shape input, not a tensor
            outs = [x, idx]
        checks = pec.reference_check(c, ins, outs)
        assert all(v["ok"] for v in checks.values()), (c["name"], checks)
    # ...and a poisoned (NaN) output fails.
    bad = pec.float_check(torch.full((4,), float("nan")), torch.ones(4), 1e-3)
    assert not bad["ok"] and bad["nan"] == 4


@needs_headers
@pytest.mark.slow
@pytest.mark.nvcc
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None
                    or importlib.util.find_spec("triton") is None, reason="needs cmake, nvcc and Triton")
def test_host_calls_of_every_case_without_a_gpu(tmp_path):
    """--dry-run: CMake build against the headers, then every case's creator/build/serialize/onShapeChange."""
    rc = pec.main(["--dry-run", "--configs", "ptx75", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                   "--trt-include", str(HEADERS)])
    report = json.loads((tmp_path / "out" / "plugins_enqueue.json").read_text())
    assert rc == 0 and report["ok"], json.dumps(report["configs"][0]["results"], indent=1)[-3000:]
    results = {r["case"]: r["harness"] for r in report["configs"][0]["results"]}
    gather = results["gather_topk_keep144"]
    assert gather["size_tensors"] == [] and gather["output_shapes"][1] == [2, 144] and gather["workspace"] == 2 * 576
    # split-KV partials come from getWorkspaceSize (decode: few CTAs), never from an allocation in enqueue
    assert results["fa_mqa_decode"]["workspace"] > 0 and results["fa_bsd_vitl"]["workspace"] >= 0


@pytest.mark.gpu
@pytest.mark.nvcc
def test_plugins_enqueue_on_the_gpu_match_the_reference(tmp_path):
    why = _skip_reason_gpu()
    if why:
        print(f"skipped: {why}")
        pytest.skip(why)
    rc = pec.main(["--configs", "ptx75", "--iters", "0", "--out", str(tmp_path / "out"), "--work",
                   str(tmp_path / "w"), "--trt-include", str(HEADERS)])
    report = json.loads((tmp_path / "out" / "plugins_enqueue.json").read_text())
    print((tmp_path / "out" / "plugins_enqueue.md").read_text())
    failed = [r for c in report["configs"] for r in c["results"] if not r["ok"]]
    assert rc == 0 and report["ok"] and not failed, json.dumps(failed, indent=1, default=str)[-4000:]
    # every enqueue is CUDA-graph capturable: no stream sync, host copy or allocation (GatherTopK, split-KV)
    uncapturable = {r["case"]: r["harness"].get("graph_capture_error") for c in report["configs"]
                    for r in c["results"] if not r["harness"].get("graph_capture_ok")}
    assert not uncapturable, uncapturable
    assert {r["op"] for r in report["configs"][0]["results"]} == {
        "FlashAttention", "W8A8Linear", "QuantizePerToken", "GeluQuant", "NormQuant", "TokenImportance", "GatherTopK"}

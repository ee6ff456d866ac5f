"""Compile the TensorRT plugin library against TensorRT's public headers and check its creators on the host.

Most tests need TensorRT headers: TENSORRT_INCLUDE_DIR (include dirs separated by ':') or TENSORRT_ROOT. The NVIDIA
TensorRT repository's ``include/`` is enough (no TensorRT libraries: the library is built as a shared object whose
TensorRT and kernel symbols stay unresolved, and ``plugins/trt/tests/plugin_host_check.cpp`` dlopens it lazily).
The host check creates every plugin from PluginFields exactly as the ONNX parser passes them, round-trips
serialization, and evaluates output types, shapes (through an evaluating IExprBuilder) and format support.
The C++ Triton loader is checked against the Python loader on a real sm_75 manifest without TensorRT headers.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vlmx.plugins import trt_build
from vlmx.torch_ref.op_table import OPS, PLUGIN_NAMESPACE, PLUGIN_VERSION, get_op

pytestmark = pytest.mark.nvcc

SOURCES = ("vlmx_plugin.cpp", "vlmx_ops.cpp", "attention_launch.cpp", "cubin_loader.cpp")
FIELD_TYPES = {"int": 5, "float": 1, "string": 6}  # PluginFieldType kINT32, kFLOAT32, kCHAR


def _include_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get("TENSORRT_INCLUDE_DIR", "").split(os.pathsep) if d]
    root = trt_build.find_tensorrt_root()
    if not dirs and root is not None:
        sub = root / "include"
        dirs = [sub if (sub / "NvInferRuntime.h").is_file() else sub / "x86_64-linux-gnu"]
    return [d for d in dirs if (d / "NvInferRuntime.h").is_file()]


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    if nvcc:
        real = Path(subprocess.run(["sh", "-c", f"readlink -f {nvcc}"], capture_output=True, text=True).stdout.strip())
        cands.insert(0, real.parent.parent / "include")
    return next((c for c in cands if (c / "cuda_runtime_api.h").is_file() and (c / "cuda.h").is_file()), None)


INCLUDES = _include_dirs()
CUDA_INC = _cuda_include()
if CUDA_INC is None or shutil.which("g++") is None:
    pytest.skip("needs g++ and the CUDA toolkit headers (cuda.h, cuda_runtime_api.h)", allow_module_level=True)
#: Tests that compile against TensorRT's headers (the Triton loader tests below need only CUDA's).
needs_headers = pytest.mark.skipif(not INCLUDES, reason="no TensorRT headers: set TENSORRT_INCLUDE_DIR to "
                                                        "NVIDIA/TensorRT's include/ (or TENSORRT_ROOT)")


def _trt_version(inc: Path) -> str:
    text = (inc / "NvInferVersion.h").read_text()
    nums = []
    for key in ("MAJOR", "MINOR", "PATCH"):
        for prefix in (f"TRT_{key}_ENTERPRISE", f"NV_TENSORRT_{key}"):
            tok = f"#define {prefix} "
            line = next((ln for ln in text.splitlines() if ln.startswith(tok)), None)
            if line and line.split()[2].isdigit():
                nums.append(line.split()[2])
                break
    return ".".join(nums)


def _flags(inc: Path | None) -> list[str]:
    trt = ["-isystem", str(inc)] if inc else []
    return ["-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{trt_build.TRT_DIR}",
            f"-I{trt_build.TRT_DIR.parent / 'csrc'}", *trt, "-isystem", str(CUDA_INC)]


@needs_headers
@pytest.mark.parametrize("inc", INCLUDES, ids=[_trt_version(i) for i in INCLUDES])
@pytest.mark.parametrize("source", SOURCES)
def test_sources_compile_without_warnings(inc, source):
    r = subprocess.run(["g++", "-fsyntax-only", *_flags(inc), str(trt_build.TRT_DIR / source)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"TensorRT {_trt_version(inc)}: {source}\n{r.stderr[-3000:]}"
    print(f"compiled {source} against TensorRT {_trt_version(inc)} headers")


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    """Build the library (shared, TensorRT/kernel symbols unresolved) and the dlopen harness once."""
    if not INCLUDES:
        pytest.skip("no TensorRT headers: set TENSORRT_INCLUDE_DIR to NVIDIA/TensorRT's include/ (or TENSORRT_ROOT)")
    inc = INCLUDES[-1]
    out = tmp_path_factory.mktemp("plugin_lib")
    lib, exe = out / trt_build.LIBRARY_NAME, out / "plugin_host_check"
    cudart = CUDA_INC.parent / "lib64"
    cmds = [["g++", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", *_flags(inc),
             *[str(trt_build.TRT_DIR / s) for s in SOURCES], f"-L{cudart}", "-lcudart", "-ldl", "-o", str(lib)],
            ["g++", "-O1", *_flags(inc), str(trt_build.TRT_DIR / "tests" / "plugin_host_check.cpp"), "-ldl",
             "-o", str(exe)]]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}")

    def run(cases: list[str], manifest: Path | None = None):
        e = dict(env, VLMX_TRITON_MANIFEST=str(manifest or out / "no-manifest.json"))
        r = subprocess.run([str(exe), str(lib)], input="\n".join(cases) + "\n", capture_output=True, text=True,
                           env=e, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(ln) for ln in r.stdout.splitlines()]
        return lines[0], lines[1:], r.stderr

    return run


def _case(op, attrs, dtypes, shapes, shape_inputs=()):
    """One host-check line; ``shape_inputs``: values of the inputs TensorRT passes as shape inputs (GatherTopK keep)."""
    spec = ";".join(f"{k}={'i' if isinstance(v, int) else 'f' if isinstance(v, float) else 's'}:{v}"
                    for k, v in attrs.items())
    return (f"{op}|{spec}|{','.join(dtypes)}|{';'.join('x'.join(map(str, s)) for s in shapes)}|"
            f"{';'.join('x'.join(map(str, v)) for v in shape_inputs)}")


def test_creators_match_op_table_names_versions_namespaces_and_fields(host_check):
    header, _, _ = host_check([])
    got = {c["name"]: c for c in header["creators"]}
    assert sorted(got) == sorted(OPS)
    for op in OPS.values():
        c = got[op.name]
        assert (c["version"], c["namespace"], c["interface"]) == (PLUGIN_VERSION, PLUGIN_NAMESPACE,
                                                                  "PLUGIN CREATOR_V3ONE")
        assert c["fields"] == [[a.name, FIELD_TYPES[a.kind]] for a in op.attrs]


# (op, attrs, input dtypes, input shapes, output dtypes, output shapes); -1 = the size-tensor dimension.
SHAPE_CASES = [
    ("FlashAttention", {"num_heads": 8, "num_kv_heads": 2, "head_dim": 64, "causal": 1},
     ["half"] * 3, [(2, 7, 512), (2, 9, 128), (2, 9, 128)], ["half"], [[2, 7, 512]]),
    ("FlashAttention", {"num_heads": 16, "head_dim": 64, "layout": "bhsd", "scale": 0.125},
     ["half"] * 4, [(1, 16, 577, 64), (1, 16, 577, 64), (1, 16, 577, 64), (1, 1, 1, 577)], ["half"],
     [[1, 16, 577, 64]]),
    ("FlashAttention", {"num_heads": 4, "head_dim": 64, "layout": "packed", "alibi": 1},
     ["half"], [(1, 5, 768)], ["half"], [[1, 5, 256]]),
    ("W8A8Linear", {}, ["int8", "float", "int8", "float", "half"], [(2, 5, 64), (2, 5, 1), (96, 64), (96,), (96,)],
     ["half"], [[2, 5, 96]]),
    ("W8A8Linear", {"out_dtype": "float16"}, ["int8", "float", "int8", "float"], [(730, 1152), (730, 1), (4304, 1152),
     (4304,)], ["half"], [[730, 4304]]),
    ("QuantizePerToken", {"clip_range": 5.0}, ["half"], [(3, 7, 40)], ["int8", "float"], [[3, 7, 40], [3, 7, 1]]),
    ("GeluQuant", {"approximate": "none"}, ["float"], [(729, 4304)], ["int8", "float"], [[729, 4304], [729, 1]]),
    ("NormQuant", {"mode": "rmsnorm", "eps": 1e-5}, ["half", "half"], [(1, 33, 4096), (4096,)],
     ["int8", "float", "float"], [[1, 33, 4096], [1, 33, 1], [1, 33, 1]]),
    ("TokenImportance", {"num_heads": 4, "num_kv_heads": 1, "head_dim": 64}, ["half", "half"],
     [(2, 6, 256), (2, 50, 64)], ["float"], [[2, 50]]),
    ("GatherTopK", {}, ["half", "float"], [(2, 576, 4096), (2, 576)], ["half", "int64"],
     [[2, 144, 4096], [2, 144]], [(144,)]),
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: c[0] + "-" + "x".join(map(str, c[3][0])))
def test_output_types_shapes_and_serialization_round_trip(host_check, case):
    op, attrs, dtypes, shapes, out_types, out_shapes, *shape_inputs = case
    _, (res,), _ = host_check([_case(op, attrs, dtypes, shapes, *shape_inputs)])
    assert res["created"] and res["cloned"]
    assert res["types_rc"] == 0 and res["output_types"] == out_types
    assert res["shapes_rc"] == 0 and res["output_shapes"] == out_shapes
    # Serialized fields = the op table's full attribute set (defaults filled), identical after the round trip.
    full = get_op(op).validate_attrs(attrs)
    assert [f[0] for f in res["serialized"]] == list(full)
    for name, kind, value in res["serialized"]:
        assert value == pytest.approx(full[name], rel=1e-6) if kind == "float" else value == full[name], name
    assert res["reserialized"] == res["serialized"]
    assert res["size_tensors"] == []  # GatherTopK's kept count is a shape input, not a data-dependent size
    if op == "GatherTopK":
        assert res["workspace"] == shapes[0][0] * shapes[0][1]  # topk_rank's int8 kept mask [B, N]
    elif op != "FlashAttention":
        assert res["workspace"] == 0


@pytest.mark.parametrize("case, problem", [
    (("FlashAttention", {"num_heads": 8, "head_dim": 64}, ["half"] * 3, [(2, 7, 500), (2, 9, 512), (2, 9, 512)]),
     "must end in num_heads\\*head_dim=512"),
    (("FlashAttention", {"num_heads": 8, "num_kv_heads": 3, "head_dim": 64}, ["half"] * 3,
      [(2, 7, 512), (2, 9, 192), (2, 9, 192)]), "positive multiple of num_kv_heads=3"),
    (("FlashAttention", {"num_heads": 2, "head_dim": 64}, ["half"] * 4,
      [(1, 7, 128), (1, 9, 128), (1, 9, 128), (1, 1, 7, 1)]), "must have rank 1..4 and end in the key length 9"),
    (("FlashAttention", {"num_heads": 2, "head_dim": 64, "layout": "packed"}, ["half"], [(1, 7, 300)]),
     "must end in \\(num_heads \\+ 2\\*num_kv_heads\\)\\*head_dim = 384"),
    (("W8A8Linear", {}, ["int8", "float", "int8", "float"], [(4, 40), (4, 1), (32, 40), (32,)]),
     "K = 40 must be a multiple of 16"),
    (("W8A8Linear", {}, ["int8", "float", "int8", "float"], [(4, 64), (4, 1), (32, 48), (32,)]),
     "must be \\[N, K\\] with K = 64"),
    (("TokenImportance", {"num_heads": 4, "head_dim": 64}, ["half", "half"], [(2, 6, 256), (2, 50, 64)]),
     "do not match num_heads, num_kv_heads, head_dim"),
    (("GatherTopK", {}, ["half", "float"], [(2, 576, 64), (2, 575)], [(4,)]), "must be \\[B, N\\] of x"),
])
def test_runtime_shape_checks_refuse_inconsistent_shapes(host_check, case, problem):
    import re

    _, (res,), err = host_check([_case(*case)])
    assert res["shape_check"] == -1 and re.search(problem, err), err


def test_gather_topk_refuses_keep_as_a_device_tensor(host_check):
    """keep must reach the plugin as a shape input; a node without tensorrt_plugin_shape_input_indices is refused
    at build time with what to do."""
    _, (res,), err = host_check([_case("GatherTopK", {}, ["half", "float", "int64"], [(1, 10, 8), (1, 10), (1,)])])
    assert res["shapes_rc"] == -1 and "tensorrt_plugin_shape_input_indices" in err, err


def test_consistent_shapes_pass_the_runtime_check(host_check):
    _, results, err = host_check([_case(*c[:4], *c[6:]) for c in SHAPE_CASES])
    assert [r["shape_check"] for r in results] == [0] * len(SHAPE_CASES), err
    assert [r["configure_rc"] for r in results] == [0] * len(SHAPE_CASES), err


@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_build_refuses_attention_head_dims_the_kernel_lacks(host_check, head_dim):
    """llava-tiny's vision tower has head_dim 16: the build must fail with what to do, not the first inference."""
    _, (res,), err = host_check([_case("FlashAttention", {"num_heads": 4, "head_dim": head_dim, "layout": "bhsd"},
                                       ["half"] * 3, [(1, 4, 17, head_dim)] * 3)])
    assert res["created"] and res["configure_rc"] == -1
    assert f"head_dim {head_dim} is not implemented" in err and "--attention native or decomposed" in err


def test_cuda_kernel_ops_accept_fp16_only(host_check):
    fa = {"num_heads": 2, "head_dim": 64}
    _, (half, single), _ = host_check([_case("FlashAttention", fa, ["half"] * 3, [(1, 4, 128)] * 3),
                                       _case("FlashAttention", fa, ["float"] * 3, [(1, 4, 128)] * 3)])
    assert half["formats"] == [True] * 4
    assert single["formats"][0] is False
    _, (w8,), _ = host_check([_case("W8A8Linear", {}, ["int8", "float", "int8", "float"],
                                    [(4, 64), (4, 1), (32, 64), (32,)])])
    assert w8["formats"] == [True] * 5
    _, (bad,), _ = host_check([_case("W8A8Linear", {}, ["half", "float", "int8", "float"],
                                     [(4, 64), (4, 1), (32, 64), (32,)])])
    assert bad["formats"][0] is False  # x must be int8


def _manifest(path: Path, kernels: list[tuple[str, str | None]]) -> Path:
    """A manifest in plugins/triton_aot.py's format listing the given (kernel, dtype) entries."""
    entries = [{"kernel": k, "spec": f"{dt}.a1", "symbol": k, "cubin": f"{k}.cubin", "ptx": f"{k}.ptx",
                "params": [{"name": "x_ptr", "type": "*fp16"}, {"name": "C", "type": "i32"}],
                "trailing_params": [{"name": "global_scratch", "type": "*i8", "size": 0}], "num_warps": 4,
                "threads_per_block": 128, "shared_bytes": 0, "grid": ["rows", "1", "1"],
                "match": {"dtype": dt, "ranges": {"C": [1, None]}}, "divisible_by_16": []} for k, dt in kernels]
    path.write_text(json.dumps({"format": 1, "target": "trt-sm75", "sm": 75, "kernels": entries}))
    return path


def test_triton_ops_accept_the_dtypes_their_manifest_provides(host_check, tmp_path):
    case = _case("QuantizePerToken", {}, ["half"], [(4, 64)])
    case32 = _case("QuantizePerToken", {}, ["float"], [(4, 64)])
    _, (missing,), err = host_check([case])
    assert missing["formats"][0] is False and "manifest" in err and "VLMX_TRITON_MANIFEST" in err
    m = _manifest(tmp_path / "manifest.json", [("quantize_per_token", "float16")])
    _, (fp16, fp32), err = host_check([case, case32], manifest=m)
    assert fp16["formats"] == [True, True, True]
    assert fp32["formats"][0] is False and "quantize_per_token for float32" in err
    gather = _case("GatherTopK", {}, ["half", "float"], [(1, 10, 8), (1, 10)], [(4,)])
    m = _manifest(tmp_path / "m2.json", [("gather_rows", "float16"), ("topk_rank", "float32"), ("topk_compact", None)])
    _, (ok,), _ = host_check([gather], manifest=m)
    assert ok["formats"] == [True] * 4


def test_bad_manifest_is_reported_with_its_path(host_check, tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"format": 1, "sm": 75, "kernels": [{"kernel": "quantize_per_token"}]}))
    _, (res,), err = host_check([_case("QuantizePerToken", {}, ["half"], [(4, 64)])], manifest=bad)
    assert res["formats"][0] is False and str(bad) in err and "missing key" in err


@pytest.mark.parametrize("attrs", [
    {"num_heads": 4},                                         # head_dim is required
    {"num_heads": 4, "head_dim": 64, "layout": "sbhd"},       # not a layout choice
    {"num_heads": 4, "head_dim": 64, "heads": 3},             # not a field of the op
    {"num_heads": 4, "head_dim": 64, "layout": ""},           # empty string is not a layout either
])
def test_invalid_fields_are_refused_with_a_message(host_check, attrs):
    _, (res,), err = host_check([_case("FlashAttention", attrs, ["half"], [(1, 4, 256)])])
    assert res == {"created": False}
    assert "vlmx::FlashAttention" in err


@pytest.fixture(scope="module")
def real_manifest(tmp_path_factory):
    """A manifest + cubins from plugins/triton_aot.py (host compile for sm_75; skipped without a usable Triton)."""
    try:
        from vlmx.plugins import triton_aot

        out = tmp_path_factory.mktemp("triton75")
        triton_aot.compile_all("trt-sm75", out, kernels=["quantize_per_token", "topk_rank", "topk_compact",
                                                         "gather_rows"], jobs=1)
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"cannot compile the Triton kernels here: {e}")
    return out / "manifest.json"


@pytest.fixture(scope="module")
def select_check(tmp_path_factory):
    """The C++ Triton loader alone (no TensorRT headers needed)."""
    inc = None
    exe = tmp_path_factory.mktemp("select") / "cubin_select_check"
    cudart = CUDA_INC.parent / "lib64"
    r = subprocess.run(["g++", "-O1", *_flags(inc), str(trt_build.TRT_DIR / "tests" / "cubin_select_check.cpp"),
                        str(trt_build.TRT_DIR / "cubin_loader.cpp"), f"-L{cudart}", "-lcudart", "-ldl", "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    def run(manifest, cases):
        r = subprocess.run([str(exe), str(manifest)], input="\n".join(cases) + "\n", capture_output=True, text=True,
                           env=dict(os.environ, LD_LIBRARY_PATH=str(cudart)), timeout=60)
        return r.returncode, [json.loads(ln) for ln in r.stdout.splitlines()]

    return run


SELECT_CASES = [  # (kernel, dtype, launch values): pointers as byte addresses
    ("quantize_per_token", "float16", {"x_ptr": 4096, "q_ptr": 8192, "scale_ptr": 256, "C": 1152, "rows": 729}),
    ("quantize_per_token", "float16", {"x_ptr": 4098, "q_ptr": 8192, "scale_ptr": 256, "C": 1152, "rows": 729}),
    ("quantize_per_token", "float32", {"x_ptr": 4096, "q_ptr": 8192, "scale_ptr": 256, "C": 4304, "rows": 5}),
    ("quantize_per_token", "float16", {"x_ptr": 4096, "q_ptr": 8192, "scale_ptr": 256, "C": 20000, "rows": 1}),
    ("quantize_per_token", "float16", {"x_ptr": 4096, "q_ptr": 8192, "scale_ptr": 256, "C": 77, "rows": 3}),
    ("topk_rank", "float32", {"scores_ptr": 4096, "kept_ptr": 8192, "N": 576, "keep": 144, "B": 2}),
    ("topk_compact", "float32", {"kept_ptr": 8192, "idx_ptr": 4096, "N": 576, "keep": 144, "B": 2}),
    ("gather_rows", "float16", {"x_ptr": 4096, "idx_ptr": 64, "out_ptr": 8192, "N": 576, "keep": 144, "C": 4096, "B": 2}),
    ("gather_rows", "float32", {"x_ptr": 4100, "idx_ptr": 64, "out_ptr": 8192, "N": 576, "keep": 144, "C": 33, "B": 1}),
    ("token_importance", "float16", {"q_ptr": 0, "k_ptr": 0, "T": 1, "N": 1, "D": 64}),  # not in this manifest
]


def test_cpp_loader_selects_the_same_specialisation_as_the_python_loader(real_manifest, select_check):
    from vlmx.plugins import cubin_loader

    manifest = cubin_loader.read_manifest(real_manifest.parent)
    cases = [f"{k}|{dt}|" + ";".join(f"{n}={'p' if n.endswith('_ptr') else 'i'}:{v}" for n, v in vals.items())
             for k, dt, vals in SELECT_CASES]
    rc, got = select_check(real_manifest, cases)
    assert rc == 0 and len(got) == len(SELECT_CASES)
    print("C++ selections:", [r["spec"] for r in got])
    assert sum(r["spec"] is not None for r in got) == len(SELECT_CASES) - 1  # all but token_importance
    for (kernel, dtype, vals), res in zip(SELECT_CASES, got):
        try:
            entry = cubin_loader.select_entry(manifest, kernel, dtype, vals)
        except cubin_loader.LoaderError:
            entry = None
        assert res["spec"] == (entry["spec"] if entry else None), (kernel, dtype, vals)
        if entry:
            assert tuple(res["grid"]) == tuple(cubin_loader.grid_of(entry, vals))
            assert res["threads"] == entry["threads_per_block"]


def test_real_manifest_enables_gather_topk_and_quantize(host_check, real_manifest):
    _, (q16, q32, gather, gelu), err = host_check([
        _case("QuantizePerToken", {}, ["half"], [(4, 64)]), _case("QuantizePerToken", {}, ["float"], [(4, 64)]),
        _case("GatherTopK", {}, ["half", "float"], [(1, 10, 8), (1, 10)], [(4,)]),
        _case("GeluQuant", {}, ["half"], [(4, 64)])], manifest=real_manifest)
    assert q16["formats"] == q32["formats"] == [True, True, True] and gather["formats"] == [True] * 4
    assert gelu["formats"][0] is False and "gelu_quant for float16 is not in" in err  # not compiled into it


@needs_headers
def test_plugin_library_links_completely_against_the_kernel_library(tmp_path):
    """With the CUDA kernels (plugins/build.py) and cudart, nothing is left undefined: the C ABI names match and
    the library needs no TensorRT symbol at link time (TensorRT's plugin interfaces are header-only)."""
    from vlmx.plugins import build as kernel_build

    try:
        kernels = kernel_build.build("trt-sm75", verbose=False)
    except Exception as e:  # nvcc missing or failing is reported by the kernel tests themselves
        pytest.skip(f"kernel library unavailable: {e}")
    cudart = CUDA_INC.parent / "lib64"
    lib = tmp_path / trt_build.LIBRARY_NAME
    r = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", *_flags(INCLUDES[-1]),
                        *[str(trt_build.TRT_DIR / s) for s in SOURCES], f"-L{cudart}", str(kernels), "-lcudart",
                        "-ldl", "-Wl,--no-undefined", "-o", str(lib)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    names = {ln.split()[-1] for ln in exported.splitlines() if ln.strip()}
    assert {"getCreators", "setLoggerFinder"} <= names
    assert not [n for n in names if n.startswith("_ZN4vlmx")], "internal symbols must stay hidden"


@needs_headers
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_cmake_builds_the_library_with_the_kernels_for_sm75(tmp_path):
    """The Dockerfile's build step: CMake + nvcc (sm_75 SASS + compute_75 PTX), here against the headers only."""
    root = tmp_path / "trt"
    (root).mkdir()
    (root / "include").symlink_to(INCLUDES[-1])
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", str(trt_build.TRT_DIR), "-B", str(build), f"-DTENSORRT_ROOT={root}",
                        "-DVLMX_CUDA_ARCH=75", f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "building against the TensorRT headers only" in r.stdout and "for sm_75 + compute_75" in r.stdout
    r = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    exported = subprocess.run(["nm", "-D", "--defined-only", str(build / trt_build.LIBRARY_NAME)],
                              capture_output=True, text=True).stdout
    for name in ("getCreators", "setLoggerFinder", "vlmx_flash_attention_fwd", "vlmx_w8a8_linear"):
        assert f" {name}\n" in exported + "\n", name

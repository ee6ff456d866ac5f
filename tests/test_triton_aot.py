"""CPU tests of the Triton AOT path: compile every kernel for every target, check the manifest against the PTX ABI,
the launch-parameter computation (selection, grid, argument packing), the loader's errors without a driver, and the
kernels' numerics through the torch-op code path with Triton's CPU interpreter standing in for the GPU."""
from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton (the AOT compiler) is not installed: pip install triton==3.6.0")

from vlmx.plugins import cubin_loader as L  # noqa: E402
from vlmx.plugins import triton_aot as A  # noqa: E402
from vlmx.torch_ref import reference as R  # noqa: E402
from vlmx.torch_ref.targets import TARGETS  # noqa: E402

PTX_TYPE = {"*fp16": "u64", "*fp32": "u64", "*i8": "u64", "*i64": "u64", "i32": "u32", "fp32": "f32"}
SCALE_REL_TOL = 1e-6
IMPORTANCE_REL_TOL = 1e-5
SUM_REL_TOL = 1e-5
#: Opt-in shared memory per block (bytes) by sm, from the CUDA programming guide; the loader opts in above 48 KB.
SMEM_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="session")
def sm75(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm75")
    return A.compile_all("trt-sm75", out), out


def check_build(manifest: dict, out: Path, sm: int) -> None:
    """Every spec compiled; files exist; PTX entry name and parameter types equal manifest params + trailing."""
    assert manifest["sm"] == sm and manifest["triton_version"] == triton.__version__
    major_minor = tuple(int(p) for p in triton.__version__.split(".")[:2])
    expected_trailing = ([] if major_minor < (3, 3) else ["global_scratch"]) + (
        ["profile_scratch"] if major_minor >= (3, 5) else [])
    assert manifest["trailing_params"] == expected_trailing
    assert {(e["kernel"], e["spec"]) for e in manifest["kernels"]} == {(s.kernel, s.name) for s in A.SPECS}
    for e in manifest["kernels"]:
        ptx = (out / e["ptx"]).read_text()
        assert (out / e["cubin"]).read_bytes()[:4] == b"\x7fELF", e["cubin"]
        assert re.search(rf"\.target\s+sm_{sm}a?\b", ptx), f"{e['ptx']} does not target sm_{sm}"
        assert re.search(rf"\.entry\s+{e['symbol']}\s*\(", ptx)
        want = [PTX_TYPE[p["type"]] for p in e["params"]] + ["u64"] * len(e["trailing_params"])
        assert A.ptx_entry_params(ptx) == want == e["ptx_param_types"], f"{e['kernel']}.{e['spec']}"
        assert [p["name"] for p in e["trailing_params"]] == expected_trailing
        assert all(p["size"] == 0 for p in e["trailing_params"]), "kernels must not need Triton scratch memory"
        assert e["threads_per_block"] == 32 * e["num_warps"] and e["shared_bytes"] <= SMEM_PER_BLOCK[sm]
        assert len(e["grid"]) == 3


def test_sm75_build_matches_ptx_abi(sm75):
    manifest, out = sm75
    check_build(manifest, out, 75)
    assert json.loads((out / "manifest.json").read_text())["kernels"] == manifest["kernels"]


@pytest.mark.slow
@pytest.mark.parametrize("target", [t for t in TARGETS if t != "trt-sm75"])
def test_every_target_compiles(target, tmp_path):
    manifest = A.compile_all(target, tmp_path)
    check_build(manifest, tmp_path, TARGETS[target].sm)


def test_rebuild_reuses_up_to_date_entries(sm75):
    manifest, out = sm75
    again = A.compile_all("trt-sm75", out)
    assert again["kernels"] == manifest["kernels"] and again["compile_seconds"] < 5


def test_cli_writes_files(tmp_path):
    assert A.main(["--target", "trt-sm80", "--out", str(tmp_path), "--kernel", "gather_rows"]) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert {e["spec"] for e in m["kernels"]} == {"fp16.a16", "fp16.a1", "fp32.a16", "fp32.a1"}
    assert all((tmp_path / f"gather_rows.{s}.{x}").exists() for s in ("fp16.a16", "fp32.a1") for x in ("cubin", "ptx"))


def test_unsupported_triton_is_refused(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    with pytest.raises(RuntimeError, match="not supported.*install e.g. triton==3.6.0"):
        A.triton_version()


def test_unknown_target_and_kernel_are_named(tmp_path):
    with pytest.raises(ValueError, match="trt-sm12 is not a known target; choose one of trt-sm75"):
        A.compile_all("trt-sm12", tmp_path)
    with pytest.raises(ValueError, match="unknown kernel"):
        A.compile_all("trt-sm75", tmp_path, kernels=["softmax"])


# ------------------------------------------------------------------------------------------------ launch params
ALIGNED, MISALIGNED = 0x7F0000001000, 0x7F0000001002


def _row_values(kernel: str, c: int, ptr: int) -> dict:
    names = [n for n, _ in next(s for s in A.SPECS if s.kernel == kernel).params]
    v = {n: ptr for n in names if n.endswith("_ptr")}
    return {**v, "C": c, "rows": 3}


@pytest.mark.parametrize("kernel", ["quantize_per_token", "gelu_quant", "norm_quant"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("c", [1, 15, 16, 127, 129, 1000, 1024, 1152, 4096, 4304, 8192, 8193, 11008, 14336])
def test_row_kernel_selection(sm75, kernel, dtype, c):
    manifest, _ = sm75
    for ptr in (ALIGNED, MISALIGNED):
        e = L.select_entry(manifest, kernel, dtype, _row_values(kernel, c, ptr))
        lo, hi = e["match"]["ranges"]["C"]
        assert e["match"]["dtype"] == dtype and lo <= c and (hi is None or c <= hi)
        assert e["spec"].split(".")[1] == ("a16" if ptr == ALIGNED and c % 16 == 0 else "a1")
        if c <= 8192:
            assert e["constexprs"] == {"BLOCK_C": max(128, 1 << (c - 1).bit_length()), "ONE_CHUNK": 1}
        else:
            assert e["constexprs"]["ONE_CHUNK"] == 0
        assert L.grid_of(e, _row_values(kernel, c, ptr)) == (3, 1, 1)


@pytest.mark.parametrize("d", [32, 64, 72, 80, 96, 128, 256])
def test_token_importance_selection_and_grid(sm75, d):
    manifest, _ = sm75
    v = {"q_ptr": ALIGNED, "k_ptr": ALIGNED, "out_ptr": ALIGNED, "T": 33, "N": 576, "D": d, "group": 1,
         "q_stride_b": 33 * 32 * d, "q_stride_t": 32 * d, "k_stride_b": 576 * 32 * d, "k_stride_n": 32 * d,
         "scale": 0.1, "inv_count": 0.01, "H": 32, "B": 2}
    e = L.select_entry(manifest, "token_importance", "float16", v)
    assert e["constexprs"]["BLOCK_D"] >= d > e["constexprs"]["BLOCK_D"] // 2 or d <= 32
    assert e["spec"].split(".")[1] == ("a16" if d % 16 == 0 else "a1")
    assert L.grid_of(e, v) == (3, 32, 2)
    with pytest.raises(L.LoaderError, match="no specialisation of token_importance fits"):
        L.select_entry(manifest, "token_importance", "float16", {**v, "D": 320})


def test_pack_args_order_types_and_trailing(sm75):
    manifest, _ = sm75
    v = {"x_ptr": ALIGNED, "w_ptr": ALIGNED + 16, "b_ptr": ALIGNED + 32, "q_ptr": ALIGNED + 48, "scale_ptr": 64,
         "sum_ptr": 80, "C": 4096, "eps": 1e-6, "clip_range": 0.0, "static_scale": 1.0, "is_rms": 1,
         "per_token": 1, "has_bias": 0, "rows": 10}
    e = L.select_entry(manifest, "norm_quant", "float16", v)
    args = L.pack_args(e, v)
    assert len(args) == len(e["params"]) + len(manifest["trailing_params"])
    assert [type(a) for a in args[:7]] == [ctypes.c_uint64] * 6 + [ctypes.c_int32]
    assert args[0].value == ALIGNED and args[6].value == 4096 and args[10].value == 1
    assert isinstance(args[7], ctypes.c_float) and abs(args[7].value - 1e-6) < 1e-12
    assert all(isinstance(a, ctypes.c_uint64) and a.value == 0 for a in args[len(e["params"]):])
    with pytest.raises(L.LoaderError, match="does not fit i32"):
        L.pack_args(e, {**v, "C": 2**31})
    with pytest.raises(L.LoaderError, match="missing launch value 'eps'"):
        L.pack_args(e, {k: x for k, x in v.items() if k != "eps"})
    scratch = {**e, "trailing_params": [{"name": "global_scratch", "type": "*i8", "size": 256}]}
    with pytest.raises(L.LoaderError, match="needs 256 bytes of global_scratch"):
        L.pack_args(scratch, v)


def test_grid_formulas_and_limits():
    e = {"kernel": "k", "spec": "s", "grid": ["cdiv(T,16)", "H", "1"]}
    assert L.grid_of(e, {"T": 17, "H": 4}) == (2, 4, 1)
    with pytest.raises(L.LoaderError, match="names no launch value"):
        L.grid_of(e, {"T": 17})
    with pytest.raises(L.LoaderError, match="outside CUDA limits"):
        L.grid_of(e, {"T": 17, "H": 70000})


def test_choose_binary():
    assert L.choose_binary({"sm": 75}, 75) == "cubin"
    assert L.choose_binary({"sm": 75}, 90) == "ptx"
    assert L.choose_binary({"sm": 80}, 86) == "cubin"
    assert L.choose_binary({"sm": 90}, 90, "ptx") == "ptx"
    with pytest.raises(L.LoaderError, match="cannot run on an sm_90 device"):
        L.choose_binary({"sm": 75}, 90, "cubin")
    with pytest.raises(L.LoaderError, match="cannot run on an sm_75 device"):
        L.choose_binary({"sm": 86}, 75)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the no-driver error path cannot be tested")
def test_loader_without_driver_says_what_is_missing():
    with pytest.raises(L.LoaderError, match="cuda-bindings is not installed|no usable CUDA driver"):
        L.load_module(b"\x7fELF")


def test_missing_manifest_says_how_to_build(tmp_path):
    with pytest.raises(L.LoaderError, match="python -m vlmx.plugins.triton_aot --target trt-sm75"):
        L.read_manifest(tmp_path)


def test_register_is_explicit():
    code = ("import torch, vlmx.plugins, vlmx.plugins.triton_ops as T, vlmx.torch_ref.ops\n"
            "has = lambda: [torch._C._dispatch_has_kernel_for_dispatch_key('vlmx::' + n, 'CUDA') for n in T.TRITON_OPS]\n"
            "before = has(); T.register(); print(before, has())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{[False] * 5} {[True] * 5}"


# ------------------------------------------------------------------------------------------------ numerics
# Triton's CPU interpreter must be switched on before Triton is first imported, so the kernels run in a child
# process (this file run as a script) that goes through triton_ops exactly like the GPU path: the selected
# manifest entry's params in ABI order (pack_args must accept them), its constexprs and its grid. The parent
# compares the saved outputs with the reference.
ROW_SHAPES = [(5, 20), (3, 1000), (4, 1024), (3, 1152), (2, 9000), (1, 10240)]  # odd, CLIP, SigLIP, looped
TI_SHAPES = [(1, 20, 77, 4, 4, 64), (2, 9, 50, 4, 2, 72), (1, 17, 130, 2, 1, 128)]
GT_SHAPES = [(2, 50, 20, 17), (1, 300, 64, 1), (1, 300, 64, 300), (3, 129, 16, 64)]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
NORM_VARIANTS = [(m, pt) for m in ("layernorm", "rmsnorm") for pt in (1, 0)]


def _interp_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    cases = {}
    for rows, c in ROW_SHAPES:
        for name, dt in DTYPES.items():
            x = (torch.randn(rows, c, generator=g) * 3).to(dt)
            x[0, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -3.5])  # scale exactly 1: half-to-even ties
            cases[f"row-{rows}x{c}-{name}"] = {"x": x, "w": (torch.rand(c, generator=g) + 0.5).to(dt),
                                               "b": (torch.randn(c, generator=g) * 0.1).to(dt)}
    for b, t, n, h, hkv, d in TI_SHAPES:
        for name, dt in DTYPES.items():
            cases[f"ti-{b}-{t}-{n}-{h}-{hkv}-{d}-{name}"] = {
                "q": torch.randn(b, t, h * d, generator=g).to(dt), "k": torch.randn(b, n, hkv * d, generator=g).to(dt),
                "h": h, "hkv": hkv, "d": d}
    for b, n, c, keep in GT_SHAPES:  # many tied scores: the lower index must win
        cases[f"gt-{b}-{n}-{c}-{keep}"] = {"x": torch.randn(b, n, c, generator=g).half(),
                                           "s": torch.randint(0, 7, (b, n), generator=g).float() / 3, "keep": keep}
    return cases


def _interp_main(manifest_dir: str, out_path: str) -> None:
    import triton.runtime.interpreter as interp

    from vlmx.plugins import triton_kernels, triton_ops

    cvt = interp._implicit_cvt

    def scalar_0d(arg):  # Triton 3.6's interpreter passes scalars as 1-element arrays; NumPy 2 refuses int() on them
        out = cvt(arg)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool) and hasattr(out, "handle"):
            out.handle.data = out.handle.data.reshape(())
        return out

    interp._implicit_cvt = scalar_0d
    manifest, used = L.read_manifest(manifest_dir), []

    def launch(kernel, ref, dtype, values):
        e = L.select_entry(manifest, kernel, dtype, values)
        L.pack_args(e, values)
        used.append((kernel, e["spec"]))
        triton_kernels.KERNELS[kernel][L.grid_of(e, values)](*[values[p["name"]] for p in e["params"]],
                                                             **e["constexprs"])

    triton_ops._launch = launch
    inputs, outputs = _interp_inputs(), {}
    for key, v in inputs.items():
        if key.startswith("row"):
            x, w, b = v["x"], v["w"], v["b"]
            outputs[key] = {"quant": triton_ops.quantize_per_token(x),
                            "quant_clip": triton_ops.quantize_per_token(x, clip_range=2.5),
                            **{f"gelu_{a}": triton_ops.gelu_quant(x, approximate=a) for a in ("tanh", "none")},
                            **{f"norm_{m}_{pt}": triton_ops.norm_quant(x, w, b if pt else None, mode=m, per_token=pt,
                                                                       static_scale=0.03) for m, pt in NORM_VARIANTS}}
        elif key.startswith("ti"):
            outputs[key] = triton_ops.token_importance(v["q"], v["k"], num_heads=v["h"], num_kv_heads=v["hkv"],
                                                       head_dim=v["d"])
        else:
            outputs[key] = triton_ops.gather_topk(v["x"], v["s"], torch.tensor([v["keep"]]))
    torch.save({"inputs": inputs, "outputs": outputs, "used": used}, out_path)


@pytest.fixture(scope="module")
def interp(sm75, tmp_path_factory):
    _, build = sm75
    out = tmp_path_factory.mktemp("interp") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, str(build), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return torch.load(out)


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Report ||out - ref|| / ||ref|| and assert it is within the named tolerance."""
    err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))
    print(f"{name}: rel err {err:.2e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def assert_quant(name: str, out, ref, exact: bool) -> None:
    """int8 exact (or off by one in max(2, 1e-3 n) elements), scales within SCALE_REL_TOL, sum = sum(q * scale)."""
    d = (out[0].int() - ref[0].int()).abs()
    allowed = 0 if exact else max(2, int(1e-3 * d.numel()))
    assert int(d.max()) <= (0 if exact else 1) and int((d > 0).sum()) <= allowed, f"{name}: int8 differs"
    srel = float(((out[1] - ref[1]).abs() / ref[1]).max())
    assert srel <= SCALE_REL_TOL, f"{name}: scale rel err {srel:.2e} > {SCALE_REL_TOL:.0e}"
    if len(out) > 2:
        assert_close(f"{name} sum", out[2], (out[0].double() * out[1].double()).sum(-1, keepdim=True), SUM_REL_TOL)


@pytest.mark.parametrize("rows,c", ROW_SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_row_ops_match_reference(interp, rows, c, dtype):
    key = f"row-{rows}x{c}-{dtype}"
    v, out = interp["inputs"][key], interp["outputs"][key]
    x, w, b = v["x"], v["w"], v["b"]
    assert_quant("quantize", out["quant"], R.quantize_per_token(x), exact=True)
    assert_quant("quantize clip", out["quant_clip"], R.quantize_per_token(x, 2.5), exact=True)
    for a in ("tanh", "none"):
        assert_quant(f"gelu {a}", out[f"gelu_{a}"], R.gelu_quant(x, a), exact=False)
    for m, pt in NORM_VARIANTS:
        ref = R.norm_quant(x, w, b if pt else None, mode=m, per_token=pt, static_scale=0.03)
        assert_quant(f"norm {m} per_token={pt}", out[f"norm_{m}_{pt}"], ref, exact=False)


@pytest.mark.parametrize("shape", TI_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_token_importance_matches_reference(interp, shape, dtype):
    key = "ti-" + "-".join(map(str, shape)) + f"-{dtype}"
    v = interp["inputs"][key]
    ref = R.token_importance(v["q"].double(), v["k"].double(), v["h"], v["hkv"], v["d"])
    assert_close("token_importance", interp["outputs"][key], ref, IMPORTANCE_REL_TOL)


@pytest.mark.parametrize("shape", GT_SHAPES, ids=str)
def test_gather_topk_matches_reference_with_ties(interp, shape):
    key = "gt-" + "-".join(map(str, shape))
    v = interp["inputs"][key]
    (xk, idx), (rx, ridx) = interp["outputs"][key], R.gather_topk(v["x"], v["s"], v["keep"])
    assert torch.equal(idx, ridx) and torch.equal(xk, rx)


def test_interpreter_path_covers_every_kernel_and_build(interp):
    assert {k for k, _ in interp["used"]} == {s.kernel for s in A.SPECS}
    specs = {s for _, s in interp["used"]}
    assert {"fp16.a1.c128", "fp16.a16.c1024", "fp16.a16.loop4096", "fp32.a1.d128"} <= specs


def test_env_var_kernel_dir(monkeypatch, tmp_path):
    from vlmx.plugins import triton_ops

    monkeypatch.setenv("VLMX_TRITON_DIR", str(tmp_path))
    assert triton_ops.default_kernel_dir(75) == tmp_path
    monkeypatch.delenv("VLMX_TRITON_DIR")
    assert triton_ops.default_kernel_dir(75).parts[-3:] == ("build", "triton", "sm75")
    assert os.sep.join(triton_ops.default_kernel_dir(90).parts[-2:]) == os.path.join("triton", "sm90")


if __name__ == "__main__":  # child process of the `interp` fixture, TRITON_INTERPRET=1
    _interp_main(sys.argv[1], sys.argv[2])

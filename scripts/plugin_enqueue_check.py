"""Run the vlmx TensorRT plugins' creators and enqueue() on a GPU without TensorRT, against the torch reference.

The plugin library needs no TensorRT symbols (IPluginV3 is header-only), so ``plugins/trt/tests/plugin_enqueue_check.cpp``
plays TensorRT: creator by name from getCreators(), fields from node attributes, the build-phase calls, serialization
round trip, attachToContext, onShapeChange and enqueue with device buffers. This driver

1. builds, per configuration, the kernel library (``vlmx.plugins.build``), the plugin library through CMake
   (``vlmx.plugins.trt_build.build_plugin_library`` with ``-DVLMX_KERNELS_LIB``, TensorRT headers only) and the
   Triton kernels (``vlmx.plugins.triton_aot``):
   ``ptx75``  = kernels as compute_75 PTX only + Triton for sm_75 launched from its PTX (driver JIT: Turing ISA),
   ``native`` = kernels as SASS for this GPU + Triton cubins for this GPU;
2. generates fresh random inputs with torch on the GPU (seed from os.urandom unless --seed), writes them as raw files;
3. runs the harness (outputs poisoned with 0xFF before enqueue) and compares every output with
   ``vlmx.torch_ref.reference`` on the CPU (fp32 math, errors in fp64): relative error ||out-ref||/||ref||;
4. writes ``plugins_enqueue.json`` and ``plugins_enqueue.md`` under --out.

    python scripts/plugin_enqueue_check.py --out OUT [--configs ptx75,native] [--trt-include DIR] [--dry-run]

``--dry-run`` (no GPU needed) builds everything and runs the harness with --no-device: creators, fields, types,
shapes, formats, configurePlugin, workspace, serialization and onShapeChange for every case, no enqueue.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmx.plugins import build as kernel_build
from vlmx.plugins import trt_build, triton_aot
from vlmx.torch_ref import reference as ref

REPO = Path(__file__).resolve().parents[1]
HARNESS_SRC = REPO / "plugins" / "trt" / "tests" / "plugin_enqueue_check.cpp"
TORCH2HARNESS = {torch.float16: "half", torch.float32: "float", torch.int8: "int8", torch.int32: "int32",
                 torch.int64: "int64"}
NP = {torch.float16: np.float16, torch.float32: np.float32, torch.int8: np.int8, torch.int64: np.int64}
ATTN_TOL, FLOAT_OUT_TOL, SCALE_TOL, SCORE_TOL = 2e-3, 1e-3, 1e-6, 1e-4


# ------------------------------------------------------------------------------------------------- tooling
def cuda_home() -> Path:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cands = [Path(os.path.realpath(nvcc)).parent.parent, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]
    return next((c for c in cands if (c / "include" / "cuda_runtime_api.h").is_file()), cands[-1])


def trt_include(arg: str | None) -> Path:
    fetched = trt_build.cache_dir() / f"tensorrt-headers-{trt_build.HEADERS_PACKAGE['tensorrt']}" / "include"
    cands = [arg, *os.environ.get("TENSORRT_INCLUDE_DIR", "").split(os.pathsep), str(REPO / ".trt_headers/include"),
             str(fetched)]  # the last: `python -m vlmx.plugins.trt_build --fetch-headers` (pinned wheel, sha256)
    for c in cands:
        if c and (Path(c) / "NvInferRuntime.h").is_file():
            return Path(c).resolve()
    raise SystemExit("no TensorRT headers: pass --trt-include or set TENSORRT_INCLUDE_DIR to NVIDIA/TensorRT's "
                     "include/ (e.g. a git-ignored .trt_headers/include)")


def trt_version(inc: Path) -> str:
    text = (inc / "NvInferVersion.h").read_text()
    nums = []
    for key in ("MAJOR", "MINOR", "PATCH"):
        for prefix in (f"TRT_{key}_ENTERPRISE", f"NV_TENSORRT_{key}"):
            line = next((ln for ln in text.splitlines() if ln.startswith(f"#define {prefix} ")), None)
            if line and line.split()[2].isdigit():
                nums.append(line.split()[2])
                break
    return ".".join(nums)


def compile_harness(inc: Path, out: Path) -> Path:
    exe = out / "plugin_enqueue_check"
    cuda = cuda_home()
    cmd = ["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-isystem", str(inc), "-isystem",
           str(cuda / "include"), str(HARNESS_SRC), f"-L{cuda / 'lib64'}", "-lcudart", "-ldl", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"harness compile failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
    return exe


def build_config(name: str, sm: int, inc: Path, work: Path, log: list[str]) -> dict:
    """Kernel library + plugin library (CMake) + Triton manifest for one configuration."""
    t0 = time.monotonic()
    ptx = name == "ptx75"
    klib = kernel_build.build("trt-sm75" if ptx else f"trt-sm{sm}", ptx_only=ptx, verbose=False)
    root = work / "trt_root"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "include").exists():
        (root / "include").symlink_to(inc)
    r = subprocess.run([sys.executable, "-m", "vlmx.plugins.trt_build", "--sm", str(75 if ptx else sm),
                        "--tensorrt-root", str(root), "--build-dir", str(work / f"trt_plugins_{name}"),
                        "--kernels-lib", str(klib)], capture_output=True, text=True, cwd=REPO)
    log.append(f"== {name}: plugin library (CMake)\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    if r.returncode:
        raise SystemExit(f"plugin library build failed for {name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    plib = Path(r.stdout.strip().splitlines()[-1])
    tdir = Path(os.environ.get("VLMX_ENQ_TRITON_ROOT", REPO / "build" / "triton_enq")) / f"sm{75 if ptx else sm}"
    man = triton_aot.compile_all(f"trt-sm{75 if ptx else sm}", tdir)
    try:
        fat = kernel_build.fatbin_entries(klib)
    except Exception as e:  # noqa: BLE001 - informational only
        fat = f"unavailable: {e}"
    return {"name": name, "kernels_lib": str(klib), "kernels_fatbin": fat, "plugin_lib": str(plib),
            "triton_manifest": str(tdir / "manifest.json"), "triton_sm": man["sm"],
            "triton_prefer": "ptx" if ptx else "cubin", "triton_kernels": len(man["kernels"]),
            "build_seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------------------- cases
def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    o, w = out.double(), want.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - w).norm() / w.norm().clamp_min(1e-300))


def int8_check(q: torch.Tensor, q_ref: torch.Tensor, pre: torch.Tensor, tie_tol: float) -> dict:
    """Exact except ties: a mismatch of 1 is allowed where the pre-rounding value is within tie_tol of k + 0.5."""
    diff = (q.long() - q_ref.long()).abs()
    bad = diff != 0
    frac = (pre.double().abs() - pre.double().abs().floor() - 0.5).abs()
    not_tie = bad & ((diff > 1) | (frac > tie_tol))
    return {"elements": q.numel(), "mismatches": int(bad.sum()), "max_abs_diff": int(diff.max()) if q.numel() else 0,
            "mismatches_not_at_ties": int(not_tie.sum()), "tie_tol": tie_tol, "ok": int(not_tie.sum()) == 0}


def float_check(out, want, tol) -> dict:
    e = rel_err(out, want)
    return {"rel_err": e, "max_abs_err": float((out.double() - want.double()).abs().max()), "tol": tol,
            "nan": int(torch.isnan(out.float()).sum()), "ok": e <= tol}


def exact_check(out, want) -> dict:
    eq = bool(out.shape == want.shape and torch.equal(out, want))
    return {"exact": eq, "mismatches": int((out != want).sum()) if out.shape == want.shape else -1, "ok": eq}


def make_cases(dev: torch.device, gen: torch.Generator) -> list[dict]:
    def randn(*shape, dtype=torch.float16, std=1.0):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * std).to(dtype)

    def randint8(*shape):
        return torch.randint(-127, 128, shape, generator=gen, device=dev, dtype=torch.int8)

    cases = []

    def attn(name, attrs, inputs, out_shape, note):
        cases.append({"name": name, "op": "FlashAttention", "attrs": attrs, "inputs": inputs,
                      "outputs": [(torch.float16, out_shape)], "note": note})

    B, S, H, D = 2, 577, 16, 64
    attn("fa_bsd_vitl", {"num_heads": H, "head_dim": D, "layout": "bsd"},
         [randn(B, S, H * D), randn(B, S, H * D), randn(B, S, H * D)], (B, S, H * D), "ViT-L/14-336 B2 S577 H16 D64")
    bias = torch.zeros(B, 1, 1, S, device=dev, dtype=torch.float16)
    bias[0, ..., S - 100:] = torch.finfo(torch.float16).min  # batch 0: last 100 keys are padding
    attn("fa_packed_padbias", {"num_heads": H, "head_dim": D, "layout": "packed"},
         [randn(B, S, 3 * H * D), bias], (B, S, H * D), "packed qkv [2,577,3072] + key-padding bias [2,1,1,577]")
    Hq, Hkv, Dg, Sg = 32, 8, 128, 300
    attn("fa_bhsd_causal_gqa", {"num_heads": Hq, "num_kv_heads": Hkv, "head_dim": Dg, "layout": "bhsd", "causal": 1},
         [randn(B, Hq, Sg, Dg), randn(B, Hkv, Sg, Dg), randn(B, Hkv, Sg, Dg)], (B, Hq, Sg, Dg),
         "bhsd causal GQA H32/8 D128 S300")
    attn("fa_mqa_decode", {"num_heads": 32, "num_kv_heads": 1, "head_dim": 128, "causal": 1},
         [randn(B, 1, 32 * 128), randn(B, 1000, 128), randn(B, 1000, 128)], (B, 1, 32 * 128),
         "MQA decode Sq1 Sk1000 H32/1 D128 (bsd, causal bottom-right)")
    attn("fa_alibi_causal", {"num_heads": 32, "head_dim": 128, "alibi": 1, "alibi_bias_max": 8, "causal": 1,
                             "scale": 0.0883883476},
         [randn(1, 257, 32 * 128), randn(1, 257, 32 * 128), randn(1, 257, 32 * 128)], (1, 257, 32 * 128),
         "MPT-style ALiBi causal H32 D128 S257, explicit scale")

    M, N, K = 577, 4304, 1152
    x_scale = (torch.rand(1, M, 1, generator=gen, device=dev) * 0.02 + 0.005)
    w_scale = (torch.rand(N, generator=gen, device=dev) * 0.002 + 0.0005)
    cases.append({"name": "w8a8_linear_bias", "op": "W8A8Linear", "attrs": {},
                  "inputs": [randint8(1, M, K), x_scale, randint8(N, K), w_scale, randn(N)],
                  "outputs": [(torch.float16, (1, M, N))], "note": "M577 N4304 K1152, fp16 bias"})

    cases.append({"name": "quantize_per_token_fp16", "op": "QuantizePerToken", "attrs": {},
                  "inputs": [randn(2, 577, 1152, std=2.0)], "outputs": [(torch.int8, (2, 577, 1152)),
                                                                       (torch.float32, (2, 577, 1))]})
    cases.append({"name": "quantize_per_token_fp32_clip5", "op": "QuantizePerToken", "attrs": {"clip_range": 5.0},
                  "inputs": [randn(577, 4304, dtype=torch.float32, std=3.0)],
                  "outputs": [(torch.int8, (577, 4304)), (torch.float32, (577, 1))]})
    cases.append({"name": "gelu_quant_tanh_fp16", "op": "GeluQuant", "attrs": {"approximate": "tanh"},
                  "inputs": [randn(577, 4304, std=2.0)], "outputs": [(torch.int8, (577, 4304)),
                                                                     (torch.float32, (577, 1))]})
    cases.append({"name": "gelu_quant_erf_fp32", "op": "GeluQuant", "attrs": {"approximate": "none"},
                  "inputs": [randn(2, 300, 4304, dtype=torch.float32, std=2.0)],
                  "outputs": [(torch.int8, (2, 300, 4304)), (torch.float32, (2, 300, 1))]})
    C = 1152
    cases.append({"name": "norm_quant_layernorm_bias", "op": "NormQuant", "attrs": {"mode": "layernorm", "eps": 1e-6},
                  "inputs": [randn(2, 577, C, std=3.0) + 0.5, randn(C, std=0.5) + 1.0, randn(C, std=0.2)],
                  "outputs": [(torch.int8, (2, 577, C)), (torch.float32, (2, 577, 1)), (torch.float32, (2, 577, 1))]})
    cases.append({"name": "norm_quant_rmsnorm_clip", "op": "NormQuant",
                  "attrs": {"mode": "rmsnorm", "eps": 1e-5, "clip_range": 5.0},
                  "inputs": [randn(1, 33, 4096, std=2.0), randn(4096, std=0.5) + 1.0],
                  "outputs": [(torch.int8, (1, 33, 4096)), (torch.float32, (1, 33, 1)), (torch.float32, (1, 33, 1))]})
    cases.append({"name": "token_importance_gqa", "op": "TokenImportance",
                  "attrs": {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128},
                  "inputs": [randn(2, 16, 32 * 128), randn(2, 576, 8 * 128)],
                  "outputs": [(torch.float32, (2, 576))], "note": "T16 text tokens, N576 visual tokens"})
    Bg, Ng, Cg, keep = 2, 576, 4096, 144
    scores = torch.rand(Bg, Ng, generator=gen, device=dev)
    # keep reaches the plugin as a shape input (tensorrt_plugin_shape_input_indices): the kept count is the
    # outputs' dim at enqueue, never read from the device (no host sync).
    cases.append({"name": "gather_topk_keep144", "op": "GatherTopK", "attrs": {},
                  "inputs": [randn(Bg, Ng, Cg), scores], "shape_inputs": [[keep]],
                  "outputs": [(torch.float16, (Bg, keep, Cg)), (torch.int64, (Bg, keep))], "note": "keep 144 of N576"})
    return cases


def reference_check(case: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> dict:
    """Compare the plugin outputs with vlmx.torch_ref.reference on the CPU."""
    op, a = case["op"], case["attrs"]
    if op == "FlashAttention":
        f32 = [t.float() for t in ins]
        layout = a.get("layout", "bsd")
        if layout == "packed":
            q, k, v, bias = f32[0], None, None, (f32[1] if len(f32) > 1 else None)
        else:
            q, k, v, bias = f32[0], f32[1], f32[2], (f32[3] if len(f32) > 3 else None)
        want = ref.flash_attention(q, k, v, bias, **a)
        return {"o": float_check(outs[0], want, ATTN_TOL)}
    if op == "W8A8Linear":
        want = ref.w8a8_linear(*ins[:4], ins[4].float() if len(ins) > 4 else None, out_dtype="float32")
        res = float_check(outs[0], want, FLOAT_OUT_TOL)
        res["fp16_equal_fraction"] = float((outs[0] == want.half()).float().mean())
        return {"y": res}
    if op in ("QuantizePerToken", "GeluQuant"):
        x = ins[0].float()
        clip = a.get("clip_range", 0.0)
        if op == "QuantizePerToken":
            q_ref, s_ref = ref.quantize_per_token(x, clip)
            y = x
        else:
            q_ref, s_ref = ref.gelu_quant(x, a.get("approximate", "tanh"), clip)
            y = F.gelu(x, approximate=a.get("approximate", "tanh"))
        if clip > 0:
            y = y.clamp(-clip, clip)
        tie = 1e-3 if op == "QuantizePerToken" else 2e-2
        return {"q": int8_check(outs[0], q_ref, y / s_ref, tie), "scale": float_check(outs[1], s_ref, SCALE_TOL)}
    if op == "NormQuant":
        x, w = ins[0].float(), ins[1].float()
        b = ins[2].float() if len(ins) > 2 else None
        mode, eps, clip = a.get("mode", "layernorm"), a.get("eps", 1e-6), a.get("clip_range", 0.0)
        q_ref, s_ref, sum_ref = ref.norm_quant(x, w, b, mode=mode, eps=eps, clip_range=clip)
        y = ref.norm(x, w, b, mode, eps)
        if clip > 0:
            y = y.clamp(-clip, clip)
        own_sum = (outs[0].double() * outs[1].double()).sum(dim=-1, keepdim=True)
        return {"q": int8_check(outs[0], q_ref, y / s_ref, 1e-3), "scale": float_check(outs[1], s_ref, SCALE_TOL),
                "sum": float_check(outs[2], sum_ref, 1e-3),
                "sum_vs_own_q_scale": float_check(outs[2], own_sum, 1e-5)}
    if op == "TokenImportance":
        want = ref.token_importance(ins[0].float(), ins[1].float(), **a)
        return {"scores": float_check(outs[0], want, SCORE_TOL)}
    if op == "GatherTopK":
        x_ref, idx_ref = ref.gather_topk(ins[0], ins[1], case["shape_inputs"][0][0])
        return {"x_kept": exact_check(outs[0], x_ref), "idx": exact_check(outs[1], idx_ref)}
    raise ValueError(op)


def spec_of(t_dtype, shape) -> str:
    return "x".join(str(int(s)) for s in shape) if len(shape) else ""


def write_cases(cases: list[dict], d: Path) -> Path:
    lines = []
    for ci, c in enumerate(cases):
        attrs = ";".join(f"{k}={'i' if isinstance(v, int) else 'f' if isinstance(v, float) else 's'}:{v}"
                         for k, v in c["attrs"].items())
        ins = []
        for i, t in enumerate(c["inputs"]):
            p = d / f"c{ci}_in{i}.bin"
            p.write_bytes(t.detach().cpu().contiguous().numpy().tobytes())
            ins.append(f"{TORCH2HARNESS[t.dtype]}:{spec_of(t.dtype, t.shape)}:{p}")
        outs = []
        for o, spec in enumerate(c["outputs"]):
            dtype, build_shape = spec[0], spec[1]
            run_shape = spec[2] if len(spec) > 2 else build_shape
            p = d / f"c{ci}_out{o}.bin"
            p.unlink(missing_ok=True)
            shape = spec_of(dtype, build_shape)
            if tuple(run_shape) != tuple(build_shape):
                shape += "=" + spec_of(dtype, run_shape)
            outs.append(f"{TORCH2HARNESS[dtype]}:{shape}:{p}")
        shape_in = ";".join("x".join(str(int(v)) for v in vals) for vals in c.get("shape_inputs", []))
        lines.append("|".join([c["name"], c["op"], attrs, ";".join(ins), ";".join(outs), shape_in]))
    path = d / "cases.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_outputs(case: dict, ci: int, d: Path) -> list[torch.Tensor]:
    outs = []
    for o, spec in enumerate(case["outputs"]):
        dtype = spec[0]
        shape = spec[2] if len(spec) > 2 else spec[1]
        arr = np.fromfile(d / f"c{ci}_out{o}.bin", dtype=NP[dtype]).reshape(shape)
        outs.append(torch.from_numpy(arr.copy()))
    return outs


def run_config(cfg: dict, exe: Path, cases: list[dict], work: Path, dry: bool, iters: int) -> list[dict]:
    d = work / f"io_{cfg['name']}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    path = write_cases(cases, d)
    cuda_lib = cuda_home() / "lib64"
    env = dict(os.environ, VLMX_TRITON_MANIFEST=cfg["triton_manifest"], VLMX_TRITON_PREFER=cfg["triton_prefer"],
               LD_LIBRARY_PATH=f"{Path(cfg['kernels_lib']).parent}:{cuda_lib}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    cmd = [str(exe), cfg["plugin_lib"], str(path)] + (["--no-device"] if dry else ["--iters", str(iters)])
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    wall = time.monotonic() - t0
    lines = {}
    for ln in r.stdout.splitlines():
        try:
            j = json.loads(ln)
            lines[j["case"]] = j
        except (ValueError, KeyError):
            pass
    results = []
    for ci, c in enumerate(cases):
        h = lines.get(c["name"], {"ok": False, "error": "no harness output (crash?)"})
        res = {"case": c["name"], "op": c["op"], "attrs": c["attrs"], "note": c.get("note", ""),
               "inputs": [[TORCH2HARNESS[t.dtype], list(t.shape)] for t in c["inputs"]], "harness": h}
        if not dry and h.get("ok"):
            cpu_in = [t.detach().cpu() for t in c["inputs"]]
            res["checks"] = reference_check(c, cpu_in, read_outputs(c, ci, d))
            res["ok"] = all(v["ok"] for v in res["checks"].values())
        else:
            res["ok"] = bool(h.get("ok")) and dry
        results.append(res)
    print(f"[{cfg['name']}] harness rc={r.returncode} in {wall:.1f}s; stderr tail:\n{r.stderr[-2000:]}", flush=True)
    cfg["harness_rc"], cfg["harness_stderr"], cfg["harness_seconds"] = r.returncode, r.stderr[-4000:], round(wall, 2)
    return results


def summary_row(r: dict) -> str:
    if "checks" not in r:
        h = r["harness"]
        return f"| {r['case']} | {r['op']} | {'ok' if r['ok'] else 'FAIL'} | harness: {h.get('error', '')}" \
               f"{' enqueue_rc=' + str(h.get('enqueue_rc')) if 'enqueue_rc' in h else ''} | |"
    parts = []
    for k, v in r["checks"].items():
        if "rel_err" in v:
            parts.append(f"{k} rel {v['rel_err']:.2e} (≤{v['tol']:.0e})")
        elif "mismatches_not_at_ties" in v:
            parts.append(f"{k} int8 mismatches {v['mismatches']}/{v['elements']} (max {v['max_abs_diff']}, "
                         f"{v['mismatches_not_at_ties']} not at ties)")
        else:
            parts.append(f"{k} {'exact' if v['exact'] else 'DIFFERS'}")
    h = r["harness"]
    if "graph_capture_ok" in h:  # enqueue replayed from a CUDA graph: no sync, host copy or allocation inside
        parts.append("graph capture " + ("ok" if h["graph_capture_ok"] else f"FAILED ({h['graph_capture_error']})"))
    ms = h.get("enqueue_ms")
    return f"| {r['case']} | {r['op']} | {'ok' if r['ok'] else 'FAIL'} | {'; '.join(parts)} | " \
           f"{'' if ms is None else f'{ms:.3f}'} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--configs", default="ptx75,native")
    ap.add_argument("--trt-include", default=None)
    ap.add_argument("--work", default=str(REPO / "build" / "plugin_enqueue"))
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: host calls only (no enqueue)")
    ap.add_argument("--sanitize", action="store_true",
                    help="afterwards, run the harness once more under compute-sanitizer memcheck (first config)")
    a = ap.parse_args(argv)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dry = a.dry_run or not torch.cuda.is_available()
    if dry and not a.dry_run:
        print("no CUDA device: running the host calls only (--dry-run)", flush=True)
    inc = trt_include(a.trt_include)
    sm = 75
    device_name = "none"
    if not dry:
        major, minor = torch.cuda.get_device_capability()
        sm, device_name = 10 * major + minor, torch.cuda.get_device_name()
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    dev = torch.device("cuda" if not dry else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    cases = make_cases(dev, gen)
    log: list[str] = []
    exe = compile_harness(inc, work)
    report = {"command": os.environ.get("VLMX_ENQ_COMMAND", " ".join([sys.executable, *sys.argv])),
              "device": device_name, "sm": sm, "tensorrt_headers": trt_version(inc), "seed": seed, "dry_run": dry,
              "torch": torch.__version__, "python": platform.python_version(),
              "tolerances": {"attention_rel": ATTN_TOL, "w8a8_fp16_rel": FLOAT_OUT_TOL, "scale_rel": SCALE_TOL,
                             "token_importance_rel": SCORE_TOL, "norm_sum_rel": 1e-3,
                             "int8": "exact except ±1 where the pre-rounding value is within tie_tol of k+0.5"},
              "configs": []}
    all_ok = True
    for name in [c for c in a.configs.split(",") if c]:
        if name == "native" and dry:
            continue  # no device sm to build for
        cfg = build_config(name, sm, inc, work, log)
        print(f"[{name}] built in {cfg['build_seconds']}s: {cfg['plugin_lib']}", flush=True)
        results = run_config(cfg, exe, cases, work, dry, a.iters)
        cfg["results"] = results
        cfg["ok"] = all(r["ok"] for r in results) and cfg["harness_rc"] == 0
        all_ok &= cfg["ok"]
        report["configs"].append(cfg)
        for r in results:
            print(summary_row(r), flush=True)
    if a.sanitize and not dry and report["configs"] and shutil.which("compute-sanitizer"):
        cfg = report["configs"][0]
        d = work / f"io_{cfg['name']}"
        env = dict(os.environ, VLMX_TRITON_MANIFEST=cfg["triton_manifest"], VLMX_TRITON_PREFER=cfg["triton_prefer"])
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", str(exe), cfg["plugin_lib"],
               str(d / "cases.txt")]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            tail = (r.stdout + r.stderr)[-3000:]
            report["sanitizer"] = {"config": cfg["name"], "rc": r.returncode, "tail": tail}
        except subprocess.TimeoutExpired:
            report["sanitizer"] = {"config": cfg["name"], "rc": "timeout"}
        print(f"compute-sanitizer memcheck ({cfg['name']}): rc={report['sanitizer']['rc']}", flush=True)
    report["ok"] = all_ok
    (out / "plugins_enqueue.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "plugins_enqueue_build.txt").write_text("\n".join(log))
    md = [f"# vlmx TensorRT plugins: creators + enqueue() on {device_name} without TensorRT", "",
          f"Command: `{report['command']}`  ", f"TensorRT headers {report['tensorrt_headers']} (include/ only), "
          f"torch {torch.__version__}, seed {seed}, dry run: {dry}. Relative error = ||out-ref||/||ref|| vs "
          "`vlmx.torch_ref.reference` on the CPU (fp32 math, fp64 norms); outputs poisoned with 0xFF before "
          "enqueue.", ""]
    for cfg in report["configs"]:
        md += [f"## {cfg['name']}: kernels {Path(cfg['kernels_lib']).name} (fatbin {cfg['kernels_fatbin']}), "
               f"Triton sm_{cfg['triton_sm']} via {cfg['triton_prefer']}", "",
               "| case | op | result | errors | enqueue ms |", "|---|---|---|---|---|"]
        md += [summary_row(r) for r in cfg["results"]]
        md.append("")
    if "sanitizer" in report:
        md += [f"compute-sanitizer memcheck over every case ({report['sanitizer']['config']}): "
               f"rc={report['sanitizer']['rc']} (0 = no errors).", ""]
    (out / "plugins_enqueue.md").write_text("\n".join(md))
    print(f"overall: {'ok' if all_ok else 'FAIL'}; wrote {out / 'plugins_enqueue.json'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

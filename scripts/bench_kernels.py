"""Check and time the vlmx CUDA kernels on the GPU at hand, in one run (scripts/device_kernels.sh calls it).

  python scripts/bench_kernels.py --ptx-lib LIB_PTX75 --native-lib LIB_SM90 --out DIR

1. correctness of both libraries (compute_75 PTX through the driver JIT = the Turing instruction set, and native
   SASS) against fp32/fp64 torch references (kernels_checks.py); a kernel that fails is not timed;
2. timings: our attention vs torch SDPA math / efficient / flash and an mmfa-style Triton kernel; our int8 GEMM
   and W8A8 linear vs torch._int_mm and torch.matmul fp16; mma.sync m16n8k8 / m8n8k16 ceilings;
3. the issue's target ratios; writes kernels_results.json and kernels_results.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_checks import run_all  # noqa: E402

from vlmx.plugins import cuda_ops  # noqa: E402


def bench(fn, min_time=0.2, warmup=3, max_samples=100) -> float:
    """Median milliseconds per fn() call, CUDA-event timed over back-to-back batches of calls.

    Each sample times ``reps`` consecutive calls (reps chosen so a sample lasts >= ~2 ms): the host enqueues ahead
    of the GPU, so Python launch overhead (ctypes marshalling, Triton's launcher) is hidden as it would be in a
    real pipeline instead of being counted as GPU idle time.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    reps = max(1, min(200, int(2.0 / max(s.elapsed_time(e), 1e-3))))
    times, total = [], 0.0
    while (total < min_time * 1e3 or len(times) < 5) and len(times) < max_samples:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / reps)
        total += times[-1] * reps
    times.sort()
    return times[len(times) // 2]


def attn_flops(b, h, sq, sk, d, causal=False):
    f = 4.0 * b * h * sq * sk * d
    return f / 2 if causal and sq == sk else f


ATTN_BENCH = [  # name, B, H, Hkv, Sq, Sk, D, causal
    ("vit_l336_b8", 8, 16, 16, 577, 577, 64, False),
    ("siglip_b8", 8, 16, 16, 729, 729, 72, False),
    ("s2048_d128", 4, 32, 32, 2048, 2048, 128, False),
    ("s4096_d64", 2, 16, 16, 4096, 4096, 64, False),
    ("prefill_causal_gqa8", 2, 32, 8, 2048, 2048, 128, True),
    ("decode_gqa8_kv4096", 8, 32, 8, 1, 4096, 128, True),
]


def time_attention(libs: dict, ok_libs: set, log) -> list[dict]:
    from kernels_triton_fa import triton_flash_attention

    rows = []
    for name, b, h, hkv, sq, sk, d, causal in ATTN_BENCH:
        q = torch.randn(b, sq, h * d, device="cuda").half()
        k = torch.randn(b, sk, hkv * d, device="cuda").half()
        v = torch.randn(b, sk, hkv * d, device="cuda").half()
        qh, kh, vh = (t.view(b, -1, n, d).transpose(1, 2).contiguous() for t, n in ((q, h), (k, hkv), (v, hkv)))
        flops = attn_flops(b, h, sq, sk, d, causal)
        row = {"bench": f"attention/{name}", "shape": f"B{b} H{h}/{hkv} Sq{sq} Sk{sk} D{d}{' causal' if causal else ''}",
               "gflop": flops / 1e9, "ms": {}}
        for label, lib in libs.items():
            if label not in ok_libs:
                continue
            # "" = the launcher's own choice of warps per CTA; 4 / 8 pinned through VLMX_FA_WARPS for comparison
            for warps in ("", "4", "8") if label.startswith("ptx75") else ("",):
                os.environ["VLMX_FA_WARPS"] = warps
                key = f"vlmx_{label}" + (f"_w{warps}" if warps else "")
                row["ms"][key] = bench(lambda: cuda_ops.flash_attention(
                    lib, q, k, v, None, num_heads=h, num_kv_heads=hkv, head_dim=d, causal=int(causal)))
            os.environ.pop("VLMX_FA_WARPS", None)
        kr, vr = kh, vh
        if hkv != h:  # SDPA backends here want equal heads (enable_gqa is not accepted by every backend)
            kr, vr = kh.repeat_interleave(h // hkv, 1), vh.repeat_interleave(h // hkv, 1)
        mask_kw = {"is_causal": causal and sq == sk}
        for label, backend in (("sdpa_math", SDPBackend.MATH), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                               ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            if label == "sdpa_math" and b * h * sq * sk > 2**31:
                continue
            try:
                with sdpa_kernel(backend):
                    row["ms"][label] = bench(lambda: F.scaled_dot_product_attention(qh, kr, vr, **mask_kw))
            except RuntimeError as err:
                row.setdefault("skipped", {})[label] = str(err).splitlines()[0][:120]
        try:
            row["ms"]["triton_mmfa"] = bench(lambda: triton_flash_attention(qh, kh, vh, causal=causal))
        except Exception as err:  # noqa: BLE001 - report any Triton compile failure and go on
            row.setdefault("skipped", {})["triton_mmfa"] = f"{type(err).__name__}: {str(err)[:160]}"
        row["tflops"] = {k2: flops / (ms * 1e-3) / 1e12 for k2, ms in row["ms"].items()}
        bytes_kv = 2 * b * hkv * sk * d * 2
        row["kv_gbps"] = {k2: bytes_kv / (ms * 1e-3) / 1e9 for k2, ms in row["ms"].items()}
        log(f"{row['bench']:<34} " + " ".join(f"{k2}={ms:.3f}ms({row['tflops'][k2]:.0f}TF)" for k2, ms in
                                               row["ms"].items()))
        rows.append(row)
    return rows


def time_gemm(libs: dict, ok_libs: set, log) -> list[dict]:
    rows = []
    # Square, ViT-L and SigLIP MLP shapes, then the LLaVA-7B language model's linears (q/o 4096x4096, gate/up
    # 11008x4096, down 4096x11008) at decode (M = 1, 16: weight-read bound, reported as weight GB/s) and at a
    # ~600-token prefill.
    for m, n, k in ((4096, 4096, 4096), (8 * 577, 4096, 1024), (8 * 729, 4304, 1152),
                    (1, 4096, 4096), (1, 11008, 4096), (1, 4096, 11008), (16, 11008, 4096), (16, 4096, 11008),
                    (600, 4096, 4096), (600, 11008, 4096), (600, 4096, 11008)):
        x = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        xs, ws = torch.rand(m, 1, device="cuda"), torch.rand(n, device="cuda")
        bias = torch.randn(n, device="cuda").half()
        a16, b16 = torch.randn(m, k, device="cuda").half(), torch.randn(k, n, device="cuda").half()
        row = {"bench": f"gemm/{m}x{n}x{k}", "shape": f"M{m} N{n} K{k}", "gop": 2.0 * m * n * k / 1e9, "ms": {}}
        for label, lib in libs.items():
            if label in ok_libs:
                row["ms"][f"vlmx_int8_{label}"] = bench(lambda: cuda_ops.int8_gemm(lib, x, w))
                row["ms"][f"vlmx_w8a8_{label}"] = bench(lambda: cuda_ops.w8a8_linear_fused(lib, x, xs, w, ws, bias))
                row["ms"][f"vlmx_w8a8_quant_{label}"] = bench(
                    lambda: cuda_ops.w8a8_linear_fused(lib, x, xs, w, ws, bias, quantize_output=True))
        # w.t() is column-major: torch._int_mm's cuBLASLt fast path (it refuses M <= 16)
        if m > 16:
            row["ms"]["torch_int_mm"] = bench(lambda: torch._int_mm(x, w.t()))
        row["ms"]["torch_matmul_fp16"] = bench(lambda: a16 @ b16)
        row["tops"] = {k2: 2.0 * m * n * k / (ms * 1e-3) / 1e12 for k2, ms in row["ms"].items()}
        # Weight bytes read per call (int8 for ours and _int_mm, fp16 for torch.matmul) over the time: the decode
        # ceiling is the copy bandwidth.
        row["weight_gbs"] = {k2: n * k * (2 if k2 == "torch_matmul_fp16" else 1) / (ms * 1e-3) / 1e9
                             for k2, ms in row["ms"].items()}
        log(f"{row['bench']:<34} " + " ".join(f"{k2}={ms:.3f}ms({row['tops'][k2]:.0f}T)" for k2, ms in
                                               row["ms"].items()))
        rows.append(row)
    return rows


def time_copy_bandwidth(log) -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus bytes written (the memory traffic a weight-read
    bound GEMV can reach at best; the same convention as the Triton tables and scripts/bench_decode.py)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), min_time=0.2)
    gbs = 2 * src.numel() / (ms * 1e-3) / 1e9
    log(f"copy bandwidth: {gbs:.0f} GB/s")
    return gbs


def time_ceilings(libs: dict, log) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.empty(1024, device="cuda", dtype=torch.float32)
    out = {}
    for label, lib in libs.items():
        for kind, name in ((0, "mma_m16n8k8_f16"), (1, "mma_m8n8k16_s8")):
            best = 0.0
            for warps in (4, 8):
                holder = {}
                ms = bench(lambda: holder.update(ops=lib.mma_ceiling(kind, sms * 4, warps * 32, 4096, sink)),
                           min_time=0.1)
                best = max(best, holder["ops"] / (ms * 1e-3) / 1e12)
            out[f"{name}_{label}"] = best
            log(f"ceiling {name} [{label}]: {best:.1f} T(FL)OP/s")
    return out


def target_ratios(attn: list[dict], gemm: list[dict], ceil: dict) -> list[dict]:
    by = {r["bench"]: r for r in attn + gemm}
    res = []

    def add(name, value, goal, note=""):
        res.append({"target": name, "value": value, "goal": goal, "met": value is not None and value >= goal,
                    "note": note})

    vit = by.get("attention/vit_l336_b8")
    ours = vit["ms"].get("vlmx_ptx75") if vit else None
    if ours:
        add("attention B8 S577 D64: SDPA math / vlmx(ptx75)", vit["ms"].get("sdpa_math", 0) / ours, 3.0)
        best = min(vit["ms"][k] for k in ("sdpa_math", "sdpa_efficient", "sdpa_flash") if k in vit["ms"])
        add("attention B8 S577 D64: best SDPA / vlmx(ptx75)", best / ours, 0.5, "aim >= 1.0")
        variant = min((ms, k) for k, ms in vit["ms"].items() if k.startswith("vlmx_ptx75"))
        add(f"attention B8 S577 D64: best SDPA / best compute_75 variant ({variant[1]})", best / variant[0], 0.5)
    for key in ("attention/s2048_d128", "attention/s4096_d64", "attention/prefill_causal_gqa8"):
        r = by.get(key)
        if r and "vlmx_ptx75" in r["tflops"]:
            add(f"{key} (S>=2048): vlmx(ptx75) / m16n8k8 ceiling(ptx75)",
                r["tflops"]["vlmx_ptx75"] / ceil["mma_m16n8k8_f16_ptx75"], 0.6)
    g = by.get("gemm/4096x4096x4096")
    if g and "vlmx_int8_ptx75" in g["tops"]:
        add("W8A8 4096^3: vlmx int8(ptx75) / m8n8k16 ceiling(ptx75)",
            g["tops"]["vlmx_int8_ptx75"] / ceil["mma_m8n8k16_s8_ptx75"], 0.7)
        add("W8A8 4096^3: vlmx w8a8 fp16 out(ptx75) / m8n8k16 ceiling(ptx75)",
            g["tops"]["vlmx_w8a8_ptx75"] / ceil["mma_m8n8k16_s8_ptx75"], 0.7)
    return res


def markdown(report: dict) -> str:
    lines = [f"# vlmx CUDA kernels on {report['device']}", "", f"Command: `{report['command']}`", "",
             f"torch {report['torch']}, triton {report['triton']}, {report['when']}", "", "## Correctness", "",
             "| lib | check | shape | error | ok |", "|---|---|---|---|---|"]
    for r in report["checks"]:
        e = f"rel {r['rel_err']:.2e} (tol {r['tol']:.0e})" if "rel_err" in r else f"{r['mismatches']} mismatches"
        lines.append(f"| {r['lib']} | {r['check']} | {r['shape']} | {e} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Attention (ms, TFLOP/s)", ""]
    for r in report["attention"]:
        lines.append(f"- **{r['bench']}** {r['shape']}: " + ", ".join(
            f"{k}: {ms:.3f} ms / {r['tflops'][k]:.1f} TF" for k, ms in r["ms"].items()))
    lines += ["", "## GEMM (ms, TOP/s)", ""]
    copy = report.get("copy_gbs")
    for r in report["gemm"]:
        lines.append(f"- **{r['bench']}**: " + ", ".join(f"{k}: {ms:.3f} ms / {r['tops'][k]:.1f} T"
                                                          for k, ms in r["ms"].items()))
        if copy and r["bench"].split("/")[1].split("x")[0] in ("1", "16"):
            lines.append("  - weight read (decode bound), share of copy bandwidth: " + ", ".join(
                f"{k}: {g:.0f} GB/s = {g / copy:.0%}" for k, g in r["weight_gbs"].items()))
    if copy:
        lines += ["", f"Device-to-device copy bandwidth (1 GiB, read + write bytes): {copy:.0f} GB/s"]
    lines += ["", "## mma.sync ceilings (T(FL)OP/s)", ""] + [f"- {k}: {v:.1f}" for k, v in report["ceilings"].items()]
    lines += ["", "## Targets (compute_75 PTX path)", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ptx-lib", required=True)
    ap.add_argument("--native-lib", required=True)
    ap.add_argument("--variant-lib", action="append", default=[], metavar="LABEL=PATH",
                    help="extra build (e.g. other tuning macros): attention checked and timed too")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    libs = {"ptx75": cuda_ops.KernelLibrary(args.ptx_lib), "native": cuda_ops.KernelLibrary(args.native_lib)}
    variants = {}
    for spec in args.variant_lib:
        label, path = spec.split("=", 1)
        variants[label] = cuda_ops.KernelLibrary(path)
    import triton
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
              "command": os.environ.get("VLMX_BENCH_COMMAND", " ".join(sys.argv)), "libs": {k: str(v.path) for k, v in
                                                                                           {**libs, **variants}.items()}}
    checks = []
    for label, lib in libs.items():
        # the launcher's choice of warps per CTA, then 4 and 8 pinned, so both kernel variants are checked
        for warps in ("", "4", "8"):
            os.environ["VLMX_FA_WARPS"] = warps
            checks += run_all(lib, label + (f"/w{warps}" if warps else ""), log, gemm=not warps)
    os.environ.pop("VLMX_FA_WARPS", None)
    for label, lib in variants.items():
        checks += run_all(lib, label, log, gemm=False)
    report["checks"] = checks
    # A kernel family (attention / gemm) of a library is timed only if all its checks pass.
    family = (lambda check: "attention" if check.startswith("attention/") else "gemm")
    ok = {(label, fam) for label in [*libs, *variants] for fam in ("attention", "gemm")
          if all(r["ok"] for r in checks if r["lib"].split("/")[0] == label and family(r["check"]) == fam)}
    log(f"passing every check (lib, kernels): {sorted(ok)}")
    report["attention"], report["gemm"], report["ceilings"], report["targets"] = [], [], {}, []
    if not args.skip_timing:
        report["ceilings"] = time_ceilings(libs, log)
        report["copy_gbs"] = time_copy_bandwidth(log)
        report["attention"] = time_attention({**libs, **variants}, {lb for lb, f in ok if f == "attention"}, log)
        report["gemm"] = time_gemm(libs, {lb for lb, f in ok if f == "gemm"}, log)
        report["targets"] = target_ratios(report["attention"], report["gemm"], report["ceilings"])
        for t in report["targets"]:
            log(f"target {t['target']}: {t['value']:.2f} (goal {t['goal']}) {'met' if t['met'] else 'MISSED'}")
    (out / "kernels_results.json").write_text(json.dumps(report, indent=1))
    (out / "kernels_results.md").write_text(markdown(report))
    return 0 if len(ok) == 2 * (len(libs) + len(variants)) else 1


if __name__ == "__main__":
    sys.exit(main())

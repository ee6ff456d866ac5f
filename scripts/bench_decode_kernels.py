"""Check and time the decode kernels (issues 11 + 14) on the GPU at hand: FlashAttention over a fixed-size KV cache
with ``kv_len``, and the W8A8 decode GEMM (M <= 16), from compute_75 PTX (driver JIT = the Turing instruction set)
and from native SASS, in one process (scripts/device_decode_kernels.sh calls it).

  python scripts/bench_decode_kernels.py --ptx-lib LIB_PTX75 --native-lib LIB_SM90 --out DIR [--checks-only]

Checks (every one: fresh random inputs, outputs pre-filled with NaN / a sentinel so an unwritten element fails):
- attention: rel err vs a float64 reference that reads only the first kv_len[b] cache slots; the slots past kv_len
  hold NaN (a kernel that reads them returns NaN); kv_len changed between CUDA-graph replays of one capture.
- W8A8: the int32 accumulation vs an exact reference (float64 products of int8 are exact integers, i.e. the int64
  result) for both algorithms; fp16 output vs float64 dequantization; decode and tiled paths bit-identical.
Timings: decode attention at context 600 / 2000 on an S_max 2304 cache (LLaVA-7B: 32 heads, D 128) vs SDPA (each
backend on the sliced prefix, and the masked full cache); W8A8 GEMM at M 1/4/16 on LLaVA-7B LM shapes vs cuBLAS fp16
(torch.matmul) and vs copy bandwidth, weights rotated through copies larger than L2 so they come from HBM.
Writes decode_kernels.json and decode_kernels.md under --out.
"""
from __future__ import annotations

import argparse
import functools
import itertools
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
from bench_kernels import bench, time_copy_bandwidth  # noqa: E402
from kernels_checks import rel_err  # noqa: E402

from vlmx.plugins import cuda_ops  # noqa: E402

ATTN_TOL, W8A8_TOL = 2e-3, 1e-3
S_MAX, HEADS, HEAD_DIM = 2304, 32, 128  # LLaVA-1.5-7B's LM (MHA) on an S_max 2304 cache
CONTEXTS = (600, 2000)
LM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32064, 4096)]  # (N, K): q/o, gate/up, down, lm_head
DECODE_M = (1, 4, 16)
# (name, B, H, Hkv, S_max, D, kv_len per row, causal, alibi, window, padding bias)
ATTN_CHECKS = [
    ("llava7b_decode", 2, 32, 32, 2304, 128, [600, 2000], 1, 0, -1, True),
    ("gqa8_decode_edges", 4, 32, 8, 2304, 128, [1, 64, 2303, 2304], 1, 0, -1, False),
    ("mqa_d80_decode", 2, 16, 1, 1000, 80, [17, 999], 1, 0, -1, False),
    ("mpt_alibi_decode", 2, 32, 32, 1024, 128, [300, 1024], 1, 1, -1, False),
    ("window_decode_d64", 2, 8, 8, 2048, 64, [100, 1500], 1, 0, 256, False),
    ("empty_row_d96", 2, 8, 4, 512, 96, [0, 333], 1, 0, -1, False),
]
# Sq > 1 over the cache (a prefill chunk written at kv_len - Sq): (name, B, Sq, H, Hkv, S_max, D, lens)
CHUNK_CHECKS = [("prefill_chunk_gqa", 2, 100, 32, 8, 768, 128, [150, 700]),
                ("prefill_chunk_d72", 1, 65, 16, 16, 300, 72, [300])]
GEMM_CHECKS = [(m, n, k) for m in (1, 2, 7, 8, 9, 15, 16) for n, k in ((130, 272), (1000, 16), (4096, 4096))] + \
    [(1, n, k) for n, k in LM_SHAPES] + [(16, 11008, 4096), (17, 4096, 4096)]


# ------------------------------------------------------------------------------------------------ attention
def attention_fp64(q, k, v, kv_len, bias, causal, alibi, window, scale):
    """float64 reference over the first kv_len[b] slots only (q [B,H,Sq,D], caches [B,Hkv,S_max,D])."""
    from vlmx.torch_ref.alibi import gen_slopes

    b_, h, sq, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros(b_, h, sq, d, dtype=torch.float64, device=q.device)
    for b in range(b_):
        n = int(kv_len[b])
        if n == 0:
            continue
        kb = k[b:b + 1, :, :n].double().repeat_interleave(rep, 1)
        vb = v[b:b + 1, :, :n].double().repeat_interleave(rep, 1)
        s = q[b:b + 1].double() @ kb.transpose(-1, -2) * scale
        j = torch.arange(n, device=q.device).view(1, -1)
        i = (torch.arange(sq, device=q.device) + n - sq).view(-1, 1)
        if alibi:
            s = s + (j - (n - 1)).double() * gen_slopes(h, 8, device=q.device).double()
        if bias is not None:
            s = s + bias[b:b + 1, ..., :n].double()
        allowed = torch.ones(sq, n, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window >= 0:
            allowed &= j > i - window
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[b:b + 1] = p @ vb
    return out


def cache_inputs(b, sq, h, hkv, s_max, d, lens, gen, pad):
    rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda").half()  # noqa: E731
    q, kc, vc = rnd(b, h, sq, d), rnd(b, hkv, s_max, d), rnd(b, hkv, s_max, d)
    for row, n in enumerate(lens):  # slots past kv_len: poison (a kernel that reads them returns NaN)
        kc[row, :, n:], vc[row, :, n:] = float("nan"), float("nan")
    bias = None
    if pad:
        bias = torch.zeros(b, 1, 1, s_max, device="cuda", dtype=torch.float16)
        bias[-1, ..., :7] = float("-inf")  # the last row: a left-padded prompt
    return q, kc, vc, bias, torch.tensor(lens, device="cuda", dtype=torch.int64)


def run_attention(lib, q, k, v, bias, kv_len, o, **attrs):
    """The C ABI call of the torch op and the plugin (o pre-allocated by the caller), split-KV workspace included."""
    p, keep = cuda_ops.attention_params(q, k, v, o, bias, attrs["num_heads"], attrs["num_kv_heads"], q.shape[-1],
                                        attrs.get("scale", 0.0), attrs.get("causal", 0), attrs.get("window", -1),
                                        attrs.get("alibi", 0), 8, "bhsd", kv_len)
    ws_bytes = lib.flash_attention_workspace_size(p)
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device="cuda")
    p.workspace, p.workspace_bytes = ws.data_ptr(), ws_bytes
    lib.check(lib.flash_attention_raw(p, torch.cuda.current_stream().cuda_stream))
    keep.append(ws)
    return keep


def check_attention(lib, gen, small=False) -> list[dict]:
    rows = []
    cases = [(n, b, 1, h, hkv, s, d, lens, c, al, w, pad) for n, b, h, hkv, s, d, lens, c, al, w, pad in ATTN_CHECKS]
    cases += [(n, b, sq, h, hkv, s, d, lens, 1, 0, -1, False) for n, b, sq, h, hkv, s, d, lens in CHUNK_CHECKS]
    if small:  # compute-sanitizer: a few short caches
        cases = [c for c in cases if c[5] <= 1024]
    for name, b, sq, h, hkv, s_max, d, lens, causal, alibi, window, pad in cases:
        q, kc, vc, bias, kv_len = cache_inputs(b, sq, h, hkv, s_max, d, lens, gen, pad)
        o = torch.full_like(q, float("nan"))
        attrs = dict(num_heads=h, num_kv_heads=hkv, causal=causal, alibi=alibi, window=window)
        run_attention(lib, q, kc, vc, bias, kv_len, o, **attrs)
        torch.cuda.synchronize()
        want = attention_fp64(q, kc, vc, lens, bias, causal, alibi, window, d ** -0.5)
        err = rel_err(o, want)
        finite = bool(torch.isfinite(o).all())
        empty_ok = all(float(o[r].abs().max()) == 0.0 for r, n in enumerate(lens) if n == 0)
        rows.append({"check": f"attention_kv_len/{name}", "shape": f"B{b} Sq{sq} H{h}/{hkv} S_max{s_max} D{d} "
                     f"kv_len {lens}", "error": err, "tol": ATTN_TOL, "finite": finite,
                     "ok": finite and empty_ok and err <= ATTN_TOL})
    rows.append(check_graph_replay(lib, gen))
    return rows


def check_graph_replay(lib, gen) -> dict:
    """One CUDA-graph capture, replayed for three kv_len values written into the same device tensor."""
    q, kc, vc, _, kv_len = cache_inputs(1, 1, HEADS, HEADS, S_MAX, HEAD_DIM, [S_MAX], gen, False)
    o = torch.full_like(q, float("nan"))
    attrs = dict(num_heads=HEADS, num_kv_heads=HEADS, causal=1)
    kv_len.fill_(10)
    keep = run_attention(lib, q, kc, vc, None, kv_len, o, **attrs)  # warm-up outside the capture (JIT, workspace)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep += run_attention(lib, q, kc, vc, None, kv_len, o, **attrs)
    errs = []
    for n in (1, 600, 2000):
        kv_len.fill_(n)
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        errs.append(rel_err(o, attention_fp64(q, kc, vc, [n], None, 1, 0, -1, HEAD_DIM ** -0.5)))
    return {"check": "attention_kv_len/cuda_graph_replay", "shape": f"B1 H32 S_max{S_MAX} D128 kv_len 1,600,2000",
            "error": max(errs), "tol": ATTN_TOL, "ok": max(errs) <= ATTN_TOL}


# ------------------------------------------------------------------------------------------------ W8A8
def check_gemm(lib, gen, small=False) -> list[dict]:
    rows = []
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    for m, n, k in GEMM_CHECKS:
        if small and n * k > 1 << 20:
            continue
        x = torch.randint(-127, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
        xs = torch.rand(m, generator=gen, device="cuda") * 0.01 + 1e-4
        ws = torch.rand(n, generator=gen, device="cuda") * 0.01 + 1e-4
        bias = torch.randn(n, generator=gen, device="cuda").half()
        exact = (x.double() @ w.double().t()).long()  # |sum| < 2^53: float64 is the exact integer result
        want = exact.double() * xs.double().view(-1, 1) * ws.double() + bias.double()
        paths = ("tiled", "decode", "auto") if m <= cuda_ops.W8A8_DECODE_MAX_M else ("tiled", "auto")
        ys, mismatches = {}, {}
        for path in paths:
            acc = torch.full((m, n), -2**31, dtype=torch.int32, device="cuda")
            lib.check(lib.int8_gemm_raw(x.data_ptr(), w.data_ptr(), acc.data_ptr(), m, n, k, stream(), path))
            y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            lib.check(lib.w8a8_raw(x.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), bias.data_ptr(),
                                   y.data_ptr(), None, None, m, n, k, stream(), path))
            mismatches[path] = int((acc.long() != exact).sum())
            ys[path] = y
        err = rel_err(ys["auto"], want)
        same = all(torch.equal(ys[p], ys["tiled"]) for p in paths)
        finite = all(bool(torch.isfinite(y).all()) for y in ys.values())
        rows.append({"check": f"w8a8/{m}x{n}x{k}", "shape": f"M{m} N{n} K{k} paths {','.join(paths)}",
                     "error": err, "tol": W8A8_TOL, "int32_mismatches": mismatches, "paths_bit_identical": same,
                     "finite": finite, "ok": finite and same and err <= W8A8_TOL and not any(mismatches.values())})
    return rows


# ------------------------------------------------------------------------------------------------ timing
def time_calls(calls: list, log) -> tuple[float, float]:
    """(graph, stream) ms per call of ``calls`` (cycled; one per weight copy). graph: one CUDA graph replays >= 24 of
    them back to back, as a captured decode step runs them (no host launch cost); stream: launched from the host."""
    it = itertools.cycle(calls)
    stream_ms = bench(lambda: next(it)())
    seq = calls * max(1, -(-24 // len(calls)))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (JIT, cuBLAS workspaces, allocator)
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in seq:
                c()
        graph_ms = bench(graph.replay) / len(seq)
        del graph
    except RuntimeError as err:
        log(f"  CUDA-graph timing failed ({str(err).splitlines()[0][:100]}); host-launch time only")
        graph_ms = stream_ms
    return graph_ms, stream_ms


def time_attention(libs: dict, gen, log) -> list[dict]:
    rows = []
    for b in (1, 4):
        for ctx in CONTEXTS:
            q, kc, vc, _, kv_len = cache_inputs(b, 1, HEADS, HEADS, S_MAX, HEAD_DIM, [ctx] * b, gen, False)
            kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # SDPA on the masked full cache would read them
            o = torch.empty_like(q)
            calls = {f"vlmx_{label}": functools.partial(run_attention, lib, q, kc, vc, None, kv_len, o,
                                                        num_heads=HEADS, num_kv_heads=HEADS, causal=1)
                     for label, lib in libs.items()}
            kp, vp = kc[:, :, :ctx], vc[:, :, :ctx]  # the best SDPA can do: it is told the length (host-side)
            mask = (torch.arange(S_MAX, device="cuda") < ctx).view(1, 1, 1, -1)
            sdpa = [(f"sdpa_{n}_prefix", be, (q, kp, vp), {}) for n, be in (
                ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("math", SDPBackend.MATH))]
            sdpa += [(f"sdpa_{n}_masked_cache", be, (q, kc, vc), {"attn_mask": mask}) for n, be in (
                ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH))]
            sdpa.append(("sdpa_cudnn_prefix", SDPBackend.CUDNN_ATTENTION, (q, kp, vp), {}))  # last: least proven
            times, stream_times = {}, {}
            for name, call in calls.items():
                times[name], stream_times[name] = time_calls([call], log)
            for name, be, args, kw in sdpa:
                try:
                    with sdpa_kernel(be):
                        F.scaled_dot_product_attention(*args, **kw)
                        times[name], stream_times[name] = time_calls(
                            [functools.partial(F.scaled_dot_product_attention, *args, **kw)], log)
                except RuntimeError as err:
                    log(f"  {name} unavailable: {str(err).splitlines()[0][:100]}")
            kv_bytes = 2 * b * HEADS * ctx * HEAD_DIM * 2
            row = {"bench": f"decode_attention/B{b}_ctx{ctx}", "shape": f"B{b} H32/32 Sq1 kv_len {ctx} of S_max "
                   f"{S_MAX} D128", "ms": times, "ms_stream": stream_times,
                   "kv_gbs": {k: kv_bytes / (t * 1e-3) / 1e9 for k, t in times.items()}}
            log(f"{row['bench']}: " + ", ".join(f"{k} {t * 1e3:.1f} us" for k, t in times.items()))
            rows.append(row)
    return rows


def rotating(make, nbytes: int) -> list:
    """Copies of one operand whose total exceeds L2 four times over, so a rotation reads every copy from HBM."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size or (50 << 20)
    return [make() for _ in range(max(2, -(-4 * l2 // nbytes)))]


def time_gemm(libs: dict, gen, log, variants: dict | None = None) -> list[dict]:
    rows = []
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def w8a8(lib, path, x, xs, w, ws, y):
        m, k = x.shape
        lib.check(lib.w8a8_raw(x.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), None, y.data_ptr(), None,
                               None, m, w.shape[0], k, stream(), path))

    for n, k in LM_SHAPES:
        w8s = rotating(lambda: torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8), n * k)
        ws = torch.rand(n, generator=gen, device="cuda") * 0.01
        for m in DECODE_M:
            x = torch.randint(-127, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
            xs = torch.rand(m, generator=gen, device="cuda") * 0.01
            y = torch.empty(m, n, dtype=torch.float16, device="cuda")
            runs = [(f"vlmx_{path}_{label}", lib, path) for label, lib in libs.items() for path in ("decode", "tiled")]
            runs += [(f"vlmx_decode_{label}", lib, "decode") for label, lib in (variants or {}).items()]
            times, stream_times = {}, {}
            for name, lib, path in runs:
                times[name], stream_times[name] = time_calls(
                    [functools.partial(w8a8, lib, path, x, xs, w, ws, y) for w in w8s], log)
            lib = libs.get("ptx75") or next(iter(libs.values()))
            hot, _ = time_calls([functools.partial(w8a8, lib, "decode", x, xs, w8s[0], ws, y)], log)
            rows.append({"bench": f"w8a8_decode/{m}x{n}x{k}", "M": m, "N": n, "K": k, "ms": times,
                         "ms_stream": stream_times, "ms_l2_hot": {"vlmx_decode_ptx75_l2hot": hot},
                         "weight_bytes": n * k})
        del w8s
        w16s = rotating(lambda: torch.randn(n, k, generator=gen, device="cuda").half(), 2 * n * k)
        for row in rows[-len(DECODE_M):]:
            xh = torch.randn(row["M"], k, generator=gen, device="cuda").half()
            row["ms"]["cublas_fp16"], row["ms_stream"]["cublas_fp16"] = time_calls(
                [functools.partial(torch.matmul, xh, w.t()) for w in w16s], log)
            row["weight_bytes_fp16"] = 2 * n * k
            row["weight_gbs"] = {key: (row["weight_bytes_fp16"] if key == "cublas_fp16" else row["weight_bytes"])
                                 / (t * 1e-3) / 1e9 for key, t in row["ms"].items()}
            log(f"{row['bench']}: " + ", ".join(f"{key} {t * 1e3:.1f} us ({row['weight_gbs'][key]:.0f} GB/s)"
                                               for key, t in row["ms"].items()))
        del w16s
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ report
def markdown(rep: dict) -> str:
    copy = rep.get("copy_gbs")
    lines = [f"# vlmx decode kernels on {rep['device']}", "", f"Command: `{rep['command']}`", "",
             f"torch {rep['torch']}, {rep['date']}", "", "## Correctness (fresh random inputs, poisoned outputs; "
             "cache slots past kv_len = NaN)", "", "| lib | check | shape | error | ok |", "|---|---|---|---|---|"]
    for c in rep["checks"]:
        extra = f", int32 mismatches {c['int32_mismatches']}, paths identical {c['paths_bit_identical']}" \
            if "int32_mismatches" in c else ""
        lines.append(f"| {c['lib']} | {c['check']} | {c['shape']} | rel {c['error']:.2e} (tol {c['tol']:.0e}){extra} "
                     f"| {'yes' if c['ok'] else 'NO'} |")
    if rep.get("attention"):
        lines += ["", "## Decode attention over the KV cache (us per call inside a CUDA graph; KV bytes read / time)",
                  ""]
        for r in rep["attention"]:
            lines.append(f"- **{r['bench']}** {r['shape']}: " + ", ".join(
                f"{k} {t * 1e3:.1f} us ({r['kv_gbs'][k]:.0f} GB/s)" for k, t in r["ms"].items()))
    if rep.get("gemm"):
        cols = list(rep["gemm"][0]["ms"])
        lines += ["", "## W8A8 decode GEMM (us per call inside a CUDA graph; weight bytes / time, share of copy "
                  "bandwidth; weights rotated through copies 4x the L2 size; host-launched times in the JSON)", "",
                  "| M x N x K | " + " | ".join(cols) + " | L2-hot decode (ptx75) |", "|---|" + "---|" * (len(cols) + 1)]
        for r in rep["gemm"]:
            cells = [f"{t * 1e3:.1f} us, {r['weight_gbs'][k]:.0f} GB/s" + (f" = {r['weight_gbs'][k] / copy:.0%}"
                                                                          if copy else "")
                     for k, t in r["ms"].items()]
            hot = next(iter(r["ms_l2_hot"].values()))
            lines.append(f"| {r['M']}x{r['N']}x{r['K']} | " + " | ".join(cells) + f" | {hot * 1e3:.1f} us |")
    if copy:
        lines += ["", f"Device-to-device copy bandwidth (1 GiB, read + write bytes): {copy:.0f} GB/s"]
    if rep.get("targets"):
        lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
                  for t in rep["targets"]]
    return "\n".join(lines) + "\n"


def targets(rep: dict) -> list[dict]:
    out, copy = [], rep.get("copy_gbs")
    for r in rep.get("gemm", []):
        key = "vlmx_decode_ptx75" if "vlmx_decode_ptx75" in r["ms"] else next(k for k in r["ms"] if "decode" in k)
        if copy:
            v = r["weight_gbs"][key] / copy
            out.append({"target": f"W8A8 {r['M']}x{r['N']}x{r['K']} ({key}) weight read / copy BW", "value": v,
                        "goal": ">= 0.70", "met": v >= 0.7})
        v = r["ms"]["cublas_fp16"] / r["ms"][key]
        out.append({"target": f"W8A8 {r['M']}x{r['N']}x{r['K']}: cuBLAS fp16 time / {key} time", "value": v,
                    "goal": "> 1 (INT8 decode pays off)", "met": v > 1})
    for r in rep.get("attention", []):
        sdpa = [t for k, t in r["ms"].items() if k.startswith("sdpa_")]
        key = "vlmx_ptx75" if "vlmx_ptx75" in r["ms"] else next(k for k in r["ms"] if k.startswith("vlmx_"))
        if sdpa:
            v = min(sdpa) / r["ms"][key]
            out.append({"target": f"{r['bench']}: best SDPA / {key}", "value": v, "goal": ">= 1", "met": v >= 1})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ptx-lib", required=True)
    ap.add_argument("--native-lib", default=None)
    ap.add_argument("--variant-lib", action="append", default=[], metavar="NAME=LIB",
                    help="tuning build (e.g. --define VLMX_W8A8_DECODE_UNROLL=8): checked, and its decode GEMM timed")
    ap.add_argument("--out", default="out")
    ap.add_argument("--checks-only", action="store_true", help="correctness only")
    ap.add_argument("--small", action="store_true", help="small correctness cases only (under compute-sanitizer)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU: this script checks and times GPU kernels; run it on the device machine",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    libs = {"ptx75": cuda_ops.KernelLibrary(args.ptx_lib)}
    if args.native_lib:
        libs["native"] = cuda_ops.KernelLibrary(args.native_lib)
    variants = {}
    for spec in args.variant_lib:
        name, _, path = spec.partition("=")
        variants[name] = cuda_ops.KernelLibrary(path)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rep = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": os.environ.get("VLMX_BENCH_COMMAND", " ".join(sys.argv)), "checks": []}
    gen = torch.Generator(device="cuda").manual_seed(int(time.time()))  # fresh inputs every run

    def save():  # after every phase: a run cut short by its time limit still leaves what it measured
        (out / "decode_kernels.json").write_text(json.dumps(rep, indent=1))
        (out / "decode_kernels.md").write_text(markdown(rep))
    for label, lib in {**libs, **variants}.items():
        for c in check_attention(lib, gen, args.small) + check_gemm(lib, gen, args.small):
            c["lib"] = label
            rep["checks"].append(c)
            log(f"[{label}] {c['check']}: rel {c['error']:.2e} {'ok' if c['ok'] else 'FAILED'}")
    ok = all(c["ok"] for c in rep["checks"])
    save()
    if not (args.checks_only or args.small):
        rep["copy_gbs"] = time_copy_bandwidth(log)
        rep["gemm"] = time_gemm(libs, gen, log, variants)
        rep["targets"] = targets(rep)
        save()
        rep["attention"] = time_attention(libs, gen, log)
        rep["targets"] = targets(rep)
        for t in rep["targets"]:
            log(f"target {t['target']}: {t['value']:.2f} (goal {t['goal']}) {'met' if t['met'] else 'MISSED'}")
        save()
    log(f"checks {'all passed' if ok else 'FAILED'}; wrote {out / 'decode_kernels.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

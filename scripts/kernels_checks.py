"""Correctness checks of the vlmx CUDA kernels against fp32/fp64 torch references (used by bench_kernels.py).

Every check draws fresh random inputs, computes ||out - ref|| / ||ref|| (or counts exact mismatches for integer
results) and records pass/fail against a named tolerance. Shapes: ViT-L/336, SigLIP so400m, LLM prefill (causal,
GQA 8, MQA), decode against a 4096-token KV cache, odd lengths, every layout and mask option.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vlmx.plugins import cuda_ops
from vlmx.torch_ref import reference

ATTENTION_REL_TOL = 2e-3
W8A8_REL_TOL = 1e-3  # fp16 output rounding only: the int32 accumulation is exact


@dataclass
class AttnCase:
    name: str
    batch: int
    seqlen_q: int
    num_heads: int
    head_dim: int
    seqlen_k: int | None = None
    num_kv_heads: int = 0
    causal: int = 0
    window: int = -1
    alibi: int = 0
    layout: str = "bsd"
    bias: str = ""  # "", "padding" ([B,1,1,Sk] mask), "full" ([B,H,Sq,Sk] additive)
    extra: dict = field(default_factory=dict)


ATTENTION_CASES = [
    AttnCase("vit_l336", 2, 577, 16, 64),
    AttnCase("vit_l336_packed", 2, 577, 16, 64, layout="packed"),
    AttnCase("siglip_so400m", 2, 729, 16, 72),
    AttnCase("siglip_bhsd", 1, 729, 16, 72, layout="bhsd"),
    AttnCase("prefill_causal_gqa8", 1, 2048, 32, 128, num_kv_heads=8, causal=1),
    AttnCase("prefill_causal_mqa", 1, 2048, 32, 128, num_kv_heads=1, causal=1),
    AttnCase("prefill_packed_gqa8", 1, 1000, 32, 128, num_kv_heads=8, causal=1, layout="packed"),
    AttnCase("decode_gqa8", 4, 1, 32, 128, seqlen_k=4096, num_kv_heads=8, causal=1),
    AttnCase("decode_mha", 2, 1, 32, 128, seqlen_k=4096, causal=1),
    AttnCase("decode_mqa_d80", 2, 1, 32, 80, seqlen_k=4096, num_kv_heads=1),
    AttnCase("odd_s1", 3, 1, 8, 64),
    AttnCase("odd_s63_d80", 2, 63, 12, 80),
    AttnCase("odd_s1000_d96", 2, 1000, 8, 96, causal=1),
    AttnCase("mpt_alibi_causal", 2, 300, 32, 128, causal=1, alibi=1),
    AttnCase("alibi_12_heads", 1, 200, 12, 64, alibi=1),
    AttnCase("sliding_window", 2, 700, 8, 64, causal=1, window=128),
    AttnCase("window_only", 1, 333, 4, 96, window=50),
    AttnCase("key_padding_mask", 3, 577, 16, 64, bias="padding"),
    AttnCase("additive_bias", 2, 129, 8, 72, bias="full"),
    AttnCase("kv_cache_chunk_causal", 2, 100, 16, 64, seqlen_k=700, causal=1),
    AttnCase("fully_masked_rows", 1, 64, 4, 64, seqlen_k=16, causal=1),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def make_attention_inputs(c: AttnCase, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hkv = c.num_kv_heads or c.num_heads
    sk = c.seqlen_k or c.seqlen_q
    d = c.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).half()

    if c.layout == "packed":
        q = rnd(c.batch, c.seqlen_q, (c.num_heads + 2 * hkv) * d)
        k = v = None
    elif c.layout == "bhsd":
        q, k, v = rnd(c.batch, c.num_heads, c.seqlen_q, d), rnd(c.batch, hkv, sk, d), rnd(c.batch, hkv, sk, d)
    else:
        q, k, v = rnd(c.batch, c.seqlen_q, c.num_heads * d), rnd(c.batch, sk, hkv * d), rnd(c.batch, sk, hkv * d)
    bias = None
    if c.bias == "padding":  # keep the first L_b keys of batch b; the rest -inf (HF-style masks use finfo.min)
        lengths = torch.randint(1, sk + 1, (c.batch,), generator=g, device=device)
        keep = torch.arange(sk, device=device)[None, :] < lengths[:, None]
        bias = torch.zeros(c.batch, 1, 1, sk, device=device, dtype=torch.float16)
        bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
    elif c.bias == "full":
        bias = rnd(c.batch, c.num_heads, c.seqlen_q, sk)
    attrs = dict(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=d, causal=c.causal, window=c.window,
                 alibi=c.alibi, layout=c.layout)
    return (q, k, v, bias), attrs


def check_attention(lib, c: AttnCase, seed=0) -> dict:
    (q, k, v, bias), attrs = make_attention_inputs(c, seed=seed)
    out = cuda_ops.flash_attention(lib, q, k, v, bias, **attrs)
    f = (lambda t: None if t is None else t.float())
    ref = reference.flash_attention(f(q), f(k), f(v), f(bias), **attrs)
    err = rel_err(out, ref)
    finite = bool(torch.isfinite(out).all())
    return {"check": f"attention/{c.name}", "rel_err": err, "tol": ATTENTION_REL_TOL,
            "ok": finite and err <= ATTENTION_REL_TOL, "shape": _shape(c)}


def _shape(c: AttnCase) -> str:
    s = f"B{c.batch} Sq{c.seqlen_q} Sk{c.seqlen_k or c.seqlen_q} H{c.num_heads}/{c.num_kv_heads or c.num_heads} " \
        f"D{c.head_dim} {c.layout}"
    for flag in ("causal", "alibi"):
        if getattr(c, flag):
            s += f" {flag}"
    if c.window >= 0:
        s += f" window{c.window}"
    return s + (f" bias:{c.bias}" if c.bias else "")


GEMM_SHAPES = [(4096, 4096, 4096), (577, 4304, 1152), (1, 1024, 1024), (1000, 1000, 272), (2048, 11008, 4096),
               (63, 130, 16)]


def check_gemm(lib, m, n, k, seed=0) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(-127, 128, (m, k), generator=g, device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    exact = (x.double() @ w.double().t())  # |sum| < 2^53: fp64 is exact here
    y = cuda_ops.int8_gemm(lib, x, w)
    mismatches = int((y.double() != exact).sum())
    res = [{"check": f"int8_gemm_i32/{m}x{n}x{k}", "mismatches": mismatches, "ok": mismatches == 0,
            "shape": f"M{m} N{n} K{k}"}]
    xs = torch.rand(m, 1, generator=g, device="cuda") * 0.02 + 1e-3
    ws = torch.rand(n, generator=g, device="cuda") * 0.02 + 1e-3
    bias = torch.randn(n, generator=g, device="cuda").half()
    y16, yq, yqs = cuda_ops.w8a8_linear_fused(lib, x, xs, w, ws, bias, quantize_output=True)
    ref = (exact.float() * xs * ws + bias.float()).half()
    err = rel_err(y16, ref)
    res.append({"check": f"w8a8_linear/{m}x{n}x{k}", "rel_err": err, "tol": W8A8_REL_TOL,
                "ok": err <= W8A8_REL_TOL and bool(torch.isfinite(y16).all()), "shape": f"M{m} N{n} K{k} +bias"})
    # Reference on the CPU: torch's CUDA `tensor / 127` multiplies by fl(1/127) (1 ulp off true division for ~5%
    # of values); the vlmx rule, the CPU reference and the kernel all divide.
    rq, rs = reference.quantize_rows(y16.cpu())
    yq, yqs = yq.cpu(), yqs.cpu()
    qmis = int((yq != rq).sum())
    serr = (yqs - rs).abs().max().item()
    res.append({"check": f"w8a8_linear_quant_out/{m}x{n}x{k}", "mismatches": qmis, "scale_max_abs_diff": serr,
                "ok": qmis == 0 and serr == 0.0, "shape": f"M{m} N{n} K{k} fused per-token int8"})
    return res


def run_all(lib, label: str, log=print, gemm: bool = True) -> list[dict]:
    results = []
    for i, c in enumerate(ATTENTION_CASES):
        t0 = time.monotonic()
        r = check_attention(lib, c, seed=100 + i)
        r["lib"] = label
        results.append(r)
        log(f"[{label}] {r['check']:<40} {r['shape']:<52} rel_err={r['rel_err']:.2e} "
            f"{'OK' if r['ok'] else 'FAIL'} ({time.monotonic() - t0:.1f}s)")
    for i, (m, n, k) in enumerate(GEMM_SHAPES if gemm else []):
        for r in check_gemm(lib, m, n, k, seed=200 + i):
            r["lib"] = label
            results.append(r)
            detail = f"rel_err={r['rel_err']:.2e}" if "rel_err" in r else f"mismatches={r['mismatches']}"
            log(f"[{label}] {r['check']:<40} {r['shape']:<52} {detail} {'OK' if r['ok'] else 'FAIL'}")
    return results

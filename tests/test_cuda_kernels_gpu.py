"""GPU tests of the vlmx CUDA kernels through the registered torch ops (skipped with a reason without a GPU).

The library is $VLMX_KERNELS_LIB when set (device_kernels.sh points it at the compute_75 PTX-only build so the
Turing instruction set runs through the driver JIT), else a build for the current GPU's target.
"""
import shutil

import pytest
import torch

from vlmx.torch_ref import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

ATTENTION_TOL = 2e-3
W8A8_TOL = 1e-3


def assert_close(out, ref, tol, what):
    """Relative error ||out - ref|| / ||ref|| in float64, reported and checked against a named tolerance."""
    err = (out.double() - ref.double()).norm().item() / max(ref.double().norm().item(), 1e-30)
    print(f"{what}: rel_err={err:.3e} (tol {tol:.0e})")
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert err <= tol, f"{what}: rel_err {err:.3e} > {tol:.0e}"


@pytest.fixture(scope="module")
def lib():
    import os

    if not os.environ.get("VLMX_KERNELS_LIB") and shutil.which("nvcc") is None:
        pytest.skip("needs nvcc (or VLMX_KERNELS_LIB) to build the kernel library")
    from vlmx.plugins import cuda_ops

    return cuda_ops.register()


# name: (B, Sq, Sk, H, Hkv, D, causal, window, alibi, layout, bias)
SHAPES = {
    "vit_l336": (2, 577, 577, 16, 16, 64, 0, -1, 0, "bsd", None),
    "siglip": (1, 729, 729, 16, 16, 72, 0, -1, 0, "bsd", None),
    "prefill_gqa8_causal": (1, 1024, 1024, 32, 8, 128, 1, -1, 0, "bsd", None),
    "prefill_mqa_packed": (1, 300, 300, 8, 1, 128, 1, -1, 0, "packed", None),
    "decode_kv4096_gqa": (2, 1, 4096, 32, 8, 128, 1, -1, 0, "bsd", None),
    "decode_kv4096_mha_d80": (1, 1, 4096, 8, 8, 80, 0, -1, 0, "bsd", None),
    "odd_s1": (2, 1, 1, 4, 4, 96, 0, -1, 0, "bsd", None),
    "odd_s63": (2, 63, 63, 4, 4, 80, 1, -1, 0, "bhsd", None),
    "odd_s1000_window": (1, 1000, 1000, 4, 2, 64, 1, 100, 0, "bsd", None),
    "alibi_mpt": (1, 200, 200, 12, 12, 128, 1, -1, 1, "bsd", None),
    "padding_mask": (2, 577, 577, 4, 4, 64, 0, -1, 0, "bsd", "padding"),
    "additive_bias": (1, 77, 150, 4, 4, 72, 0, -1, 0, "bsd", "full"),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_flash_attention_matches_fp32_reference(lib, name):
    b, sq, sk, h, hkv, d, causal, window, alibi, layout, bias_kind = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(hash(name) % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").half()  # noqa: E731
    if layout == "packed":
        q, k, v = rnd(b, sq, (h + 2 * hkv) * d), None, None
    elif layout == "bhsd":
        q, k, v = rnd(b, h, sq, d), rnd(b, hkv, sk, d), rnd(b, hkv, sk, d)
    else:
        q, k, v = rnd(b, sq, h * d), rnd(b, sk, hkv * d), rnd(b, sk, hkv * d)
    bias = None
    if bias_kind == "padding":
        bias = torch.zeros(b, 1, 1, sk, device="cuda", dtype=torch.float16)
        bias[0, ..., sk // 3:] = float("-inf")
    elif bias_kind == "full":
        bias = rnd(b, h, sq, sk)
    attrs = dict(num_heads=h, num_kv_heads=hkv, head_dim=d, causal=causal, window=window, alibi=alibi, layout=layout)
    out = torch.ops.vlmx.flash_attention(q, k, v, bias, **attrs)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    ref = reference.flash_attention(f(q), f(k), f(v), f(bias), **attrs)
    assert_close(out, ref, ATTENTION_TOL, f"flash_attention/{name}")


def test_fully_masked_rows_are_zero(lib):
    q = torch.randn(1, 32, 2 * 64, device="cuda").half()
    k = torch.randn(1, 8, 2 * 64, device="cuda").half()
    out = torch.ops.vlmx.flash_attention(q, k, k.clone(), None, num_heads=2, head_dim=64, causal=1)
    # bottom-right causal: query i sees keys j <= i - 24, so the first 24 queries see nothing
    assert out[:, :24].abs().max().item() == 0.0
    assert out[:, 24:].abs().max().item() > 0.0


@pytest.mark.parametrize("m,n,k", [(4096, 1024, 1024), (577, 4304, 1152), (1, 64, 16), (1000, 130, 272)])
def test_w8a8_linear_exact_accumulation_and_scaling(lib, m, n, k):
    from vlmx.plugins import cuda_ops

    x = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    acc = cuda_ops.int8_gemm(lib, x, w)
    exact = x.double() @ w.double().t()
    assert int((acc.double() != exact).sum()) == 0, "int32 accumulation is not exact"
    xs, ws = torch.rand(m, 1, device="cuda") * 0.01 + 1e-4, torch.rand(n, device="cuda") * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda").half()
    y = torch.ops.vlmx.w8a8_linear(x, xs, w, ws, bias)
    ref = (exact.float() * xs * ws + bias.float()).half()
    assert_close(y, ref, W8A8_TOL, f"w8a8_linear/{m}x{n}x{k}")
    y2, yq, yqs = cuda_ops.w8a8_linear_fused(lib, x, xs, w, ws, bias, quantize_output=True)
    # CPU reference: CUDA torch computes `tensor / 127` as a multiply by fl(1/127); the vlmx rule divides.
    rq, rs = reference.quantize_rows(y2.cpu())
    assert torch.equal(yq.cpu(), rq) and torch.equal(yqs.cpu(), rs), "fused per-token quantization differs"


def test_errors_raise_with_the_kernel_message(lib):
    from vlmx.plugins import cuda_ops

    x = torch.zeros(4, 24, device="cuda", dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cuda_ops.int8_gemm(lib, x, x)


# ------------------------------------------------------------------------------------------------ KV cache (kv_len)
# name: (B, Sq, H, Hkv, S_max, D, kv_len per row, causal, alibi, window, padding bias)
KV_CASES = {
    "llava7b_decode": (2, 1, 32, 32, 2304, 128, [600, 2000], 1, 0, -1, True),
    "gqa8_decode_edges": (4, 1, 32, 8, 2304, 128, [1, 64, 2303, 2304], 1, 0, -1, False),
    "mqa_d80": (2, 1, 16, 1, 1000, 80, [17, 999], 1, 0, -1, False),
    "alibi_mpt": (2, 1, 32, 32, 1024, 128, [300, 1024], 1, 1, -1, False),
    "window_d64": (2, 1, 8, 8, 2048, 64, [100, 1500], 1, 0, 256, False),
    "empty_row_d96": (2, 1, 8, 4, 512, 96, [0, 333], 1, 0, -1, False),
    "prefill_chunk_gqa": (2, 100, 32, 8, 768, 128, [150, 700], 1, 0, -1, False),
    "prefill_chunk_d72_full": (1, 65, 16, 16, 300, 72, [300], 1, 0, -1, True),
}


def _kv_inputs(b, sq, h, hkv, s_max, d, lens, pad, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").half()  # noqa: E731
    q, kc, vc = rnd(b, h, sq, d), rnd(b, hkv, s_max, d), rnd(b, hkv, s_max, d)
    for row, n in enumerate(lens):  # unused cache slots: NaN, so any read of them shows in the output
        kc[row, :, n:], vc[row, :, n:] = float("nan"), float("nan")
    bias = None
    if pad:
        bias = torch.zeros(b, 1, 1, s_max, device="cuda", dtype=torch.float16)
        bias[-1, ..., :5] = float("-inf")
    return q, kc, vc, bias, torch.tensor(lens, device="cuda", dtype=torch.int64)


def _kv_reference(q, kc, vc, bias, kv_len, attrs):
    """fp32 reference on the cache with the unused slots zeroed (the reference multiplies the whole cache)."""
    keep = torch.arange(kc.shape[2], device="cuda").view(1, 1, -1, 1) < kv_len.view(-1, 1, 1, 1)
    k, v = kc.float().where(keep, 0.0), vc.float().where(keep, 0.0)
    return reference.flash_attention(q.float(), k, v, None if bias is None else bias.float(), kv_len, **attrs)


@pytest.mark.parametrize("name", list(KV_CASES))
def test_flash_attention_kv_len_reads_only_the_valid_prefix(lib, name):
    """The torch op with kv_len runs the CUDA kernel (no reference fallback: the NaN past kv_len would poison it)."""
    b, sq, h, hkv, s_max, d, lens, causal, alibi, window, pad = KV_CASES[name]
    q, kc, vc, bias, kv_len = _kv_inputs(b, sq, h, hkv, s_max, d, lens, pad, hash(name) % 2**31)
    attrs = dict(num_heads=h, num_kv_heads=hkv, head_dim=d, causal=causal, window=window, alibi=alibi, layout="bhsd")
    out = torch.ops.vlmx.flash_attention(q, kc, vc, bias, kv_len, **attrs)
    assert_close(out, _kv_reference(q, kc, vc, bias, kv_len, attrs), ATTENTION_TOL, f"flash_attention_kv_len/{name}")
    for row, n in enumerate(lens):
        if n == 0:
            assert out[row].abs().max().item() == 0.0, "a row with kv_len 0 attends to nothing: zeros"


def test_flash_attention_kv_len_is_read_on_the_device_in_a_cuda_graph(lib):
    """One capture serves every decode step: kv_len changes in place between replays, no host sync, no re-capture."""
    q, kc, vc, _, kv_len = _kv_inputs(1, 1, 32, 32, 2304, 128, [2304], False, 7)
    attrs = dict(num_heads=32, num_kv_heads=32, head_dim=128, causal=1, layout="bhsd")
    kv_len.fill_(16)
    torch.ops.vlmx.flash_attention(q, kc, vc, None, kv_len, **attrs)  # JIT + allocator warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.vlmx.flash_attention(q, kc, vc, None, kv_len, **attrs)
    for n in (1, 600, 2000):
        kv_len.fill_(n)
        graph.replay()
        assert_close(out, _kv_reference(q, kc, vc, None, kv_len, attrs), ATTENTION_TOL, f"graph replay kv_len {n}")


# ------------------------------------------------------------------------------------------------ W8A8 decode GEMM
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 15, 16])
@pytest.mark.parametrize("n,k", [(130, 272), (1000, 16), (4096, 11008), (32064, 4096)])
def test_w8a8_decode_gemm_is_exact_and_matches_the_tiled_path(lib, m, n, k):
    """M <= 16 takes the decode GEMM: int32 equal to the exact (int64) product, fp16 output bit-identical to the
    tiled GEMM and within rounding of the float64 dequantization; outputs pre-filled so a skipped element fails."""
    from vlmx.plugins import cuda_ops

    g = torch.Generator(device="cuda").manual_seed(m * 100003 + n * 7 + k)
    x = torch.randint(-127, 128, (m, k), generator=g, device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    xs = torch.rand(m, generator=g, device="cuda") * 0.01 + 1e-4
    ws = torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-4
    bias = torch.randn(n, generator=g, device="cuda").half()
    exact = (x.double() @ w.double().t()).long()  # |sum| < 2^53: exact integers
    stream = torch.cuda.current_stream().cuda_stream
    ys = {}
    for path in ("decode", "tiled", "auto"):
        acc = torch.full((m, n), -2**31, dtype=torch.int32, device="cuda")
        lib.check(lib.int8_gemm_raw(x.data_ptr(), w.data_ptr(), acc.data_ptr(), m, n, k, stream, path))
        assert int((acc.long() != exact).sum()) == 0, f"{path}: int32 accumulation is not exact"
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        lib.check(lib.w8a8_raw(x.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), bias.data_ptr(), y.data_ptr(),
                               None, None, m, n, k, stream, path))
        ys[path] = y
    assert torch.equal(ys["decode"], ys["tiled"]) and torch.equal(ys["auto"], ys["decode"])
    want = exact.double() * xs.double().view(-1, 1) * ws.double() + bias.double()
    assert_close(ys["auto"], want, W8A8_TOL, f"w8a8_decode/{m}x{n}x{k}")
    _, yq, yqs = cuda_ops.w8a8_linear_fused(lib, x, xs.view(-1, 1), w, ws, bias, quantize_output=True)
    rq, rs = reference.quantize_rows(ys["decode"].cpu())
    assert torch.equal(yq.cpu(), rq) and torch.equal(yqs.cpu(), rs), "decode path: fused per-token quantization"

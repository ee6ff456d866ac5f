"""GPU checks of the precompiled Triton kernels behind torch.ops.vlmx.* (sm_75 PTX through the driver JIT and the
device's native cubins), against the torch reference. Skipped with a reason without a GPU, Triton or cuda-bindings.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the Triton cubins cannot be launched"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (AOT compiler)"),
    pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-bindings is not installed (loader)"),
]

SCALE_REL_TOL = 1e-6
IMPORTANCE_REL_TOL = 1e-5


@pytest.fixture(scope="module", params=["sm75-ptx", "native-cubin"])
def vlmx_ops(request, tmp_path_factory):
    from vlmx.plugins import triton_aot, triton_ops
    from vlmx.torch_ref import ops  # noqa: F401

    major, minor = torch.cuda.get_device_capability()
    sm = 75 if request.param == "sm75-ptx" else 10 * major + minor
    d = tmp_path_factory.mktemp(f"triton_sm{sm}")
    triton_aot.compile_all(sm, d)
    triton_ops.register(d, "ptx" if request.param == "sm75-ptx" else "cubin")
    return torch.ops.vlmx


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def assert_quant_close(out, ref, exact: bool, name: str):
    """int8 exact (or off by one in max(2, 1e-3 n) elements where fp32 math differs in the last ulp), scales to
    SCALE_REL_TOL, and sum (when present) equal to sum(q * scale) of our own outputs."""
    out = [t.cpu() for t in out]
    d = (out[0].int() - ref[0].int()).abs()
    frac = float((d > 0).float().mean())
    allowed = 0 if exact else max(2, int(1e-3 * d.numel()))
    srel = float(((out[1] - ref[1]).abs() / ref[1].abs()).max())
    print(f"{name}: q max diff {int(d.max())}, mismatch frac {frac:.2e}, scale max rel {srel:.2e}")
    assert srel <= SCALE_REL_TOL, f"{name}: scale rel err {srel} > {SCALE_REL_TOL}"
    assert int(d.max()) <= (0 if exact else 1) and int((d > 0).sum()) <= allowed, f"{name}: int8 mismatch"
    if len(out) > 2:
        terms = out[0].double() * out[1].double()
        err = ((out[2].double() - terms.sum(-1, keepdim=True)).abs() / terms.abs().sum(-1, keepdim=True)).max()
        assert float(err) <= 1e-5, f"{name}: sum differs from sum(q * scale) by {float(err):.2e} (relative)"


ROWS = [(577, 1024), (729, 1152), (300, 1000), (16, 11008), (4, 20)]


@pytest.mark.parametrize("rows,c", ROWS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_and_gelu(vlmx_ops, rows, c, dtype):
    from vlmx.torch_ref import reference as R

    x = (torch.randn(rows, c, device="cuda") * 3).to(dtype)
    assert_quant_close(vlmx_ops.quantize_per_token(x), R.quantize_per_token(x.cpu()), True, "quant")
    assert_quant_close(vlmx_ops.quantize_per_token(x, clip_range=2.0), R.quantize_per_token(x.cpu(), 2.0), True,
                       "quant clip")
    assert_quant_close(vlmx_ops.gelu_quant(x, approximate="tanh"), R.gelu_quant(x.cpu(), "tanh"), False, "gelu")


@pytest.mark.parametrize("rows,c", ROWS)
@pytest.mark.parametrize("mode", ["layernorm", "rmsnorm"])
def test_norm_quant(vlmx_ops, rows, c, mode):
    from vlmx.torch_ref import reference as R

    x = torch.randn(rows, c, device="cuda").half()
    w, b = (torch.rand(c, device="cuda") + 0.5).half(), torch.randn(c, device="cuda").half()
    out, ref = vlmx_ops.norm_quant(x, w, b, mode=mode), R.norm_quant(x.cpu(), w.cpu(), b.cpu(), mode)
    assert_quant_close(out, ref, False, f"norm_quant {mode}")


@pytest.mark.parametrize("b,t,n,h,hkv,d", [(1, 32, 576, 32, 32, 128), (2, 40, 729, 16, 4, 64), (1, 5, 100, 4, 4, 72)])
def test_token_importance(vlmx_ops, b, t, n, h, hkv, d):
    from vlmx.torch_ref import reference as R

    q, k = torch.randn(b, t, h * d, device="cuda").half(), torch.randn(b, n, hkv * d, device="cuda").half()
    err = rel_err(vlmx_ops.token_importance(q, k, num_heads=h, num_kv_heads=hkv, head_dim=d).cpu(),
                  R.token_importance(q.cpu().double(), k.cpu().double(), h, hkv, d))
    print(f"token_importance rel err {err:.2e}")
    assert err <= IMPORTANCE_REL_TOL


@pytest.mark.parametrize("b,n,c,keep", [(1, 576, 4096, 144), (2, 729, 1152, 1), (1, 300, 20, 300)])
def test_gather_topk(vlmx_ops, b, n, c, keep):
    from vlmx.torch_ref import reference as R

    x = torch.randn(b, n, c, device="cuda").half()
    s = torch.randint(0, 40, (b, n), device="cuda").float()  # many ties
    xk, idx = vlmx_ops.gather_topk(x, s, torch.tensor([keep]))
    rx, ridx = R.gather_topk(x.cpu(), s.cpu(), keep)
    assert torch.equal(idx.cpu(), ridx) and torch.equal(xk.cpu(), rx)

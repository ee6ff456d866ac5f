"""Visual-token importance and pruning: float64 references, order preservation, keep validation."""
import math

import numpy as np
import pytest
import torch

from vlmx.torch_ref import pruning

TOL_FP32 = 1e-6
TOL_FP16 = 2e-3


def check_close(out, ref, tol, name=""):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def ref_importance(q, k, h, hkv, d):
    """Plain float64: per (batch, head, text token) softmax over visual keys, then the mean over heads and tokens."""
    b, t, _ = q.shape
    n = k.shape[1]
    out = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            qh = q[bi].double().view(t, h, d)[:, hi]
            kh = k[bi].double().view(n, hkv, d)[:, hi // (h // hkv)]
            out[bi] += torch.softmax(qh @ kh.t() / math.sqrt(d), dim=-1).sum(0)
    return out / (h * t)


SHAPES = [  # (batch, text tokens, visual tokens, heads, kv heads, head dim)
    (1, 12, 576, 32, 32, 128),   # LLaVA-1.5 (Llama-7B) over 576 CLIP patches
    (2, 5, 729, 4, 1, 72),       # MQA, SigLIP-384 token count, head dim 72
    (2, 7, 33, 8, 2, 16),        # GQA, odd count
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["torch", "vlmx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_importance_matches_float64(shape, impl, dtype):
    b, t, n, h, hkv, d = shape
    torch.manual_seed(0)
    q = (torch.randn(b, t, h * d) * 2).to(dtype)
    k = (torch.randn(b, n, hkv * d) * 2).to(dtype)
    scores = pruning.token_importance(q, k, h, d, num_kv_heads=hkv, impl=impl)
    assert scores.shape == (b, n) and scores.dtype == torch.float32
    check_close(scores, ref_importance(q, k, h, hkv, d), TOL_FP32 if dtype == torch.float32 else TOL_FP16,
                f"{impl} {shape} {dtype}")
    assert torch.allclose(scores.sum(-1), torch.ones(b), atol=1e-5)


def test_token_importance_rejects_bad_shapes():
    q, k = torch.randn(1, 3, 64), torch.randn(1, 10, 64)
    with pytest.raises(ValueError, match="q_text must be"):
        pruning.token_importance(q, k, 4, 8)
    with pytest.raises(ValueError, match="k_vis must be"):
        pruning.token_importance(q, k, 4, 16, num_kv_heads=1)
    with pytest.raises(ValueError, match="divide num_heads"):
        pruning.token_importance(q, k, 4, 16, num_kv_heads=3)
    with pytest.raises(ValueError, match="choose one of"):
        pruning.token_importance(q, k, 4, 16, impl="onnx")


@pytest.mark.parametrize("n,keep,expected", [(576, 0.25, 144), (576, 1.0, 576), (576, 1, 1), (576, 576, 576),
                                             (729, 0.5, 365), (10, 0.01, 1), (7, np.int64(3), 3),
                                             (7, np.float32(0.5), 4)])
def test_keep_count(n, keep, expected):
    assert pruning.keep_count(n, keep) == expected


@pytest.mark.parametrize("keep,err,match", [(0, ValueError, r"outside \[1, 10\]"), (11, ValueError, "outside"),
                                            (-0.5, ValueError, r"outside \(0, 1\]"), (0.0, ValueError, "ratio"),
                                            (1.5, ValueError, "ratio"), (float("nan"), ValueError, "ratio"),
                                            (True, TypeError, "token budget"), ("half", TypeError, "ratio")])
def test_keep_validation(keep, err, match):
    with pytest.raises(err, match=match):
        pruning.keep_count(10, keep)


@pytest.mark.parametrize("impl", ["torch", "vlmx"])
@pytest.mark.parametrize("n,keep", [(576, 0.25), (729, 100), (17, 1), (17, 1.0)])
def test_prune_keeps_top_tokens_in_order(impl, n, keep):
    torch.manual_seed(1)
    b, c = 3, 8
    x = torch.randn(b, n, c)
    scores = torch.rand(b, n)
    kept, idx = pruning.prune_tokens(x, scores, keep, impl=impl)
    k = pruning.keep_count(n, keep)
    assert kept.shape == (b, k, c) and idx.shape == (b, k) and idx.dtype == torch.int64
    for r in range(b):
        expected = sorted(np.argsort(-scores[r].double().numpy(), kind="stable")[:k].tolist())
        assert idx[r].tolist() == expected  # the top-k set, ascending = original order
        assert torch.equal(kept[r], x[r, expected])


def test_prune_ties_prefer_lower_index_and_reject_bad_input():
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1)
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.5, 0.0]])
    kept, idx = pruning.prune_tokens(x, scores, 2)
    assert idx.tolist() == [[1, 3]] and kept.flatten().tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="scores"):
        pruning.prune_tokens(x, scores[:, :5], 2)
    with pytest.raises(ValueError, match="outside"):
        pruning.prune_tokens(x, scores, 7)


def test_cls_importance():
    torch.manual_seed(2)
    w = torch.softmax(torch.randn(2, 16, 577, 577), dim=-1)  # CLIP ViT-L/14-336: [CLS] + 576 patches
    scores = pruning.cls_importance(w)
    ref = w.double()[:, :, 0, 1:].mean(1)
    check_close(scores, ref / ref.sum(-1, keepdim=True), TOL_FP32, "cls importance")
    assert scores.shape == (2, 576)
    check_close(pruning.cls_importance(w[:, :, 0]), scores, 0.0, "cls rows only")
    with pytest.raises(ValueError, match="attn_weights must be"):
        pruning.cls_importance(torch.rand(2, 3))

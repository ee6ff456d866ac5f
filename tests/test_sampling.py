"""Next-token sampling: the numpy sampler (CPU backends, no torch) and the torch sampler (torch / GPU backends)
filter the same tokens (temperature, top-k, top-p); each is reproducible per seed and draws from the filtered
softmax. Their random streams differ, so one seed gives the same tokens per sampler, not across the two."""
from __future__ import annotations

import numpy as np
import pytest

from vlmx.trt_runtime.sampling import NumpySampler, Sampling, allowed

torch = pytest.importorskip("torch")
from vlmx.trt_runtime.torch_sampling import TorchSampler  # noqa: E402

SETTINGS = [Sampling(1.0), Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.8), Sampling(0.9, top_k=20, top_p=0.5),
            Sampling(2.0, top_k=1), Sampling(1.0, top_p=1e-6)]


@pytest.mark.parametrize("params", SETTINGS, ids=str)
@pytest.mark.parametrize("vocab", [7, 1000])
def test_numpy_and_torch_filters_keep_the_same_tokens(params, vocab):
    logits = np.random.default_rng().standard_normal((3, vocab)).astype(np.float32) * 4
    got = allowed(logits, params)
    want = TorchSampler(params).allowed(torch.from_numpy(logits)).numpy()
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    kept = np.isfinite(got)
    assert kept.any(axis=-1).all()
    if params.top_k:
        assert (kept.sum(-1) <= params.top_k).all()
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)


def test_numpy_sampler_is_seeded_and_draws_from_the_filtered_softmax():
    logits = np.random.default_rng().standard_normal((1, 12)).astype(np.float32) * 2
    params = Sampling(0.8, top_k=6, top_p=0.9, seed=11)
    a, b = NumpySampler(params), NumpySampler(params)
    seq_a = [int(a(logits)[0]) for _ in range(50)]
    assert seq_a == [int(b(logits)[0]) for _ in range(50)]
    other = NumpySampler(Sampling(0.8, top_k=6, top_p=0.9, seed=12))
    assert seq_a != [int(other(logits)[0]) for _ in range(50)]
    x = allowed(logits, params)[0].astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    rows = np.repeat(logits, 20000, axis=0)
    draws = NumpySampler(params)(rows)
    assert set(np.unique(draws)) <= set(np.flatnonzero(p > 0))
    freq = np.bincount(draws, minlength=12) / len(draws)
    assert np.abs(freq - p).max() < 0.015, (freq, p)


def test_greedy_is_the_argmax_on_both():
    logits = np.random.default_rng().standard_normal((4, 50)).astype(np.float32)
    want = logits.argmax(-1)
    assert np.array_equal(NumpySampler(Sampling())(logits), want)
    assert np.array_equal(TorchSampler(Sampling())(torch.from_numpy(logits)).numpy(), want)

"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator (same seed, same
tokens). :class:`NumpySampler` works on host logits (CPU backends: no torch); the torch backend and GPU backends use
:class:`vlmx.trt_runtime.torch_sampling.TorchSampler`, which runs on the logits' device so that only the chosen id
crosses to the host. Both apply the same filters (:func:`allowed`); their random streams differ, so one seed gives
reproducible tokens per sampler, not the same tokens on a numpy and a torch backend (greedy is identical).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 means greedy (argmax); ``top_k`` 0 and ``top_p`` 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> "Sampling":
        """Raise ValueError naming the flag when a value is out of range."""
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1] (1 = off)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def allowed(logits: np.ndarray, p: Sampling) -> np.ndarray:
    """Tempered logits [B, V] (float32) with the tokens top-k / top-p filter out set to -inf.

    top-k keeps the k largest (ties with the k-th kept); top-p keeps the most likely tokens until their mass
    reaches ``top_p``, the token that crosses it included."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(p.temperature)
    if p.top_k:
        at = x.shape[-1] - min(p.top_k, x.shape[-1])  # the k-th largest value sits here once partitioned
        kth = np.partition(x, at, axis=-1)[..., at:at + 1]
        x = np.where(x < kth, np.float32(-np.inf), x)
    if p.top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        probs = _softmax(np.take_along_axis(x, order, axis=-1))
        drop_sorted = np.cumsum(probs, axis=-1) - probs > p.top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x = np.where(drop, np.float32(-np.inf), x)
    return x


class NumpySampler:
    """Picks one token per row from float logits [B, V] on the host (numpy ``Generator``, PCG64)."""

    def __init__(self, params: Sampling):
        self.params = params.check()
        self.rng = None if params.greedy else np.random.default_rng(params.seed)

    def __call__(self, logits) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        if self.params.greedy:
            return logits.argmax(axis=-1)
        probs = _softmax(allowed(logits, self.params).astype(np.float64))
        cdf = np.cumsum(probs, axis=-1)
        u = self.rng.random((logits.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)

"""ALiBi slopes and biases with MPT's conventions (shared by the MPT reference and the FlashAttention op)."""
from __future__ import annotations

import math

import torch


def gen_slopes(n_heads: int, alibi_bias_max: int = 8, device=None, return_1d: bool = False) -> torch.Tensor:
    """MPT's ALiBi slopes: 2^(-alibi_bias_max * i / n) for the next power of two n, interleaved when n_heads is not one.

    Returns shape ``[1, n_heads, 1, 1]`` (or ``[n_heads]`` with ``return_1d``), float32.
    """
    if n_heads < 1:
        raise ValueError(f"gen_slopes: n_heads must be >= 1, got {n_heads}")
    _n_heads = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, _n_heads + 1, dtype=torch.float32, device=device)
    m = m.mul(alibi_bias_max / _n_heads)
    slopes = 1.0 / torch.pow(2, m)
    if _n_heads != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes if return_1d else slopes.view(1, n_heads, 1, 1)


def alibi_bias(n_heads: int, seq_len_k: int, alibi_bias_max: int = 8, device=None) -> torch.Tensor:
    """ALiBi bias ``slope_h * (j - (seq_len_k - 1))`` of shape ``[1, n_heads, 1, seq_len_k]`` (float32)."""
    pos = torch.arange(1 - seq_len_k, 1, dtype=torch.float32, device=device).view(1, 1, 1, seq_len_k)
    return pos * gen_slopes(n_heads, alibi_bias_max, device=device)

"""An mmfa-style Triton flash attention forward (the Triton tutorial's algorithm), the Triton baseline of
``scripts/bench_kernels.py``: one program per (query block, batch*head), K/V blocks streamed with an online
softmax in base 2, head dims padded to a power of two with masked loads. fp16 in/out, fp32 accumulation.

Built with whatever Triton is installed; on sm_75 Triton >= 3.4 lowers ``tl.dot`` to FMA, so on a T4 this is the
"Triton without tensor cores" reference point, on the H100 it is a native-tensor-core baseline.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_fwd(Q, K, V, O, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, H, HKV, SQ, SK, scale_log2,
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=(offs_m[:, None] < SQ) & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M + SK - SQ)
    for start in range(0, hi, BLOCK_N):
        kn = start + offs_n
        k = tl.load(kbase + kn[None, :] * sks + offs_d[:, None], mask=(kn[None, :] < SK) & dmask[:, None], other=0.0)
        s = tl.dot(q, k) * scale_log2
        valid = kn[None, :] < SK
        if CAUSAL:
            valid = valid & (kn[None, :] <= offs_m[:, None] + SK - SQ)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + kn[:, None] * svs + offs_d[None, :], mask=(kn[:, None] < SK) & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], acc.to(tl.float16),
             mask=(offs_m[:, None] < SQ) & dmask[None, :])


def triton_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           block_m: int = 128, block_n: int = 64) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B,H,Sq,D], k/v [B,Hkv,Sk,D] (fp16), bottom-right aligned causal mask."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    block_d = triton.next_power_of_2(d)
    grid = (triton.cdiv(sq, block_m), b * h)
    _attn_fwd[grid](q, k, v, o, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), h, hkv, sq, sk,
                    d ** -0.5 * 1.4426950408889634, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                    CAUSAL=causal, num_warps=4 if block_d <= 64 else 8, num_stages=2)
    return o

"""Triton kernels of the memory-bound vlmx ops, written for ahead-of-time compilation (no tensor cores needed).

Semantics are those of :mod:`vlmx.torch_ref.reference`: every int8 quantizer computes
``scale = max(max|y|, QUANT_EPS) / 127`` and ``q = rint(y / scale)`` (IEEE division ``div_rn`` and half-to-even
``rint``, not a reciprocal multiply), clamped to [-127, 127]. Statistics and GELU are fp32.

Row kernels (one program per row of ``C`` contiguous elements) come in two shapes chosen by the ``ONE_CHUNK``
constexpr: the whole row in registers (``C <= BLOCK_C``, one read of ``x``), or a loop over ``BLOCK_C`` chunks for
rows longer than the largest register block (the row is re-read, from L2, once per statistics pass). Modes that
only select arithmetic (clip, GELU variant, LayerNorm/RMSNorm, per-token/per-tensor, bias) are runtime arguments,
which keeps the number of precompiled specialisations small at no measurable cost for memory-bound kernels.

Imported only by the AOT compiler (:mod:`vlmx.plugins.triton_aot`); the runtime never needs Triton.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlmx.torch_ref.op_table import QMAX, QUANT_EPS

_QMAX = tl.constexpr(float(QMAX))
_QUANT_EPS = tl.constexpr(float(QUANT_EPS))
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _clip(y, clip_range):
    """Clamp to [-clip_range, clip_range]; clip_range <= 0 means no clip (limit +inf)."""
    lim = tl.where(clip_range > 0, clip_range, float("inf"))
    return tl.minimum(tl.maximum(y, -lim), lim)


@triton.jit
def _row_scale(amax):
    return tl.math.div_rn(tl.maximum(amax, _QUANT_EPS), _QMAX)


@triton.jit
def _quantize(y, scale):
    """rint(y / scale) half-to-even, clamped to +-127, as float (exactly representable).

    Clamping the quotient to +-127 before rounding gives the same result as after (the bounds are integers).
    Rounding adds and subtracts 1.5 * 2^23: for |v| <= 2^22 the fp32 add (round-to-nearest-even) leaves exactly
    rint(v). Plain fp32 ops (no libdevice) so the same code also runs under TRITON_INTERPRET for CPU tests.
    """
    v = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -_QMAX), _QMAX)
    return (v + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _gelu(x, approx_tanh):
    """GELU in fp32: tanh approximation when approx_tanh != 0, else the exact erf form.

    0.5 * (1 + tanh(u)) is evaluated as sigmoid(2u) = 1 / (1 + exp(-2u)) (the same function, without the
    cancellation of 1 + tanh for large negative u)."""
    # A uniform (scalar) branch: only the selected form is evaluated.
    if approx_tanh != 0:
        y = x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


# ------------------------------------------------------------------------------------------------ quantize
@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, C, clip_range,
                              BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Row r of x[rows, C] -> q[r, :] int8 and scale[r] fp32 (vlmx::quantize_per_token)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_CHUNK:
        m = cols < C
        y = _clip(tl.load(x_ptr + base + cols, mask=m, other=0.0).to(tl.float32), clip_range)
        scale = _row_scale(tl.max(tl.abs(y), axis=0))
        tl.store(q_ptr + base + cols, _quantize(y, scale).to(tl.int8), mask=m)
    else:
        amax = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            y = _clip(tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32), clip_range)
            amax = tl.maximum(amax, tl.abs(y))
        scale = _row_scale(tl.max(amax, axis=0))
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            y = _clip(tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32), clip_range)
            tl.store(q_ptr + base + c0 + cols, _quantize(y, scale).to(tl.int8), mask=m)
    tl.store(scale_ptr + row, scale)


@triton.jit
def gelu_quant_kernel(x_ptr, q_ptr, scale_ptr, C, clip_range, approx_tanh,
                      BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """gelu_and_quant: GELU of row r in fp32, then per-token int8 (vlmx::gelu_quant)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_CHUNK:
        m = cols < C
        x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
        y = _clip(_gelu(x, approx_tanh), clip_range)
        scale = _row_scale(tl.max(tl.where(m, tl.abs(y), 0.0), axis=0))
        tl.store(q_ptr + base + cols, _quantize(y, scale).to(tl.int8), mask=m)
    else:
        amax = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            x = tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.where(m, tl.abs(_clip(_gelu(x, approx_tanh), clip_range)), 0.0))
        scale = _row_scale(tl.max(amax, axis=0))
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            x = tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
            y = _clip(_gelu(x, approx_tanh), clip_range)
            tl.store(q_ptr + base + c0 + cols, _quantize(y, scale).to(tl.int8), mask=m)
    tl.store(scale_ptr + row, scale)


# ------------------------------------------------------------------------------------------------ norm + quant
@triton.jit
def _norm_chunk(x, w, b, mean, rstd, has_bias, clip_range):
    y = (x - mean) * rstd * w
    return _clip(tl.where(has_bias != 0, y + b, y), clip_range)


@triton.jit
def norm_quant_kernel(x_ptr, w_ptr, b_ptr, q_ptr, scale_ptr, sum_ptr, C, eps, clip_range, static_scale,
                      is_rms, per_token, has_bias, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """RMSNormGeneral: LayerNorm (is_rms=0) or RMSNorm of row r with fp32 statistics, weight and optional bias,
    then int8 with a per-token (per_token=1) or static per-tensor scale; sum[r] = sum_c q*scale."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_CHUNK:
        m = cols < C
        x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=m & (has_bias != 0), other=0.0).to(tl.float32)
        mean = tl.where(is_rms != 0, 0.0, tl.math.div_rn(tl.sum(x, axis=0), C.to(tl.float32)))
        xc = tl.where(m, x - mean, 0.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(xc * xc, axis=0), C.to(tl.float32)) + eps))
        y = tl.where(m, _norm_chunk(x, w, b, mean, rstd, has_bias, clip_range), 0.0)
        scale = tl.where(per_token != 0, _row_scale(tl.max(tl.abs(y), axis=0)), static_scale)
        q = _quantize(y, scale)
        tl.store(q_ptr + base + cols, q.to(tl.int8), mask=m)
        total = tl.sum(q * scale, axis=0)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            acc += tl.load(x_ptr + base + c0 + cols, mask=c0 + cols < C, other=0.0).to(tl.float32)
        mean = tl.where(is_rms != 0, 0.0, tl.math.div_rn(tl.sum(acc, axis=0), C.to(tl.float32)))
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            xc = tl.where(m, tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(acc, axis=0), C.to(tl.float32)) + eps))
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            x = tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c0 + cols, mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c0 + cols, mask=m & (has_bias != 0), other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.where(m, tl.abs(_norm_chunk(x, w, b, mean, rstd, has_bias, clip_range)), 0.0))
        scale = tl.where(per_token != 0, _row_scale(tl.max(acc, axis=0)), static_scale)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m = c0 + cols < C
            x = tl.load(x_ptr + base + c0 + cols, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c0 + cols, mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c0 + cols, mask=m & (has_bias != 0), other=0.0).to(tl.float32)
            q = tl.where(m, _quantize(_norm_chunk(x, w, b, mean, rstd, has_bias, clip_range), scale), 0.0)
            tl.store(q_ptr + base + c0 + cols, q.to(tl.int8), mask=m)
            acc += q * scale
        total = tl.sum(acc, axis=0)
    tl.store(scale_ptr + row, scale)
    tl.store(sum_ptr + row, total)


# ------------------------------------------------------------------------------------------------ pruning
@triton.jit
def token_importance_kernel(q_ptr, k_ptr, out_ptr, T, N, D, group, q_stride_b, q_stride_t, k_stride_b, k_stride_n,
                            scale, inv_count, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (t-block, head h, batch b): softmax over the N visual keys of scale * q_t . k_n for BLOCK_T text
    queries (two passes: online max/sum, then normalised probabilities), summed over the block's queries and
    atomically added, times inv_count = 1/(H*T), into out[b, n] (zero-initialised). Query head h reads key head
    h // group (GQA)."""
    tb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // group
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    qp = q_ptr + b * q_stride_b + t[:, None] * q_stride_t + h * D + d[None, :]
    q = tl.load(qp, mask=tmask[:, None] & (d[None, :] < D), other=0.0)
    kbase = k_ptr + b * k_stride_b + hk * D + d[:, None]
    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(kbase + n[None, :] * k_stride_n, mask=(n[None, :] < N) & (d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
        s = tl.where(n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    w_t = tl.where(tmask, inv_count / l_i, 0.0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(kbase + n[None, :] * k_stride_n, mask=(n[None, :] < N) & (d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
        p = tl.exp(s - m_i[:, None]) * w_t[:, None]
        tl.atomic_add(out_ptr + b * N + n, tl.sum(p, axis=0), mask=n < N, sem="relaxed")


@triton.jit
def topk_rank_kernel(scores_ptr, kept_ptr, N, keep, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (i-block, b): token i is kept (kept[b, i] = 1, else 0) when fewer than `keep` tokens beat it:
    a higher score, or an equal score at a lower index (the stable descending sort of the reference)."""
    b = tl.program_id(1).to(tl.int64)
    row = scores_ptr + b * N
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ivalid = i < N
    si = tl.load(row + i, mask=ivalid, other=0.0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        sj = tl.load(row + j, mask=j < N, other=0.0)
        beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((beats & (j[None, :] < N)).to(tl.int32), axis=1)
    tl.store(kept_ptr + b * N + i, ((rank < keep) & ivalid).to(tl.int8), mask=ivalid)


@triton.jit
def topk_compact_kernel(kept_ptr, idx_ptr, N, keep, BLOCK: tl.constexpr):
    """Program b: the indices of kept[b, :] in ascending order, via a running prefix count, to idx[b, :keep]."""
    b = tl.program_id(0).to(tl.int64)
    count = tl.full([], 0, dtype=tl.int32)
    for i0 in range(0, N, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        kept = tl.load(kept_ptr + b * N + i, mask=i < N, other=0).to(tl.int32)
        pos = count + tl.cumsum(kept, axis=0) - 1
        tl.store(idx_ptr + b * keep + pos, i.to(tl.int64), mask=(kept != 0) & (pos < keep))
        count += tl.sum(kept, axis=0)


@triton.jit
def gather_rows_kernel(x_ptr, idx_ptr, out_ptr, N, keep, C, BLOCK_C: tl.constexpr):
    """Program (r, b): out[b, r, :] = x[b, idx[b, r], :] for rows of C contiguous elements."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    src = tl.load(idx_ptr + b * keep + r)
    x_row = x_ptr + (b * N + src) * C
    o_row = out_ptr + (b * keep + r) * C
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        m = c0 + cols < C
        tl.store(o_row + c0 + cols, tl.load(x_row + c0 + cols, mask=m), mask=m)


KERNELS = {
    "quantize_per_token": quantize_per_token_kernel,
    "gelu_quant": gelu_quant_kernel,
    "norm_quant": norm_quant_kernel,
    "token_importance": token_importance_kernel,
    "topk_rank": topk_rank_kernel,
    "topk_compact": topk_compact_kernel,
    "gather_rows": gather_rows_kernel,
}

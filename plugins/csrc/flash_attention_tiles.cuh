// Device helpers of flash_attention.cu, one per step of the tile loop: global <-> register <-> shared copies,
// the two tensor-core products, masking and the online softmax. Written against FaTraits / FaArgs, which the .cu
// defines (traits table) before including this file; not a standalone header.
#ifndef VLMX_FLASH_ATTENTION_TILES_CUH_
#define VLMX_FLASH_ATTENTION_TILES_CUH_

namespace vlmx {
namespace {

// Valid keys of batch row b: seqlen_k, or kv_len[b] clamped to [0, seqlen_k] (a fixed-size KV cache).
__device__ __forceinline__ int valid_keys(const FaArgs& a, int b) {
  if (!a.kv_len) return a.seqlen_k;
  const int64_t n = a.kv_len[b];
  return n <= 0 ? 0 : (n >= a.seqlen_k ? a.seqlen_k : static_cast<int>(n));
}

// MPT gen_slopes: 2^-(abm*i/n) for the next power of two n; interleaved (odd then even) when H is not one.
__device__ __forceinline__ float alibi_slope(int head, int num_heads, int pow2, int bias_max) {
  int idx = head;
  if (pow2 != num_heads) idx = head < pow2 / 2 ? 2 * head + 1 : 2 * (head - pow2 / 2);
  return exp2f(-static_cast<float>(idx + 1) * (static_cast<float>(bias_max) / static_cast<float>(pow2)));
}

// Global -> registers: kBlockN rows of K (or V) as 16-byte chunks; rows past seqlen_k (the valid length) read as
// zeros so masked keys contribute exactly 0 * 0 (never 0 * garbage, e.g. NaN in unused cache slots) to P V.
template <int D, int W>
__device__ __forceinline__ void load_kv_regs(uint4 (&regs)[FaTraits<D, W>::kKvLoads], const half* base,
                                             int64_t stride_s, int key0, int seqlen_k) {
  using T = FaTraits<D, W>;
#pragma unroll
  for (int i = 0; i < T::kKvLoads; ++i) {
    const int c = threadIdx.x + i * T::kThreads;
    const int row = c / T::kChunks, col = c % T::kChunks;
    regs[i] = make_uint4(0, 0, 0, 0);
    if (c < T::kBlockN * T::kChunks && key0 + row < seqlen_k) {
      regs[i] = __ldg(reinterpret_cast<const uint4*>(base + (key0 + row) * stride_s) + col);
    }
  }
}

template <int D, int W>
__device__ __forceinline__ void store_kv_regs(half* tile, const uint4 (&regs)[FaTraits<D, W>::kKvLoads]) {
  using T = FaTraits<D, W>;
#pragma unroll
  for (int i = 0; i < T::kKvLoads; ++i) {
    const int c = threadIdx.x + i * T::kThreads;
    if (c < T::kBlockN * T::kChunks) {
      *reinterpret_cast<uint4*>(tile + (c / T::kChunks) * T::kPitch + (c % T::kChunks) * 8) = regs[i];
    }
  }
}

// Q tile rows -> shared memory; row r maps to (query position r / group, head kv_head * group + r % group).
template <int D, int W>
__device__ __forceinline__ void load_q_tile(half* sq, const FaArgs& a, int b, int kv_head, int row0) {
  using T = FaTraits<D, W>;
  for (int c = threadIdx.x; c < T::kBlockM * T::kChunks; c += T::kThreads) {
    const int row = c / T::kChunks, col = c % T::kChunks, r = row0 + row;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < a.rows) {
      const int qpos = r / a.group, head = kv_head * a.group + r % a.group;
      val = __ldg(reinterpret_cast<const uint4*>(a.q + b * a.q_sb + qpos * a.q_ss + head * a.q_sh) + col);
    }
    *reinterpret_cast<uint4*>(sq + row * T::kPitch + col * 8) = val;
  }
}

// S[16 x kBlockN] = Q K^T for this warp: K rows are the B operand's columns, so plain ldmatrix gives them.
template <int D, int W>
__device__ __forceinline__ void qk_product(float (&s)[FaTraits<D, W>::kBlockN / 8][4], const uint32_t (&qf)[D / 8][2],
                                           const half* sk, int lane) {
  using T = FaTraits<D, W>;
#pragma unroll
  for (int n = 0; n < T::kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 8; ++kk) {
#pragma unroll
    for (int n4 = 0; n4 < T::kBlockN / 32; ++n4) {
      uint32_t b[4];
      ldmatrix_x4(b, sk + (n4 * 32 + lane) * T::kPitch + kk * 8);
#pragma unroll
      for (int i = 0; i < 4; ++i) mma_m16n8k8(s[n4 * 4 + i], qf[kk], b[i]);
    }
  }
}

// O[16 x D] += P V: P fragments come straight from the S registers, V through ldmatrix.trans (keys are k).
template <int D, int W>
__device__ __forceinline__ void pv_product(float (&o)[D / 8][4], const uint32_t (&pf)[FaTraits<D, W>::kBlockN / 8][2],
                                           const half* sv, int lane) {
  using T = FaTraits<D, W>;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int k4 = 0; k4 < T::kBlockN / 32; ++k4) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sv + (k4 * 32 + lane) * T::kPitch + n * 8);
#pragma unroll
      for (int i = 0; i < 4; ++i) mma_m16n8k8(o[n], pf[k4 * 4 + i], b[i]);
    }
  }
}

// Per-row state of the two rows (g and g + 8 of the warp's m16 tile) that this thread's fragments touch. Built
// on demand inside mask_scores: keeping it live across the key loop costs 8 registers the interior tiles never use.
struct RowInfo {
  int qpos;            // query position; -1 for padding rows past seqlen_q * group
  float slope_log2;    // ALiBi slope * log2(e)
  const half* bias;    // bias row (key 0) or nullptr
};

__device__ __forceinline__ RowInfo row_info(const FaArgs& a, int b, int kv_head, int r) {
  RowInfo ri;
  ri.qpos = r < a.rows ? r / a.group : -1;
  const int head = kv_head * a.group + (r < a.rows ? r % a.group : 0);
  ri.slope_log2 = a.alibi ? alibi_slope(head, a.num_heads, a.alibi_pow2, a.alibi_bias_max) * kLog2e : 0.f;
  ri.bias = (a.bias && r < a.rows) ? a.bias + b * a.bias_sb + head * a.bias_sh + ri.qpos * a.bias_sq : nullptr;
  return ri;
}

// Scales S into the log2 domain and applies ALiBi, bias, causal/window and key-length masks (masked -> -inf).
// len: the valid keys of this batch row (valid_keys).
template <int D, int W>
__device__ __forceinline__ void mask_scores(float (&s)[FaTraits<D, W>::kBlockN / 8][4], const FaArgs& a,
                                            int b, int kv_head, int row, int key0, int len, int lane) {
  using T = FaTraits<D, W>;
  const RowInfo ri[2] = {row_info(a, b, kv_head, row), row_info(a, b, kv_head, row + 8)};
  const int off = len - a.seqlen_q;
#pragma unroll
  for (int n = 0; n < T::kBlockN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const RowInfo& r = ri[e >> 1];
      const int key = key0 + n * 8 + (lane & 3) * 2 + (e & 1);
      float v = s[n][e] * a.scale_log2;
      bool masked = key >= len || r.qpos < 0;
      if (a.causal) masked |= key > r.qpos + off;
      if (a.window >= 0) masked |= key <= r.qpos + off - a.window;
      if (!masked) {
        if (a.alibi) v += r.slope_log2 * static_cast<float>(key - (len - 1));
        if (r.bias) v += __half2float(r.bias[key]) * kLog2e;
      }
      s[n][e] = masked ? -INFINITY : v;
    }
  }
}

// Online softmax over one tile: new running max, rescale O and the running sum, write P = exp2(S - max) as fp16.
// `scale` > 0 multiplies raw scores on the fly (interior tiles: one FFMA per score feeds exp2); masked tiles arrive
// already scaled and pass 1.
template <int D, int W>
__device__ __forceinline__ void online_softmax_update(float (&s)[FaTraits<D, W>::kBlockN / 8][4],
                                                      uint32_t (&pf)[FaTraits<D, W>::kBlockN / 8][2],
                                                      float (&o)[D / 8][4], float (&row_max)[2],
                                                      float (&row_sum)[2], float scale) {
  using T = FaTraits<D, W>;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < T::kBlockN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    // The 4 threads of a quad hold the row's columns.
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float new_max = fmaxf(row_max[h], mx * scale);  // scale > 0: max(s * scale) = scale * max(s)
    // A row with nothing visible yet keeps max -inf; subtracting 0 then makes every p exactly 0 (no NaN).
    const float ref = new_max == -INFINITY ? 0.f : new_max;
    const float alpha = exp2f(row_max[h] - ref);
    row_max[h] = new_max;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < T::kBlockN / 8; ++n) {
      s[n][2 * h] = exp2f(fmaf(s[n][2 * h], scale, -ref));
      s[n][2 * h + 1] = exp2f(fmaf(s[n][2 * h + 1], scale, -ref));
      sum += s[n][2 * h] + s[n][2 * h + 1];
    }
    row_sum[h] = row_sum[h] * alpha + sum;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][2 * h] *= alpha;
      o[n][2 * h + 1] *= alpha;
    }
  }
#pragma unroll
  for (int n = 0; n < T::kBlockN / 8; ++n) {
    pf[n][0] = pack_half2(s[n][0], s[n][1]);
    pf[n][1] = pack_half2(s[n][2], s[n][3]);
  }
}

}  // namespace
}  // namespace vlmx

#endif  // VLMX_FLASH_ATTENTION_TILES_CUH_

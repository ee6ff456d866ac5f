// Flash attention forward for sm_75 and later: fp16 in/out, fp32 accumulation, online softmax.
//
// Algorithm (FlashAttention-1/2 forward, tiled for Turing as in llama.cpp's fattn-mma):
//   one CTA = W warps = 16 W "rows"; a row is a (query position, query head) pair of ONE kv head, so the
//   GQA group's query heads share every K/V tile (decode with q length 1 fills group rows instead of 1 of 16) and
//   K/V are read once per group. Each warp owns 16 rows and computes S = Q K^T and O += P V with
//   mma.sync.m16n8k8; K fragments come from ldmatrix, V fragments from ldmatrix.trans, and P is handed from the S
//   accumulators to the A operand of the second product in registers (the m16n8k8 C and A layouts coincide).
// No cp.async on Turing: the next K/V tile is loaded global -> registers while the current tile is multiplied, and
// stored to shared memory afterwards (register-staged double buffering; one shared buffer keeps 2-3 CTAs per T4 SM).
// Split-KV: when B * Hkv * row-blocks cannot fill the GPU (decode), blockIdx.z splits the key range; each split
// writes unnormalised fp32 partials (O, running max, running sum) and a combine kernel merges them.
#include <math.h>
#include <stdlib.h>

#include <algorithm>

#include "common.cuh"

namespace vlmx {
namespace {

// ------------------------------------------------------------------------------------------------ traits table
#ifndef VLMX_FA_SMALL_D_MIN_BLOCKS
#define VLMX_FA_SMALL_D_MIN_BLOCKS 1
#endif
constexpr int kMaxSplits = VLMX_FA_MAX_SPLITS;  // the workspace bound (vlmx_kernels.h) assumes the same limits
constexpr float kLog2e = 1.4426950408889634f;

// D: head dim; W: warps per CTA (16 rows each). W = 8 for prefill (a K/V tile feeds twice the rows per load and
// per barrier), W = 4 when there are few rows (decode, short sequences) so CTAs stay numerous.
template <int D, int W>
struct FaTraits {
  static_assert(D % 8 == 0, "head_dim must be a multiple of the mma k-step (8)");
  static constexpr int kThreads = W * 32;
  static constexpr int kBlockM = W * 16;  // rows per CTA: one m16 tile per warp
  // Keys per tile: 64 keeps 8 mma n-tiles in flight. With 4 warps, D >= 96 drops to 32 so the fp32 O
  // accumulators (D/2 registers), S (kBlockN/2), Q fragments (D/4) and the register-staged K/V tile
  // (2 * kBlockN * D / 8 / kThreads uint4) stay under 255 registers; 8 warps halve the staging share.
  static constexpr int kBlockN = (D >= 96 && W == 4) ? 32 : 64;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  // Row pitch in halves: an odd number of 16-byte chunks puts the 8 rows of one ldmatrix on 8 distinct
  // 4-bank groups (conflict-free); D/8 even (64, 80, 96, 128) gets one chunk of padding, D = 72 needs none.
  static constexpr int kPitch = (kChunks % 2) ? D : D + 8;
  static constexpr int kTileElems = kBlockN * kPitch;
  // K and V tiles share one buffer; Q is staged through the same memory before the first K/V tile lands.
  static constexpr int kSmemElems = (2 * kTileElems > kBlockM * kPitch) ? 2 * kTileElems : kBlockM * kPitch;
  static constexpr int kKvLoads = (kBlockN * kChunks + kThreads - 1) / kThreads;  // uint4 per thread per tensor
  // CTAs per SM the register budget must allow. 3 caps the 4-warp D = 64 kernel at 168 registers (12 resident
  // warps instead of 8 on a 64K-register SM) for ~100 bytes of spills: 6% faster on ViT-L/336 in
  // bench/results/kernels_h100_final (variant "minblocks3"), while D = 72 got 8% slower with it, so only D = 64.
  // VLMX_FA_SMALL_D_MIN_BLOCKS applies the cap to D = 72 as well (tuning builds via --define).
  static constexpr int kMinBlocks = (W == 4 && D == 64) ? 3 : (W == 4 && D == 72) ? VLMX_FA_SMALL_D_MIN_BLOCKS : 1;
};

struct FaArgs {
  const half* q;
  const half* k;
  const half* v;
  half* o;
  const half* bias;
  float* part_o;   // [splits, B, H, Sq, D] unnormalised partial outputs (split-KV only)
  float* part_ml;  // [splits, B, H, Sq, 2] running max (log2 domain) and sum
  int batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, group, rows;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh;
  int64_t bias_sb, bias_sh, bias_sq;
  float scale_log2;  // softmax scale * log2(e): the softmax runs in base 2 (exp2 is one MUFU op)
  int causal, window, alibi, alibi_bias_max, alibi_pow2;
  int splits, tiles_per_split;
};

}  // namespace
}  // namespace vlmx

#include "flash_attention_tiles.cuh"  // after the traits table and FaArgs, which the helpers use

namespace vlmx {
namespace {

template <int D, int W>
__global__ void __launch_bounds__(W * 32, FaTraits<D, W>::kMinBlocks) flash_fwd_kernel(const FaArgs a) {
  using T = FaTraits<D, W>;
  __shared__ __align__(16) half smem[T::kSmemElems];
  half* sk = smem;
  half* sv = smem + T::kTileElems;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * T::kBlockM;
  const int b = blockIdx.y / a.num_kv_heads, kv_head = blockIdx.y % a.num_kv_heads;
  const int split = blockIdx.z;
  const int off = a.seqlen_k - a.seqlen_q;

  // Keys any row of this CTA can see (bottom-right aligned causal/window); whole tiles outside are skipped.
  const int qpos_lo = row0 / a.group;
  const int qpos_hi = min(a.seqlen_q - 1, (row0 + T::kBlockM - 1) / a.group);
  int key_end = a.seqlen_k, key_begin = 0;
  if (a.causal) key_end = min(key_end, qpos_hi + off + 1);
  if (a.window >= 0) key_begin = max(key_begin, qpos_lo + off - a.window + 1);
  const int tile_lo = key_end > key_begin ? key_begin / T::kBlockN : 0;
  const int tile_hi = key_end > key_begin ? (key_end + T::kBlockN - 1) / T::kBlockN : 0;
  const int t_begin = min(tile_hi, tile_lo + split * a.tiles_per_split);
  const int t_end = min(tile_hi, t_begin + a.tiles_per_split);

  const half* kbase = a.k + b * a.k_sb + kv_head * a.k_sh;
  const half* vbase = a.v + b * a.v_sb + kv_head * a.v_sh;
  uint4 kregs[T::kKvLoads], vregs[T::kKvLoads];
  if (t_begin < t_end) {
    load_kv_regs<D, W>(kregs, kbase, a.k_ss, t_begin * T::kBlockN, a.seqlen_k);
    load_kv_regs<D, W>(vregs, vbase, a.v_ss, t_begin * T::kBlockN, a.seqlen_k);
  }
  // Q goes through the K/V buffer: fragments stay in registers for the whole key loop.
  load_q_tile<D, W>(smem, a, b, kv_head, row0);
  __syncthreads();
  uint32_t qf[D / 8][2];
#pragma unroll
  for (int kk = 0; kk < D / 8; ++kk) ldmatrix_x2(qf[kk], smem + (warp * 16 + lane % 16) * T::kPitch + kk * 8);
  __syncthreads();

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  // Warps whose 16 rows are all padding (decode: rows = group < 64) still load tiles but skip the math.
  const bool warp_active = row0 + warp * 16 < a.rows;
  const bool plain = !a.alibi && !a.bias && a.scale_log2 > 0.f;

  if (t_begin < t_end) {
    store_kv_regs<D, W>(sk, kregs);
    store_kv_regs<D, W>(sv, vregs);
    __syncthreads();
  }
  for (int t = t_begin; t < t_end; ++t) {
    const int key0 = t * T::kBlockN;
    const bool has_next = t + 1 < t_end;
    if (has_next) {  // in flight while the tensor cores work on tile t
      load_kv_regs<D, W>(kregs, kbase, a.k_ss, key0 + T::kBlockN, a.seqlen_k);
      load_kv_regs<D, W>(vregs, vbase, a.v_ss, key0 + T::kBlockN, a.seqlen_k);
    }
    if (warp_active) {
      float s[T::kBlockN / 8][4];
      uint32_t pf[T::kBlockN / 8][2];
      qk_product<D, W>(s, qf, sk, lane);
      // Interior tiles of a plain (no bias/ALiBi) attention need only the scale: skip the per-element masks.
      const bool interior = plain && key0 + T::kBlockN <= a.seqlen_k && qpos_hi < a.seqlen_q &&
                            row0 + T::kBlockM <= a.rows &&
                            (!a.causal || key0 + T::kBlockN - 1 <= qpos_lo + off) &&
                            (a.window < 0 || key0 > qpos_hi + off - a.window);
      if (!interior) mask_scores<D, W>(s, a, b, kv_head, row0 + warp * 16 + lane / 4, key0, lane);
      online_softmax_update<D, W>(s, pf, o, row_max, row_sum, interior ? a.scale_log2 : 1.f);
      pv_product<D, W>(o, pf, sv, lane);
    }
    __syncthreads();
    if (has_next) {
      store_kv_regs<D, W>(sk, kregs);
      store_kv_regs<D, W>(sv, vregs);
      __syncthreads();
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + warp * 16 + lane / 4 + h * 8;
    if (r >= a.rows) continue;
    const int qpos = r / a.group, head = kv_head * a.group + r % a.group;
    const int col = (lane & 3) * 2;
    if (a.splits == 1) {
      // Fully masked rows (sum 0) give zeros, as the reference does.
      const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
      half* dst = a.o + b * a.o_sb + qpos * a.o_ss + head * a.o_sh + col;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<__half2*>(dst + n * 8) = __floats2half2_rn(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
      }
    } else {
      const int64_t prow = ((static_cast<int64_t>(split) * a.batch + b) * a.num_heads + head) * a.seqlen_q + qpos;
      float* dst = a.part_o + prow * D + col;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
      }
      if ((lane & 3) == 0) {
        a.part_ml[prow * 2] = row_max[h];
        a.part_ml[prow * 2 + 1] = row_sum[h];
      }
    }
  }
}

// Merges split-KV partials: O = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s. One CTA per (b, h, q) row.
__global__ void flash_combine_kernel(const FaArgs a, int head_dim) {
  const int64_t row = blockIdx.x;  // (b * H + h) * Sq + qpos
  const int64_t rows_per_split = static_cast<int64_t>(a.batch) * a.num_heads * a.seqlen_q;
  float gmax = -INFINITY;
  for (int s = 0; s < a.splits; ++s) gmax = fmaxf(gmax, a.part_ml[(s * rows_per_split + row) * 2]);
  const float ref = gmax == -INFINITY ? 0.f : gmax;
  float total = 0.f;
  for (int s = 0; s < a.splits; ++s) {
    const int64_t pr = s * rows_per_split + row;
    total += exp2f(a.part_ml[pr * 2] - ref) * a.part_ml[pr * 2 + 1];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int qpos = static_cast<int>(row % a.seqlen_q);
  const int bh = static_cast<int>(row / a.seqlen_q);
  const int b = bh / a.num_heads, head = bh % a.num_heads;
  half* dst = a.o + b * a.o_sb + qpos * a.o_ss + head * a.o_sh;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < a.splits; ++s) {
      const int64_t pr = s * rows_per_split + row;
      acc += exp2f(a.part_ml[pr * 2] - ref) * a.part_o[pr * head_dim + d];
    }
    dst[d] = __float2half_rn(acc * inv);
  }
}

// How many CTAs split the key range: enough for ~4 CTAs per SM (decode CTAs are mostly loading, so they need
// company to keep enough bytes in flight), at least 2 tiles per split.
int choose_splits(int sms, int ctas, int key_tiles) {
  if (sms <= 0 || ctas >= 2 * sms || key_tiles < 4) return 1;
  int splits = (4 * sms + ctas - 1) / ctas;
  splits = std::min(splits, key_tiles / 2);
  return std::max(1, std::min(splits, kMaxSplits));
}

// Bytes of split-KV partials for `splits` splits: O [splits, B, H, Sq, D] and (max, sum) [splits, B, H, Sq, 2].
int64_t split_bytes(const FaArgs& a, int splits, int D) {
  return static_cast<int64_t>(splits) * a.batch * a.num_heads * a.seqlen_q * (D + 2) * sizeof(float);
}

// The split count the launcher would pick on a GPU with `sms` SMs, limited to the caller's workspace.
template <int D, int W>
int plan_splits(const FaArgs& a, int sms, int64_t workspace_bytes, int* tiles_per_split) {
  using T = FaTraits<D, W>;
  const int m_blocks = (a.rows + T::kBlockM - 1) / T::kBlockM;
  const int ctas = m_blocks * a.batch * a.num_kv_heads;
  const int key_tiles = (a.seqlen_k + T::kBlockN - 1) / T::kBlockN;
  int splits = choose_splits(sms, ctas, key_tiles);
  const int64_t per_split = split_bytes(a, 1, D);
  if (splits > 1) splits = static_cast<int>(std::min<int64_t>(splits, per_split > 0 ? workspace_bytes / per_split : 1));
  splits = std::max(1, splits);
  *tiles_per_split = (key_tiles + splits - 1) / splits;
  return std::max(1, (key_tiles + *tiles_per_split - 1) / *tiles_per_split);
}

template <int D, int W>
vlmx_status launch(FaArgs a, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  using T = FaTraits<D, W>;
  const int m_blocks = (a.rows + T::kBlockM - 1) / T::kBlockM;
  // Partials live in the caller's workspace (TensorRT: getWorkspaceSize; torch: a cached allocation): no
  // allocation here, so the launch is graph-capturable and never fails on memory.
  a.splits = plan_splits<D, W>(a, workspace ? sm_count() : 0, workspace ? workspace_bytes : 0, &a.tiles_per_split);
  if (a.splits > 1) {
    a.part_o = static_cast<float*>(workspace);
    a.part_ml = a.part_o + static_cast<int64_t>(a.splits) * a.batch * a.num_heads * a.seqlen_q * D;
  }
  dim3 grid(m_blocks, a.batch * a.num_kv_heads, a.splits);
  flash_fwd_kernel<D, W><<<grid, T::kThreads, 0, stream>>>(a);
  vlmx_status st = check_launch("flash_fwd_kernel");
  if (st == VLMX_OK && a.splits > 1) {
    flash_combine_kernel<<<static_cast<unsigned>(static_cast<int64_t>(a.batch) * a.num_heads * a.seqlen_q),
                           std::min(128, ((D + 31) / 32) * 32), 0, stream>>>(a, D);
    st = check_launch("flash_combine_kernel");
  }
  return st;
}

// 8 warps when 128-row CTAs still give every SM at least one AND the key loop is long (Sk >= 1024) enough to
// amortise a CTA's prologue (Q tile, first K/V tile) and epilogue; else 4, whose two or three resident CTAs per SM
// overlap each other's prologues. Measured on the H100 (bench/results/kernels_h100_final): 8 warps win at
// Sk 2048-4096 (up to 8%), 4 warps win at Sk 577/729 (ViT-L, SigLIP: 5-9%) and for decode.
// VLMX_FA_WARPS=4|8 pins the choice (benchmarks compare both).
template <int D>
vlmx_status launch_head_dim(const FaArgs& a, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  const char* env = getenv("VLMX_FA_WARPS");
  const int forced = env ? atoi(env) : 0;
  const int64_t ctas8 = static_cast<int64_t>((a.rows + 127) / 128) * a.batch * a.num_kv_heads;
  const bool eight = forced ? forced == 8 : (a.rows >= 128 && a.seqlen_k >= 1024 && ctas8 >= sm_count());
  return eight ? launch<D, 8>(a, workspace, workspace_bytes, stream) : launch<D, 4>(a, workspace, workspace_bytes, stream);
}

bool stride_ok(int64_t s) { return s >= 0 && s % 8 == 0; }

}  // namespace
}  // namespace vlmx

extern "C" vlmx_status vlmx_flash_attention_fwd(const vlmx_attention_params* p, cudaStream_t stream) {
  using namespace vlmx;
  clear_error();
  if (!p) return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: params is NULL; pass a vlmx_attention_params");
  if (p->head_dim != 64 && p->head_dim != 72 && p->head_dim != 80 && p->head_dim != 96 && p->head_dim != 128) {
    return fail(VLMX_ERR_UNSUPPORTED, "flash_attention: head_dim %d is not supported; expected one of 64, 72, 80, "
                "96, 128 (use the reference implementation for other sizes)", p->head_dim);
  }
  if (!p->q || !p->k || !p->v || !p->o) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: q, k, v and o must be device pointers, got q=%p k=%p "
                "v=%p o=%p", p->q, p->k, p->v, p->o);
  }
  if (p->batch <= 0 || p->seqlen_q <= 0 || p->seqlen_k <= 0 || p->num_heads <= 0 || p->num_kv_heads <= 0) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: sizes must be positive, got batch=%d seqlen_q=%d "
                "seqlen_k=%d num_heads=%d num_kv_heads=%d", p->batch, p->seqlen_q, p->seqlen_k, p->num_heads,
                p->num_kv_heads);
  }
  if (p->num_heads % p->num_kv_heads != 0) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: num_kv_heads=%d must divide num_heads=%d (GQA/MQA)",
                p->num_kv_heads, p->num_heads);
  }
  if (p->window < -1) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: window=%d; expected -1 (unlimited) or >= 0", p->window);
  }
  if (p->alibi && p->alibi_bias_max <= 0) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: alibi_bias_max=%d must be > 0", p->alibi_bias_max);
  }
  const int group = p->num_heads / p->num_kv_heads;
  const int64_t rows = static_cast<int64_t>(p->seqlen_q) * group;
  if (rows > (1LL << 30) || static_cast<int64_t>(p->batch) * p->num_kv_heads > 65535 ||
      static_cast<int64_t>(p->batch) * p->num_heads * p->seqlen_q > 0x7fffffffLL) {
    return fail(VLMX_ERR_UNSUPPORTED, "flash_attention: grid too large (batch*num_kv_heads=%lld must be <= 65535, "
                "seqlen_q*group=%lld <= 2^30); split the batch", static_cast<long long>(p->batch) * p->num_kv_heads,
                static_cast<long long>(rows));
  }
  if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->o)) {
    return fail(VLMX_ERR_MISALIGNED, "flash_attention: q/k/v/o must be 16-byte aligned (8 halves), got q=%p k=%p "
                "v=%p o=%p; pass contiguous tensors", p->q, p->k, p->v, p->o);
  }
  const int64_t strides[12] = {p->q_stride_b, p->q_stride_s, p->q_stride_h, p->k_stride_b, p->k_stride_s,
                               p->k_stride_h, p->v_stride_b, p->v_stride_s, p->v_stride_h, p->o_stride_b,
                               p->o_stride_s, p->o_stride_h};
  for (int i = 0; i < 12; ++i) {
    if (!stride_ok(strides[i])) {
      return fail(VLMX_ERR_MISALIGNED, "flash_attention: stride #%d (q_b,q_s,q_h,k_b,...,o_h) is %lld; strides must "
                  "be non-negative multiples of 8 elements for 16-byte loads", i, static_cast<long long>(strides[i]));
    }
  }
  if (p->bias && ((reinterpret_cast<uintptr_t>(p->bias) & 1u) || p->bias_stride_b < 0 || p->bias_stride_h < 0 ||
                  p->bias_stride_q < 0)) {
    return fail(VLMX_ERR_MISALIGNED, "flash_attention: bias must be 2-byte aligned with non-negative strides");
  }
  FaArgs a{};
  a.q = static_cast<const half*>(p->q);
  a.k = static_cast<const half*>(p->k);
  a.v = static_cast<const half*>(p->v);
  a.o = static_cast<half*>(p->o);
  a.bias = static_cast<const half*>(p->bias);
  a.batch = p->batch, a.seqlen_q = p->seqlen_q, a.seqlen_k = p->seqlen_k;
  a.num_heads = p->num_heads, a.num_kv_heads = p->num_kv_heads, a.group = group, a.rows = static_cast<int>(rows);
  a.q_sb = p->q_stride_b, a.q_ss = p->q_stride_s, a.q_sh = p->q_stride_h;
  a.k_sb = p->k_stride_b, a.k_ss = p->k_stride_s, a.k_sh = p->k_stride_h;
  a.v_sb = p->v_stride_b, a.v_ss = p->v_stride_s, a.v_sh = p->v_stride_h;
  a.o_sb = p->o_stride_b, a.o_ss = p->o_stride_s, a.o_sh = p->o_stride_h;
  a.bias_sb = p->bias_stride_b, a.bias_sh = p->bias_stride_h, a.bias_sq = p->bias_stride_q;
  const float scale = p->scale != 0.f ? p->scale : 1.f / sqrtf(static_cast<float>(p->head_dim));
  a.scale_log2 = scale * kLog2e;
  a.causal = p->causal != 0, a.window = p->window, a.alibi = p->alibi != 0, a.alibi_bias_max = p->alibi_bias_max;
  a.alibi_pow2 = 1;
  while (a.alibi_pow2 < p->num_heads) a.alibi_pow2 *= 2;
  if (p->workspace_bytes < 0 || (p->workspace_bytes > 0 && !aligned16(p->workspace))) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "flash_attention: workspace %p of %lld bytes must be 16-byte aligned "
                "(or NULL with 0 bytes: no split-KV)", p->workspace, static_cast<long long>(p->workspace_bytes));
  }
  void* ws = p->workspace_bytes > 0 ? p->workspace : nullptr;
  switch (p->head_dim) {
    case 64: return launch_head_dim<64>(a, ws, p->workspace_bytes, stream);
    case 72: return launch_head_dim<72>(a, ws, p->workspace_bytes, stream);
    case 80: return launch_head_dim<80>(a, ws, p->workspace_bytes, stream);
    case 96: return launch_head_dim<96>(a, ws, p->workspace_bytes, stream);
    default: return launch_head_dim<128>(a, ws, p->workspace_bytes, stream);
  }
}

extern "C" int64_t vlmx_flash_attention_workspace_size(const vlmx_attention_params* p) {
  return vlmx_fa_workspace_bytes(p);
}

// W8A8 GEMM for decode-sized M (1..16 tokens): weight streaming with split-K, sm_75 and later.
//
// Why a second algorithm: at M <= 16 the 128 x 128 tile GEMM (w8a8_gemm.cu) launches N / 128 CTAs that each walk
// all of K through shared memory with two barriers per 64-byte step; it reads the weights at 6-7 % of copy
// bandwidth on an H200 (bench/results/kernels_h200_lm.md). Decode is a weight read, so this kernel only streams W.
//
// y^T[N, M] = W[N, K] x^T[K, M] with W as the A operand of mma.sync.m8n8k16 (8 output channels) and the tokens as
// B (8 tokens; M > 8 takes a second product on the same A fragment). Fragments come straight from global memory:
// a lane reads 16 contiguous bytes of one weight row and the same 16 bytes of its token's x row, and word j of
// them is its k-slice of the j-th k16 product. That permutes k identically in A and B, so the exact int32 sum is
// unchanged, while every 4 lanes read 64 contiguous bytes of a row (whole 32-byte sectors, no shared memory).
// One CTA = 16 output channels x all of K; its warps take interleaved 64-byte K steps (the CTA sweeps each row 512
// contiguous bytes at a time) and add their int32 partials in shared memory (exact, order-free). No cp.async on
// Turing: the registers are the staging buffer (the next kUnroll steps load while the current ones multiply).
#include "w8a8_common.cuh"

namespace vlmx {
namespace {

// ------------------------------------------------------------------------------------------------ traits table
constexpr int kRows = 16;              // output channels per CTA: two m8 groups share every x fragment
constexpr int kGroups = kRows / 8;
constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kStep = 64;              // K bytes per warp step: 4 lanes x 16 bytes per row
// Warp steps per batch; the next batch is in flight while one is multiplied (double buffering below). 2 steps =
// 64 B of weights per lane per batch at 72-99 registers (sm_90 ptxas): 3 CTAs = 768 threads per SM, ~48 KB of
// weights in flight per SM, about what the H200's bandwidth-latency product asks for (a T4 needs far less). 4 steps
// need 139-159 registers (1 CTA per SM: fewer bytes in flight, and N = 4096 takes two waves).
// VLMX_W8A8_DECODE_UNROLL overrides it for tuning builds (--define; scripts/device_decode_kernels.sh times 1 and 4).
#ifndef VLMX_W8A8_DECODE_UNROLL
#define VLMX_W8A8_DECODE_UNROLL 2
#endif
constexpr int kUnroll = VLMX_W8A8_DECODE_UNROLL;
constexpr int kMaxTokens = VLMX_W8A8_DECODE_MAX_M;
static_assert(kRows * kMaxTokens == kThreads, "the reduction gives every thread one (channel, token) output");
static_assert(kMaxTokens % 8 == 0, "tokens come in m8n8k16 groups of 8");

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// kUnroll warp steps (s0, s0 + kWarps, ...) of weight and activation fragments; out-of-range chunks are zeros.
template <int TG>
__device__ __forceinline__ void load_batch(uint4 (&wv)[kUnroll][kGroups], uint4 (&xv)[kUnroll][TG],
                                           const int8_t* (&wrow)[kGroups], const bool (&wok)[kGroups],
                                           const int8_t* (&xrow)[TG], const bool (&xok)[TG], int s0, int64_t K,
                                           int c) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t k = static_cast<int64_t>(s0 + u * kWarps) * kStep;
    const bool kok = k + c * 16 < K;  // K % 16 == 0: a lane's 16 bytes are all in range or all out
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      // Weights are read once per call: streaming loads keep them from evicting x (reused by every CTA) in L2.
      wv[u][gi] = (kok && wok[gi]) ? __ldcs(reinterpret_cast<const uint4*>(wrow[gi] + k)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int t = 0; t < TG; ++t) {
      xv[u][t] = (kok && xok[t]) ? __ldg(reinterpret_cast<const uint4*>(xrow[t] + k)) : make_uint4(0, 0, 0, 0);
    }
  }
}

// TG: token groups of 8 (1 for M <= 8, 2 for M <= 16).
template <Epilogue E, int TG>
__global__ void __launch_bounds__(kThreads) w8a8_decode_kernel(const GemmArgs g) {
  __shared__ int32_t red[kWarps][kRows][8 * TG];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 4, c = lane % 4;
  const int n0 = blockIdx.x * kRows;
  const int64_t K = g.K;

  const int8_t* wrow[kGroups];
  bool wok[kGroups];
#pragma unroll
  for (int gi = 0; gi < kGroups; ++gi) {
    const int n = n0 + gi * 8 + r;
    wok[gi] = n < g.N;
    wrow[gi] = g.w + (wok[gi] ? n : 0) * K + c * 16;
  }
  const int8_t* xrow[TG];
  bool xok[TG];
#pragma unroll
  for (int t = 0; t < TG; ++t) {
    const int m = t * 8 + r;
    xok[t] = m < g.M;  // rows past M are zero B columns: their outputs are never written
    xrow[t] = g.x + (xok[t] ? m : 0) * K + c * 16;
  }

  int32_t acc[kGroups][TG][2];
#pragma unroll
  for (int gi = 0; gi < kGroups; ++gi)
#pragma unroll
    for (int t = 0; t < TG; ++t) acc[gi][t][0] = acc[gi][t][1] = 0;

  // Register double buffering: the next batch of kUnroll steps is loaded while this one is multiplied. Issuing
  // loads and products of one batch in program order is not enough: ptxas for sm_90 (also when the driver JITs the
  // compute_75 PTX) sinks each load next to its first product, leaving one step in flight; a load whose value is
  // only used in the next loop iteration cannot be sunk past the products of this one.
  const int steps = static_cast<int>((K + kStep - 1) / kStep);
  constexpr int kStride = kWarps * kUnroll;
  uint4 wv[kUnroll][kGroups], xv[kUnroll][TG];
  load_batch<TG>(wv, xv, wrow, wok, xrow, xok, warp, K, c);
  for (int s0 = warp; s0 < steps; s0 += kStride) {
    uint4 wn[kUnroll][kGroups], xn[kUnroll][TG];
    const bool more = s0 + kStride < steps;  // warp-uniform
    if (more) load_batch<TG>(wn, xn, wrow, wok, xrow, xok, s0 + kStride, K, c);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi)
#pragma unroll
          for (int t = 0; t < TG; ++t) mma_m8n8k16(acc[gi][t], word(wv[u][gi], j), word(xv[u][t], j));
    if (more) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi) wv[u][gi] = wn[u][gi];
#pragma unroll
        for (int t = 0; t < TG; ++t) xv[u][t] = xn[u][t];
      }
    }
  }

  // C fragment: channel gi * 8 + lane / 4, tokens t * 8 + 2 * (lane % 4) and +1.
#pragma unroll
  for (int gi = 0; gi < kGroups; ++gi)
#pragma unroll
    for (int t = 0; t < TG; ++t) {
      red[warp][gi * 8 + r][t * 8 + c * 2] = acc[gi][t][0];
      red[warp][gi * 8 + r][t * 8 + c * 2 + 1] = acc[gi][t][1];
    }
  __syncthreads();

  // Thread -> (channel tid % 16, token tid / 16): consecutive threads write consecutive channels of one token row.
  const int nl = threadIdx.x % kRows, m = threadIdx.x / kRows;
  if (m >= 8 * TG) return;  // TG = 1: the upper half of the CTA has no output (no barrier follows)
  const int n = n0 + nl;
  const bool ok = n < g.N && m < g.M;
  int32_t sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += red[w][nl][m];
  if (E == Epilogue::kInt32) {
    if (ok) g.y_i32[static_cast<int64_t>(m) * g.N + n] = sum;
    return;
  }
  float absmax = 0.f;
  if (ok) {
    const float b = g.bias ? __half2float(g.bias[n]) : 0.f;
    const half h = __float2half_rn(dequantize(sum, g.x_scale[m], g.w_scale[n], b));
    g.y_fp16[static_cast<int64_t>(m) * g.N + n] = h;
    absmax = fabsf(__half2float(h));  // the next layer quantizes the rounded fp16 y
  }
  if (g.row_absmax) {  // the 16 lanes of one token row sit in one half-warp
#pragma unroll
    for (int off = 1; off < kRows; off *= 2) absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, off));
    if (nl == 0 && m < g.M) atomicMax(reinterpret_cast<unsigned int*>(g.row_absmax + m), __float_as_uint(absmax));
  }
}

template <Epilogue E>
void launch_tokens(const GemmArgs& g, cudaStream_t stream) {
  const dim3 grid((g.N + kRows - 1) / kRows);
  if (g.M <= 8) {
    w8a8_decode_kernel<E, 1><<<grid, kThreads, 0, stream>>>(g);
  } else {
    w8a8_decode_kernel<E, 2><<<grid, kThreads, 0, stream>>>(g);
  }
}

}  // namespace

vlmx_status launch_w8a8_decode(const GemmArgs& g, Epilogue e, cudaStream_t stream) {
  if (g.M > kMaxTokens) {
    return fail(VLMX_ERR_UNSUPPORTED, "w8a8 decode GEMM: M=%d tokens exceed %d; use the tiled path", g.M,
                kMaxTokens);
  }
  if ((g.N + kRows - 1) / kRows > 0x7fffffff / 2) {
    return fail(VLMX_ERR_UNSUPPORTED, "w8a8 decode GEMM: N=%d exceeds the grid limit", g.N);
  }
  if (e == Epilogue::kInt32) {
    launch_tokens<Epilogue::kInt32>(g, stream);
  } else {
    launch_tokens<Epilogue::kScaleFp16>(g, stream);
  }
  return check_launch(e == Epilogue::kInt32 ? "w8a8_decode_kernel<int32>" : "w8a8_decode_kernel<fp16>");
}

}  // namespace vlmx

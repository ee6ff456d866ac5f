// W8A8 GEMM for sm_75 and later: y = x[M,K] @ w[N,K]^T with int8 operands and exact int32 accumulation
// (mma.sync.m8n8k16, the Turing IMMA shape), followed by one of three epilogues:
//   kInt32     -> y_i32 (exactness tests, the building block)
//   kScaleFp16 -> y = fp16(acc * x_scale[m] * w_scale[n] + bias[n])   (W8A8OF16LinearDynamicInputScale)
//   + per-token quantization of y for the next W8A8 layer: the epilogue folds each tile's row |y| maximum into
//     y_q_scale with atomicMax (non-negative floats order like their bit patterns), then a light pass divides.
//
// Tiling: 128 x 128 CTA tile, 8 warps in a 2 (M) x 4 (N) grid of 64 x 32 warp tiles, K in 64-byte steps.
// Both operands are K-contiguous, so an 8x16 int8 block is an 8x8 b16 matrix to ldmatrix and comes out in
// exactly the m8n8k16 A (row) and B (col) fragment layouts. No cp.async on Turing: the next K step is staged in
// registers while the current one is multiplied (one shared buffer: 40 KB would cap a T4 SM at one CTA).
// M <= VLMX_W8A8_DECODE_MAX_M (decode) goes to the weight-streaming kernel of w8a8_decode.cu instead.
#include <math.h>

#include <algorithm>

#include "w8a8_common.cuh"

namespace vlmx {
namespace {

// ------------------------------------------------------------------------------------------------ traits table
constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 64;  // K in int8 elements (bytes)
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = kWarpsM * kWarpsN * 32;
constexpr int kWarpM = kBlockM / kWarpsM, kWarpN = kBlockN / kWarpsN;  // 64 x 32
constexpr int kFragsM = kWarpM / 8, kFragsN = kWarpN / 8;                 // 8 x 4 m8n8 tiles per warp
// 80-byte rows = 5 chunks of 16 bytes (odd): the 8 row addresses of an ldmatrix hit 8 distinct 4-bank groups.
constexpr int kPitch = kBlockK + 16;
constexpr int kChunksPerRow = kBlockK / 16;
constexpr int kLoads = kBlockM * kChunksPerRow / kThreads;  // uint4 per thread per operand per K step
constexpr float kQmax = 127.f, kQuantEps = 1e-6f;

// Rows past M/N and chunks past K read as zeros: they add nothing to the exact int32 sums.
__device__ __forceinline__ void load_tile_regs(uint4 (&regs)[kLoads], const int8_t* src, int rows, int row0, int K,
                                               int k0) {
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int row = c / kChunksPerRow, kc = k0 + (c % kChunksPerRow) * 16;
    regs[i] = make_uint4(0, 0, 0, 0);
    if (row0 + row < rows && kc < K) {
      regs[i] = __ldg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row0 + row) * K + kc));
    }
  }
}

__device__ __forceinline__ void store_tile_regs(int8_t* tile, const uint4 (&regs)[kLoads]) {
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    *reinterpret_cast<uint4*>(tile + (c / kChunksPerRow) * kPitch + (c % kChunksPerRow) * 16) = regs[i];
  }
}

// One 64-byte K step of the warp tile: 4 k16 slices x (8 x 4) m8n8k16 products.
__device__ __forceinline__ void warp_tile_mma(int32_t (&acc)[kFragsM][kFragsN][2], const int8_t* sa, const int8_t* sb,
                                              int lane) {
#pragma unroll
  for (int ks = 0; ks < kBlockK / 16; ++ks) {
    uint32_t a[kFragsM], b[kFragsN];
#pragma unroll
    for (int m4 = 0; m4 < kFragsM / 4; ++m4) {
      uint32_t r[4];
      ldmatrix_x4(r, sa + (m4 * 32 + lane) * kPitch + ks * 16);
#pragma unroll
      for (int i = 0; i < 4; ++i) a[m4 * 4 + i] = r[i];
    }
    {
      uint32_t r[4];
      ldmatrix_x4(r, sb + lane * kPitch + ks * 16);
#pragma unroll
      for (int i = 0; i < 4; ++i) b[i] = r[i];
    }
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) mma_m8n8k16(acc[mi][ni], a[mi], b[ni]);
  }
}

template <Epilogue E>
__global__ void __launch_bounds__(kThreads, 2) int8_gemm_kernel(const GemmArgs g) {
  __shared__ __align__(16) int8_t sa[kBlockM * kPitch];
  __shared__ __align__(16) int8_t sb[kBlockN * kPitch];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int m0 = blockIdx.y * kBlockM, n0 = blockIdx.x * kBlockN;

  int32_t acc[kFragsM][kFragsN][2];
#pragma unroll
  for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = 0;

  uint4 ra[kLoads], rb[kLoads];
  load_tile_regs(ra, g.x, g.M, m0, g.K, 0);
  load_tile_regs(rb, g.w, g.N, n0, g.K, 0);
  store_tile_regs(sa, ra);
  store_tile_regs(sb, rb);
  __syncthreads();
  for (int k0 = 0; k0 < g.K; k0 += kBlockK) {
    const bool has_next = k0 + kBlockK < g.K;
    if (has_next) {  // global loads in flight during the tensor-core work below
      load_tile_regs(ra, g.x, g.M, m0, g.K, k0 + kBlockK);
      load_tile_regs(rb, g.w, g.N, n0, g.K, k0 + kBlockK);
    }
    warp_tile_mma(acc, sa + wm * kWarpM * kPitch, sb + wn * kWarpN * kPitch, lane);
    __syncthreads();
    if (has_next) {
      store_tile_regs(sa, ra);
      store_tile_regs(sb, rb);
      __syncthreads();
    }
  }

  // C fragment: row g = lane / 4, columns 2 * (lane % 4) and +1 of each m8n8 tile.
  const int col_in = (lane & 3) * 2;
#pragma unroll
  for (int mi = 0; mi < kFragsM; ++mi) {
    const int m = m0 + wm * kWarpM + mi * 8 + lane / 4;
    const bool row_ok = m < g.M;
    float xs = 0.f, absmax = 0.f;
    if (E == Epilogue::kScaleFp16 && row_ok) xs = g.x_scale[m];
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni) {
      const int n = n0 + wn * kWarpN + ni * 8 + col_in;
      if (!row_ok || n >= g.N) continue;
      const bool pair = n + 1 < g.N;
      if (E == Epilogue::kInt32) {
        int32_t* dst = g.y_i32 + static_cast<int64_t>(m) * g.N + n;
        if (pair && (g.N % 2 == 0)) {
          *reinterpret_cast<int2*>(dst) = make_int2(acc[mi][ni][0], acc[mi][ni][1]);
        } else {
          dst[0] = acc[mi][ni][0];
          if (pair) dst[1] = acc[mi][ni][1];
        }
      } else {
        const float b0 = g.bias ? __half2float(g.bias[n]) : 0.f;
        const half h0 = __float2half_rn(dequantize(acc[mi][ni][0], xs, g.w_scale[n], b0));
        half h1 = __float2half_rn(0.f);
        if (pair) {
          const float b1 = g.bias ? __half2float(g.bias[n + 1]) : 0.f;
          h1 = __float2half_rn(dequantize(acc[mi][ni][1], xs, g.w_scale[n + 1], b1));
        }
        half* dst = g.y_fp16 + static_cast<int64_t>(m) * g.N + n;
        if (pair && (g.N % 2 == 0)) {
          *reinterpret_cast<__half2*>(dst) = __halves2half2(h0, h1);
        } else {
          dst[0] = h0;
          if (pair) dst[1] = h1;
        }
        // The next layer quantizes the fp16 y it reads, so the maximum is taken over the rounded values.
        absmax = fmaxf(absmax, fabsf(__half2float(h0)));
        if (pair) absmax = fmaxf(absmax, fabsf(__half2float(h1)));
      }
    }
    if (E == Epilogue::kScaleFp16 && g.row_absmax) {
      absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, 1));
      absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, 2));
      if (row_ok && (lane & 3) == 0) {
        atomicMax(reinterpret_cast<unsigned int*>(g.row_absmax + m), __float_as_uint(absmax));
      }
    }
  }
}

// y_q = rint(y / scale) in [-127, 127] with scale = max(absmax, 1e-6) / 127: the vlmx::quantize_per_token rule
// (true division and round-half-even, bit-identical to the torch reference). One CTA per row.
__global__ void quantize_rows_kernel(const half* y, float* scale_io, int8_t* y_q, int N) {
  const int64_t m = blockIdx.x;
  const float scale = fmaxf(scale_io[m], kQuantEps) / kQmax;
  __syncthreads();  // every thread has read the |y| maximum before thread 0 overwrites it with the scale
  if (threadIdx.x == 0) scale_io[m] = scale;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    const float q = rintf(__fdiv_rn(__half2float(y[m * N + n]), scale));
    y_q[m * N + n] = static_cast<int8_t>(fminf(fmaxf(q, -kQmax), kQmax));
  }
}

vlmx_status check_gemm_args(const char* op, const int8_t* x, const int8_t* w, const void* y, int M, int N, int K) {
  if (!x || !w || !y) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "%s: x, w and y must be device pointers, got x=%p w=%p y=%p", op, x, w, y);
  }
  if (M <= 0 || N <= 0 || K <= 0) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "%s: M, N, K must be positive, got M=%d N=%d K=%d", op, M, N, K);
  }
  if (K % 16 != 0) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "%s: K=%d must be a multiple of 16 (the m8n8k16 k-step); pad the "
                "input features with zeros", op, K);
  }
  if ((M + kBlockM - 1) / kBlockM > 65535) {
    return fail(VLMX_ERR_UNSUPPORTED, "%s: M=%d rows exceed the grid limit of %d; split the batch", op, M,
                65535 * kBlockM);
  }
  if (!aligned16(x) || !aligned16(w)) {
    return fail(VLMX_ERR_MISALIGNED, "%s: x and w must be 16-byte aligned, got x=%p w=%p; pass contiguous tensors",
                op, x, w);
  }
  return VLMX_OK;
}

// The path a launch with M rows takes: AUTO picks the decode GEMM for M <= VLMX_W8A8_DECODE_MAX_M.
vlmx_status resolve_path(const char* op, int path, int M, bool* decode) {
  if (path != VLMX_GEMM_AUTO && path != VLMX_GEMM_TILED && path != VLMX_GEMM_DECODE) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "%s: path=%d; expected 0 (auto), 1 (tiled) or 2 (decode)", op, path);
  }
  if (path == VLMX_GEMM_DECODE && M > VLMX_W8A8_DECODE_MAX_M) {
    return fail(VLMX_ERR_UNSUPPORTED, "%s: the decode GEMM takes M <= %d rows, got M=%d; use path 0 or 1", op,
                VLMX_W8A8_DECODE_MAX_M, M);
  }
  *decode = path == VLMX_GEMM_DECODE || (path == VLMX_GEMM_AUTO && M <= VLMX_W8A8_DECODE_MAX_M);
  return VLMX_OK;
}

}  // namespace
}  // namespace vlmx

extern "C" vlmx_status vlmx_int8_gemm_i32_path(const int8_t* x, const int8_t* w, int32_t* y, int M, int N, int K,
                                               int path, cudaStream_t stream) {
  using namespace vlmx;
  clear_error();
  vlmx_status st = check_gemm_args("int8_gemm_i32", x, w, y, M, N, K);
  if (st != VLMX_OK) return st;
  if (reinterpret_cast<uintptr_t>(y) & 3u) {
    return fail(VLMX_ERR_MISALIGNED, "int8_gemm_i32: y=%p must be 4-byte aligned", static_cast<void*>(y));
  }
  bool decode = false;
  if ((st = resolve_path("int8_gemm_i32", path, M, &decode)) != VLMX_OK) return st;
  GemmArgs g{x, w, y, nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K};
  if (decode) return launch_w8a8_decode(g, Epilogue::kInt32, stream);
  dim3 grid((N + kBlockN - 1) / kBlockN, (M + kBlockM - 1) / kBlockM);
  int8_gemm_kernel<Epilogue::kInt32><<<grid, kThreads, 0, stream>>>(g);
  return check_launch("int8_gemm_kernel<int32>");
}

extern "C" vlmx_status vlmx_int8_gemm_i32(const int8_t* x, const int8_t* w, int32_t* y, int M, int N, int K,
                                          cudaStream_t stream) {
  return vlmx_int8_gemm_i32_path(x, w, y, M, N, K, VLMX_GEMM_AUTO, stream);
}

extern "C" vlmx_status vlmx_w8a8_linear_path(const int8_t* x, const float* x_scale, const int8_t* w,
                                             const float* w_scale, const void* bias_fp16, void* y_fp16, int8_t* y_q,
                                             float* y_q_scale, int M, int N, int K, int path, cudaStream_t stream) {
  using namespace vlmx;
  clear_error();
  vlmx_status st = check_gemm_args("w8a8_linear", x, w, y_fp16, M, N, K);
  if (st != VLMX_OK) return st;
  if (!x_scale || !w_scale) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "w8a8_linear: x_scale [M] and w_scale [N] are required, got %p and %p",
                x_scale, w_scale);
  }
  if ((y_q == nullptr) != (y_q_scale == nullptr)) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "w8a8_linear: pass both y_q and y_q_scale to quantize the output, or "
                "neither (got y_q=%p y_q_scale=%p)", static_cast<void*>(y_q), static_cast<void*>(y_q_scale));
  }
  if ((reinterpret_cast<uintptr_t>(y_fp16) & 1u) || (reinterpret_cast<uintptr_t>(bias_fp16) & 1u) ||
      (reinterpret_cast<uintptr_t>(x_scale) & 3u) || (reinterpret_cast<uintptr_t>(w_scale) & 3u) ||
      (reinterpret_cast<uintptr_t>(y_q_scale) & 3u)) {
    return fail(VLMX_ERR_MISALIGNED, "w8a8_linear: y/bias must be 2-byte and the scales 4-byte aligned");
  }
  bool decode = false;
  if ((st = resolve_path("w8a8_linear", path, M, &decode)) != VLMX_OK) return st;
  if (y_q_scale) {
    cudaError_t err = cudaMemsetAsync(y_q_scale, 0, static_cast<size_t>(M) * sizeof(float), stream);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return fail(VLMX_ERR_CUDA, "w8a8_linear: clearing y_q_scale failed: %s", cudaGetErrorString(err));
    }
  }
  GemmArgs g{x, w, nullptr, static_cast<half*>(y_fp16), x_scale, w_scale, static_cast<const half*>(bias_fp16),
             y_q_scale, M, N, K};
  if (decode) {
    st = launch_w8a8_decode(g, Epilogue::kScaleFp16, stream);
  } else {
    dim3 grid((N + kBlockN - 1) / kBlockN, (M + kBlockM - 1) / kBlockM);
    int8_gemm_kernel<Epilogue::kScaleFp16><<<grid, kThreads, 0, stream>>>(g);
    st = check_launch("int8_gemm_kernel<fp16>");
  }
  if (st != VLMX_OK || !y_q) return st;
  quantize_rows_kernel<<<M, std::min(256, ((N + 31) / 32) * 32), 0, stream>>>(static_cast<const half*>(y_fp16),
                                                                              y_q_scale, y_q, N);
  return check_launch("quantize_rows_kernel");
}

extern "C" vlmx_status vlmx_w8a8_linear(const int8_t* x, const float* x_scale, const int8_t* w, const float* w_scale,
                                        const void* bias_fp16, void* y_fp16, int8_t* y_q, float* y_q_scale, int M,
                                        int N, int K, cudaStream_t stream) {
  return vlmx_w8a8_linear_path(x, x_scale, w, w_scale, bias_fp16, y_fp16, y_q, y_q_scale, M, N, K, VLMX_GEMM_AUTO,
                               stream);
}

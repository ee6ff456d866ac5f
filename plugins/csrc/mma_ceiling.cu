// Tensor-core ceilings of the two Turing instructions the vlmx kernels are built from, measured on the GPU at hand:
// every warp issues long chains of independent mma.sync on register operands (no memory traffic), so the rate is
// the instruction's peak through whatever path runs it (native SASS, or compute_75 PTX through the driver JIT).
// Benchmark-only entry points; they are not part of vlmx_kernels.h.
#include "common.cuh"

namespace vlmx {
namespace {

constexpr int kChains = 8;  // independent accumulators per warp: enough to cover the mma pipeline latency

__global__ void mma_f16_ceiling_kernel(int iters, float* sink) {
  float acc[kChains][4] = {};
  const uint32_t a[2] = {0x3c003c00u ^ threadIdx.x, 0x3c003c00u};
  const uint32_t b = 0x3c003c00u + blockIdx.x;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) mma_m16n8k8(acc[c], a, b);
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  if (s == 1234.5f) sink[threadIdx.x] = s;  // keeps the chains alive without a store per thread
}

__global__ void mma_s8_ceiling_kernel(int iters, int32_t* sink) {
  int32_t acc[kChains][2] = {};
  const uint32_t a = 0x01010101u ^ threadIdx.x, b = 0x01010101u + blockIdx.x;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) mma_m8n8k16(acc[c], a, b);
  }
  int32_t s = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += acc[c][0] + acc[c][1];
  if (s == 1234567) sink[threadIdx.x] = s;
}

}  // namespace
}  // namespace vlmx

// kind 0: m16n8k8 fp16 -> fp32, kind 1: m8n8k16 s8 -> s32. Returns the operations one launch performs in *ops
// (2 per multiply-add); time the launch with events on `stream`. sink: >= threads_per_block elements, never read.
extern "C" vlmx_status vlmx_bench_mma_ceiling(int kind, int blocks, int threads_per_block, int iters, void* sink,
                                              double* ops, cudaStream_t stream) {
  using namespace vlmx;
  clear_error();
  if (blocks <= 0 || iters <= 0 || threads_per_block <= 0 || threads_per_block % 32 || threads_per_block > 1024 ||
      !sink || !ops || (kind != 0 && kind != 1)) {
    return fail(VLMX_ERR_INVALID_ARGUMENT, "bench_mma_ceiling: kind must be 0 or 1, blocks/iters > 0, threads a "
                "multiple of 32 up to 1024, sink and ops non-NULL");
  }
  const double warps = static_cast<double>(blocks) * (threads_per_block / 32);
  const double per_mma = kind == 0 ? 2.0 * 16 * 8 * 8 : 2.0 * 8 * 8 * 16;
  *ops = warps * iters * kChains * per_mma;
  if (kind == 0) {
    mma_f16_ceiling_kernel<<<blocks, threads_per_block, 0, stream>>>(iters, static_cast<float*>(sink));
  } else {
    mma_s8_ceiling_kernel<<<blocks, threads_per_block, 0, stream>>>(iters, static_cast<int32_t*>(sink));
  }
  return check_launch("mma_ceiling_kernel");
}

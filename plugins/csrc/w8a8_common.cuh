// What the two W8A8 GEMM algorithms share (w8a8_gemm.cu: the m8n8k16 tile GEMM for prefill-sized M;
// w8a8_decode.cu: the weight-streaming split-K GEMM for decode-sized M): arguments, epilogue kinds and the
// dequantization rule, so both paths round exactly alike.
#ifndef VLMX_W8A8_COMMON_CUH_
#define VLMX_W8A8_COMMON_CUH_

#include "common.cuh"

namespace vlmx {

enum class Epilogue { kInt32, kScaleFp16 };

struct GemmArgs {
  const int8_t* x;
  const int8_t* w;
  int32_t* y_i32;
  half* y_fp16;
  const float* x_scale;
  const float* w_scale;
  const half* bias;
  float* row_absmax;  // y_q_scale doubles as the |y| max accumulator when quantizing (nullptr otherwise)
  int M, N, K;
};

// acc -> fp32 exactly as the reference: (float(acc) * x_scale) * w_scale + bias, no fused multiply-add.
__device__ __forceinline__ float dequantize(int32_t acc, float xs, float ws, float bias) {
  return __fadd_rn(__fmul_rn(__fmul_rn(static_cast<float>(acc), xs), ws), bias);
}

// The decode GEMM (w8a8_decode.cu) for M <= VLMX_W8A8_DECODE_MAX_M; arguments already checked by the caller.
vlmx_status launch_w8a8_decode(const GemmArgs& g, Epilogue e, cudaStream_t stream);

}  // namespace vlmx

#endif  // VLMX_W8A8_COMMON_CUH_

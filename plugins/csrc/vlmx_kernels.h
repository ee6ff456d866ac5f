// vlmx kernel C ABI: shared by the TensorRT plugins, the torch custom ops and the tests.
//
// Every launcher checks its arguments before launching, returns VLMX_OK or an error code, and never aborts or
// writes out of bounds. vlmx_last_error() returns a thread-local message describing the last failure.
// Pointers are device pointers; strides are in elements; the innermost (head_dim / K / N) stride is 1.
#ifndef VLMX_KERNELS_H_
#define VLMX_KERNELS_H_

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  VLMX_OK = 0,
  VLMX_ERR_INVALID_ARGUMENT = 1,  // null pointer, non-positive size, inconsistent heads
  VLMX_ERR_UNSUPPORTED = 2,       // e.g. head_dim not in {64, 72, 80, 96, 128}
  VLMX_ERR_MISALIGNED = 3,        // pointer or stride not aligned to the vector width the kernel needs
  VLMX_ERR_CUDA = 4,              // a CUDA launch or runtime error (message has cudaGetErrorString)
} vlmx_status;

// Thread-local message for the last non-OK status returned on this thread ("" if none).
const char* vlmx_last_error(void);

// Flash attention forward. fp16 q/k/v/o, fp32 accumulation, online softmax.
// Head h of the query reads kv head h / (num_heads / num_kv_heads).
// Query i (0-based) sees key j when: causal -> j <= i + (seqlen_k - seqlen_q);
//   window >= 0 -> j > i + (seqlen_k - seqlen_q) - window. Fully masked rows produce zeros.
// alibi -> adds slope_h * (j - (seqlen_k - 1)), slope_h from MPT gen_slopes(num_heads, alibi_bias_max).
// bias (optional, fp16) is added to the scores at bias[b*bias_stride_b + h*bias_stride_h + i*bias_stride_q + j];
//   strides of 0 broadcast (a key padding mask is [B,1,1,Sk]: stride_h = stride_q = 0).
// Layouts are expressed through strides: [B,S,H,D] has stride_s = H*D, stride_h = D; packed qkv
//   [B,S,3,H,D] (or [B,S,H+2Hkv,D]) is q/k/v pointers offset into one buffer with a shared stride_s.
typedef struct {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const void* bias;  // may be NULL
  int batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t bias_stride_b, bias_stride_h, bias_stride_q;
  float scale;  // 0 -> 1/sqrt(head_dim)
  int causal;
  int window;  // -1: unlimited
  int alibi;
  int alibi_bias_max;
  // Caller-owned scratch for split-KV partials (decode), 16-byte aligned; NULL / 0 bytes: no split-KV. Size it with
  // vlmx_flash_attention_workspace_size; a smaller one only lowers the split count. Never allocated by the launch.
  void* workspace;
  int64_t workspace_bytes;
} vlmx_attention_params;

vlmx_status vlmx_flash_attention_fwd(const vlmx_attention_params* params, cudaStream_t stream);

// Split-KV limits of vlmx_flash_attention_fwd: at most this many key splits, at least 4 tiles of >= 32 keys.
#define VLMX_FA_MAX_SPLITS 64
#define VLMX_FA_MIN_SPLIT_KEYS 128
// Cap on the split-KV workspace (a smaller workspace only lowers the split count; decode needs ~1 MiB).
#define VLMX_FA_MAX_SPLIT_WORKSPACE_BYTES (32ll << 20)

// Bytes of workspace for vlmx_flash_attention_fwd's split-KV at these sizes (pointers and strides ignored; 0:
// never splits). Host-only, needs no GPU, non-decreasing in every size (so the value at a shape profile's maximum
// covers every shape of the profile). Inline so that the TensorRT plugin's getWorkspaceSize needs no kernel symbol.
static inline int64_t vlmx_fa_workspace_bytes(const vlmx_attention_params* p) {
  if (!p || p->batch <= 0 || p->seqlen_q <= 0 || p->seqlen_k < VLMX_FA_MIN_SPLIT_KEYS || p->num_heads <= 0 ||
      p->head_dim <= 0) {
    return 0;
  }
  int64_t per_split = (int64_t)p->batch * p->num_heads * p->seqlen_q * (p->head_dim + 2) * (int64_t)sizeof(float);
  int64_t all = per_split * VLMX_FA_MAX_SPLITS;
  return all < VLMX_FA_MAX_SPLIT_WORKSPACE_BYTES ? all : VLMX_FA_MAX_SPLIT_WORKSPACE_BYTES;
}

// The same, exported for callers without the header (ctypes).
int64_t vlmx_flash_attention_workspace_size(const vlmx_attention_params* params);

// Exact int8 GEMM: y_i32[M,N] = x[M,K] @ w[N,K]^T (row-major, K contiguous). K % 16 == 0.
vlmx_status vlmx_int8_gemm_i32(const int8_t* x, const int8_t* w, int32_t* y, int M, int N, int K,
                               cudaStream_t stream);

// W8A8 linear: y[M,N] = fp16(acc * x_scale[m] * w_scale[n] + bias[n]), acc exact int32. K % 16 == 0.
// bias may be NULL. If y_q is not NULL, also writes the per-token int8 quantization of y
// (y_q[M,N], y_q_scale[M], same rule as vlmx::quantize_per_token) for the next W8A8 layer.
vlmx_status vlmx_w8a8_linear(const int8_t* x, const float* x_scale, const int8_t* w, const float* w_scale,
                             const void* bias_fp16, void* y_fp16, int8_t* y_q, float* y_q_scale, int M, int N,
                             int K, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif  // VLMX_KERNELS_H_

// FlashAttention launch: maps the plugin's layouts (bsd, bhsd, packed qkv) and the optional additive bias onto the
// strided vlmx_attention_params of the CUDA C ABI (plugins/csrc/vlmx_kernels.h).
#include "vlmx_kernels.h"
#include "vlmx_plugin.h"

#include <string>

using namespace nvinfer1;

namespace vlmx {
namespace {

std::string const kPacked = "packed";
std::string const kBhsd = "bhsd";

//! Strides of a bias broadcastable to [B, H, Sq, Sk] (right-aligned, size-1 dims broadcast with stride 0).
void biasStrides(Dims const& d, vlmx_attention_params& p) {
    int64_t shape[4] = {1, 1, 1, 1};
    for (int32_t i = 0; i < d.nbDims && i < 4; ++i) shape[4 - d.nbDims + i] = d.d[i];
    int64_t const sq = shape[3];
    int64_t const sh = shape[2] * sq;
    int64_t const sb = shape[1] * sh;
    p.bias_stride_q = shape[2] == 1 ? 0 : sq;
    p.bias_stride_h = shape[1] == 1 ? 0 : sh;
    p.bias_stride_b = shape[0] == 1 ? 0 : sb;
}

//! The C ABI's parameters for tensors of these dims (pointers from inputs/outputs when given, else null).
vlmx_attention_params attentionParams(OpAttrs const& a, Dims const* dims, int32_t nbIn, void const* const* inputs,
    void* const* outputs) {
    vlmx_attention_params p{};
    std::string const& layout = a.getString("layout");
    int32_t const H = a.getInt("num_heads");
    int32_t const Hkv = a.getInt("num_kv_heads") > 0 ? a.getInt("num_kv_heads") : H;
    int32_t const D = a.getInt("head_dim");
    Dims const& q = dims[0];
    auto input = [&](int32_t i) { return inputs != nullptr ? inputs[i] : nullptr; };
    p.batch = static_cast<int>(q.d[0]);
    p.num_heads = H;
    p.num_kv_heads = Hkv;
    p.head_dim = D;
    int32_t biasPos = -1;
    if (layout == kPacked) {
        int64_t const row = static_cast<int64_t>(H + 2 * Hkv) * D;
        int64_t const S = q.d[1];
        char const* base = static_cast<char const*>(input(0));
        p.q = base;
        p.k = base != nullptr ? base + static_cast<int64_t>(H) * D * 2 : nullptr;  // fp16: 2 bytes per element
        p.v = base != nullptr ? base + static_cast<int64_t>(H + Hkv) * D * 2 : nullptr;
        p.seqlen_q = p.seqlen_k = static_cast<int>(S);
        p.q_stride_b = p.k_stride_b = p.v_stride_b = S * row;
        p.q_stride_s = p.k_stride_s = p.v_stride_s = row;
        p.q_stride_h = p.k_stride_h = p.v_stride_h = D;
        p.o_stride_b = S * H * D;
        p.o_stride_s = static_cast<int64_t>(H) * D;
        p.o_stride_h = D;
        biasPos = nbIn == 2 ? 1 : -1;
    } else {
        Dims const& k = dims[1];
        p.q = input(0);
        p.k = input(1);
        p.v = input(2);
        if (layout == kBhsd) {  // [B, H, S, D]
            p.seqlen_q = static_cast<int>(q.d[2]);
            p.seqlen_k = static_cast<int>(k.d[2]);
            p.q_stride_b = p.o_stride_b = static_cast<int64_t>(H) * q.d[2] * D;
            p.q_stride_h = p.o_stride_h = q.d[2] * D;
            p.q_stride_s = p.o_stride_s = D;
            p.k_stride_b = p.v_stride_b = static_cast<int64_t>(Hkv) * k.d[2] * D;
            p.k_stride_h = p.v_stride_h = k.d[2] * D;
            p.k_stride_s = p.v_stride_s = D;
        } else {  // bsd: [B, S, H*D]
            p.seqlen_q = static_cast<int>(q.d[1]);
            p.seqlen_k = static_cast<int>(k.d[1]);
            p.q_stride_b = p.o_stride_b = q.d[1] * H * D;
            p.q_stride_s = p.o_stride_s = static_cast<int64_t>(H) * D;
            p.q_stride_h = p.o_stride_h = D;
            p.k_stride_b = p.v_stride_b = k.d[1] * Hkv * D;
            p.k_stride_s = p.v_stride_s = static_cast<int64_t>(Hkv) * D;
            p.k_stride_h = p.v_stride_h = D;
        }
        biasPos = nbIn == 4 ? 3 : -1;
    }
    p.o = outputs != nullptr ? outputs[0] : nullptr;
    if (biasPos >= 0) {
        p.bias = input(biasPos);
        biasStrides(dims[biasPos], p);
    }
    p.scale = a.getFloat("scale");
    p.causal = a.getInt("causal");
    p.window = a.getInt("window");
    p.alibi = a.getInt("alibi");
    p.alibi_bias_max = a.getInt("alibi_bias_max");
    return p;
}

}  // namespace

size_t flashAttentionWorkspaceSize(OpAttrs const& a, Dims const* dims, int32_t nbIn) {
    vlmx_attention_params const p = attentionParams(a, dims, nbIn, nullptr, nullptr);
    return static_cast<size_t>(vlmx_fa_workspace_bytes(&p));
}

std::string launchFlashAttention(OpAttrs const& a, PluginTensorDesc const* in, int32_t nbIn, void const* const* inputs,
    void* const* outputs, void* workspace, cudaStream_t stream) {
    Dims dims[4];
    for (int32_t i = 0; i < nbIn && i < 4; ++i) dims[i] = in[i].dims;
    vlmx_attention_params p = attentionParams(a, dims, nbIn, inputs, outputs);
    // TensorRT allocated getWorkspaceSize at the profile maximum; the size function is non-decreasing, so the
    // value for the actual shapes fits in it.
    p.workspace = workspace;
    p.workspace_bytes = workspace != nullptr ? vlmx_fa_workspace_bytes(&p) : 0;
    vlmx_status const st = vlmx_flash_attention_fwd(&p, stream);
    return st == VLMX_OK ? "" : "kernel returned status " + std::to_string(static_cast<int>(st)) + ": " + vlmx_last_error();
}

}  // namespace vlmx

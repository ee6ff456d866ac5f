// Per-op rules of the vlmx plugins: output types and shapes, supported formats, shape checks and the launch.
// FlashAttention and W8A8Linear call the CUDA C ABI (plugins/csrc/vlmx_kernels.h, fp16 only); the memory-bound ops
// launch the AOT-compiled Triton kernels (plugins/triton_kernels.py) through CubinRegistry, with the same kernel
// names and launch values as the torch bindings in plugins/triton_ops.py.
#include "cubin_loader.h"
#include "vlmx_kernels.h"
#include "vlmx_plugin.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <set>
#include <string>

using namespace nvinfer1;

namespace vlmx {
namespace {

std::string const kLayoutPacked = "packed";
std::string const kLayoutBhsd = "bhsd";

//! Op-table input index of TensorRT input `pos` (a packed FlashAttention's second input is its bias).
int32_t inputDefIndex(OpAttrs const& a, int32_t pos, int32_t nbIn) {
    if (a.op() == gen::kFlashAttention && a.getString("layout") == kLayoutPacked && nbIn == 2 && pos == 1) return 3;
    return pos;
}

int64_t volumeExceptLast(Dims const& d) {
    int64_t v = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i) v *= d.d[i];
    return v;
}

int64_t lastDim(Dims const& d) { return d.nbDims > 0 ? d.d[d.nbDims - 1] : 1; }

std::string dtypeName(DataType t) { return t == DataType::kHALF ? "float16" : "float32"; }

//! The float type variable T of an op at this call: the type of the first input declared as T.
DataType floatTypeOf(OpAttrs const& a, PluginTensorDesc const* desc, int32_t nbIn) {
    for (int32_t p = 0; p < nbIn; ++p) {
        if (a.def().inputs[inputDefIndex(a, p, nbIn)].dtype == gen::DType::kT) return desc[p].type;
    }
    return DataType::kHALF;
}

int32_t kvHeads(OpAttrs const& a) {
    int32_t const h = a.getInt("num_kv_heads");
    return h > 0 ? h : a.getInt("num_heads");
}

std::string dimsToString(Dims const& d) {
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
    return s + "]";
}

std::string kernelError(vlmx_status st) {
    return std::string("kernel returned status ") + std::to_string(static_cast<int>(st)) + ": " + vlmx_last_error();
}

std::string tritonLaunch(std::string const& kernel, DataType t, KernelArgs const& args, cudaStream_t stream) {
    return CubinRegistry::instance().launch(kernel, dtypeName(t), args, stream) == 0
        ? "" : CubinRegistry::instance().lastError();
}

std::string cudaCheck(cudaError_t e, char const* what) {
    return e == cudaSuccess ? "" : std::string(what) + " failed: " + cudaGetErrorString(e);
}

}  // namespace

int32_t opNbOutputs(int32_t op) { return gen::kOps[op].nbOutputs; }

std::string opTritonKernel(OpAttrs const& a) {
    switch (a.op()) {
    case gen::kQuantizePerToken: return "quantize_per_token";
    case gen::kGeluQuant: return "gelu_quant";
    case gen::kNormQuant: return "norm_quant";
    case gen::kTokenImportance: return "token_importance";
    case gen::kGatherTopK: return "gather_rows";  // after topk_rank (float32 scores) and topk_compact
    default: return "";
    }
}

std::string opOutputTypes(OpAttrs const& a, DataType const* in, int32_t nbIn, DataType* out, int32_t nbOut) {
    if (nbOut != opNbOutputs(a.op()) || nbIn < 1) return "unexpected number of outputs";
    switch (a.op()) {
    case gen::kFlashAttention: out[0] = in[0]; break;
    case gen::kW8A8Linear:
        out[0] = nbIn == 5 ? in[4] : (a.getString("out_dtype") == "float32" ? DataType::kFLOAT : DataType::kHALF);
        break;
    case gen::kQuantizePerToken:
    case gen::kGeluQuant: out[0] = DataType::kINT8; out[1] = DataType::kFLOAT; break;
    case gen::kNormQuant: out[0] = DataType::kINT8; out[1] = out[2] = DataType::kFLOAT; break;
    case gen::kTokenImportance: out[0] = DataType::kFLOAT; break;
    case gen::kGatherTopK: out[0] = in[0]; out[1] = DataType::kINT64; break;
    default: return "unknown op";
    }
    return "";
}

std::string opOutputShapes(OpAttrs const& a, DimsExprs const* in, int32_t nbIn, DimsExprs const* shapeIn,
    int32_t nbShapeIn, DimsExprs* out, int32_t nbOut, IExprBuilder& eb) {
    if (nbOut != opNbOutputs(a.op()) || nbIn < 1) return "unexpected number of outputs";
    auto lastToOne = [&](DimsExprs d) {
        d.d[d.nbDims - 1] = eb.constant(1);
        return d;
    };
    switch (a.op()) {
    case gen::kFlashAttention:
        out[0] = in[0];
        if (a.getString("layout") == kLayoutPacked) {
            if (in[0].nbDims != 3) return "packed layout needs q of rank 3 [B, S, (H+2*Hkv)*D]";
            out[0].d[2] = eb.constant(static_cast<int64_t>(a.getInt("num_heads")) * a.getInt("head_dim"));
        }
        break;
    case gen::kW8A8Linear:
        if (nbIn < 4 || in[2].nbDims != 2) return "W8A8Linear needs w of rank 2 [N, K]";
        out[0] = in[0];
        out[0].d[in[0].nbDims - 1] = in[2].d[0];
        break;
    case gen::kQuantizePerToken:
    case gen::kGeluQuant: out[0] = in[0]; out[1] = lastToOne(in[0]); break;
    case gen::kNormQuant: out[0] = in[0]; out[1] = out[2] = lastToOne(in[0]); break;
    case gen::kTokenImportance:
        if (nbIn != 2 || in[0].nbDims != 3 || in[1].nbDims != 3) return "TokenImportance needs q_text, k_vis of rank 3";
        out[0].nbDims = 2;
        out[0].d[0] = in[0].d[0];
        out[0].d[1] = in[1].d[1];
        break;
    case gen::kGatherTopK: {
        // keep arrives as a shape input (tensorrt_plugin_shape_input_indices = [2]): its value is the kept-token
        // dimension, so the kept count is known on the host at enqueue (outputs' dims) without a device read.
        if (nbIn != 2 || in[0].nbDims != 3 || nbShapeIn != 1 || shapeIn[0].nbDims != 1) {
            return "GatherTopK needs tensor inputs x [B, N, C], scores [B, N] and keep [1] as a shape input (the "
                   "ONNX node needs tensorrt_plugin_shape_input_indices = [2]; re-export with vlm-export)";
        }
        IDimensionExpr const* kept = shapeIn[0].d[0];
        out[0] = in[0];
        out[0].d[1] = kept;
        out[1].nbDims = 2;
        out[1].d[0] = in[0].d[0];
        out[1].d[1] = kept;
        break;
    }
    default: return "unknown op";
    }
    return "";
}

bool opSupportsFormat(OpAttrs const& a, int32_t pos, PluginTensorDesc const* desc, int32_t nbIn, int32_t nbOut) {
    if (pos < 0 || pos >= nbIn + nbOut) return false;
    PluginTensorDesc const& d = desc[pos];
    if (d.format != TensorFormat::kLINEAR) return false;
    gen::OpDef const& def = a.def();
    gen::DType want;
    if (pos < nbIn) {
        want = def.inputs[inputDefIndex(a, pos, nbIn)].dtype;
    } else {
        int32_t const o = pos - nbIn;
        if (o >= def.nbOutputs) return false;
        want = def.outputs[o].dtype;
    }
    switch (want) {
    case gen::DType::kInt8: return d.type == DataType::kINT8;
    case gen::DType::kInt64: return d.type == DataType::kINT64;
    case gen::DType::kFloat32: return d.type == DataType::kFLOAT;
    case gen::DType::kT: break;
    }
    // T: every tensor naming T shares the type of the first one (TensorRT asks positions in order).
    for (int32_t p = 0; p < pos; ++p) {
        bool const isT = p < nbIn ? def.inputs[inputDefIndex(a, p, nbIn)].dtype == gen::DType::kT
                                  : (p - nbIn < def.nbOutputs && def.outputs[p - nbIn].dtype == gen::DType::kT);
        if (isT) return d.type == desc[p].type;
    }
    if (a.op() == gen::kFlashAttention || a.op() == gen::kW8A8Linear) {
        return d.type == DataType::kHALF;  // the CUDA kernels are fp16 (fp32 accumulation)
    }
    if (d.type != DataType::kHALF && d.type != DataType::kFLOAT) return false;
    CubinRegistry& reg = CubinRegistry::instance();
    bool const ok = reg.has(opTritonKernel(a), dtypeName(d.type))
        && (a.op() != gen::kGatherTopK || (reg.has("topk_rank", "float32") && reg.has("topk_compact", "float32")));
    if (!ok) {
        static std::set<std::string> reported;
        std::string const err = reg.lastError();
        if (reported.insert(err).second) logMessage(ILogger::Severity::kERROR, err);
        return false;
    }
    return true;
}

std::string opCheckAttrs(OpAttrs const& a) {
    if (a.op() == gen::kFlashAttention) {
        int32_t const D = a.getInt("head_dim");
        if (D != 64 && D != 72 && D != 80 && D != 96 && D != 128) {
            return "head_dim " + std::to_string(D) + " is not implemented by the sm_75 flash attention kernel "
                "(64, 72, 80, 96, 128); export this model with --attention native or decomposed";
        }
    }
    if (a.op() == gen::kFlashAttention || a.op() == gen::kTokenImportance) {
        int32_t const H = a.getInt("num_heads");
        if (H <= 0 || a.getInt("head_dim") <= 0 || H % kvHeads(a) != 0) {
            return "num_heads=" + std::to_string(H) + " must be a positive multiple of num_kv_heads="
                + std::to_string(kvHeads(a)) + " and head_dim positive";
        }
    }
    if (a.op() == gen::kTokenImportance && a.getInt("head_dim") > 256) {
        return "head_dim " + std::to_string(a.getInt("head_dim")) + " exceeds the Triton kernel's 256";
    }
    return "";
}

std::string opCheckShapes(OpAttrs const& a, PluginTensorDesc const* in, int32_t nbIn, PluginTensorDesc const* out,
    int32_t nbOut) {
    (void) out;
    (void) nbOut;
    switch (a.op()) {
    case gen::kFlashAttention: {
        int32_t const H = a.getInt("num_heads");
        int32_t const Hkv = kvHeads(a);
        int64_t const D = a.getInt("head_dim");
        if (H <= 0 || D <= 0 || H % Hkv != 0) {
            return "num_heads=" + std::to_string(H) + " must be a positive multiple of num_kv_heads=" + std::to_string(Hkv);
        }
        std::string const& layout = a.getString("layout");
        if (layout == kLayoutPacked) {
            if (lastDim(in[0].dims) != (H + 2 * Hkv) * D) {
                return "packed qkv " + dimsToString(in[0].dims) + " must end in (num_heads + 2*num_kv_heads)*head_dim = "
                    + std::to_string((H + 2 * Hkv) * D);
            }
        } else if (nbIn < 3) {
            return "layout " + layout + " needs q, k and v inputs";
        } else if (layout == kLayoutBhsd) {
            if (in[0].dims.nbDims != 4 || in[0].dims.d[1] != H || in[0].dims.d[3] != D || in[1].dims.d[1] != Hkv) {
                return "bhsd q " + dimsToString(in[0].dims) + " / k " + dimsToString(in[1].dims)
                    + " do not match num_heads, num_kv_heads, head_dim";
            }
        } else if (lastDim(in[0].dims) != H * D || lastDim(in[1].dims) != Hkv * D || lastDim(in[2].dims) != Hkv * D) {
            return "bsd q " + dimsToString(in[0].dims) + ", k " + dimsToString(in[1].dims) + " must end in num_heads*head_dim="
                + std::to_string(H * D) + " and num_kv_heads*head_dim=" + std::to_string(Hkv * D);
        }
        int32_t const biasPos = layout == kLayoutPacked ? (nbIn == 2 ? 1 : -1) : (nbIn == 4 ? 3 : -1);
        if (biasPos >= 0) {
            // The kernel reads bias rows contiguously over keys: only B, H and Sq may broadcast.
            Dims const& b = in[biasPos].dims;
            Dims const& k = layout == kLayoutPacked ? in[0].dims : in[1].dims;
            int64_t const sk = layout == kLayoutBhsd ? k.d[2] : k.d[1];
            if (b.nbDims < 1 || b.nbDims > 4 || lastDim(b) != sk) {
                return "bias " + dimsToString(b) + " must have rank 1..4 and end in the key length " + std::to_string(sk)
                    + " (broadcasting over batch, heads and queries only)";
            }
        }
        break;
    }
    case gen::kW8A8Linear: {
        int64_t const K = lastDim(in[0].dims);
        if (in[2].dims.nbDims != 2 || in[2].dims.d[1] != K) {
            return "w " + dimsToString(in[2].dims) + " must be [N, K] with K = " + std::to_string(K) + " (x's last dim)";
        }
        if (K % 16 != 0) return "K = " + std::to_string(K) + " must be a multiple of 16 for the int8 tensor-core GEMM";
        if (volumeExceptLast(in[1].dims) * lastDim(in[1].dims) != volumeExceptLast(in[0].dims)) {
            return "x_scale " + dimsToString(in[1].dims) + " must hold one scale per token of x " + dimsToString(in[0].dims);
        }
        break;
    }
    case gen::kNormQuant:
        if (lastDim(in[1].dims) != lastDim(in[0].dims)) return "weight must have x's last dim";
        break;
    case gen::kTokenImportance: {
        int64_t const D = a.getInt("head_dim");
        int32_t const H = a.getInt("num_heads");
        int32_t const Hkv = kvHeads(a);
        if (lastDim(in[0].dims) != H * D || lastDim(in[1].dims) != Hkv * D || H % Hkv != 0) {
            return "q_text " + dimsToString(in[0].dims) + " / k_vis " + dimsToString(in[1].dims)
                + " do not match num_heads, num_kv_heads, head_dim";
        }
        break;
    }
    case gen::kGatherTopK:
        if (in[1].dims.nbDims != 2 || in[1].dims.d[0] != in[0].dims.d[0] || in[1].dims.d[1] != in[0].dims.d[1]) {
            return "scores " + dimsToString(in[1].dims) + " must be [B, N] of x " + dimsToString(in[0].dims);
        }
        break;
    default: break;
    }
    return "";
}

size_t opWorkspaceSize(OpAttrs const& a, DynamicPluginTensorDesc const* in, int32_t nbIn) {
    if (nbIn < 1 || in[0].max.nbDims < 2) return 0;
    if (a.op() == gen::kFlashAttention) {
        if (nbIn < (a.getString("layout") == kLayoutPacked ? 1 : 3)) return 0;
        Dims dims[4];
        for (int32_t i = 0; i < nbIn && i < 4; ++i) dims[i] = in[i].max;
        return flashAttentionWorkspaceSize(a, dims, nbIn);
    }
    if (a.op() != gen::kGatherTopK) return 0;
    // topk_rank's kept mask: one int8 per (batch, token) at the profile's largest shape.
    return static_cast<size_t>(in[0].max.d[0] * in[0].max.d[1]);
}

std::string opEnqueue(OpAttrs const& a, PluginTensorDesc const* in, int32_t nbIn, PluginTensorDesc const* out,
    int32_t nbOut, void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) {
    (void) nbOut;
    std::string const err = opCheckShapes(a, in, nbIn, out, nbOut);
    if (!err.empty()) return err;
    DataType const t = floatTypeOf(a, in, nbIn);
    int64_t const rows = volumeExceptLast(in[0].dims);
    int64_t const cols = lastDim(in[0].dims);
    KernelArgs args;
    switch (a.op()) {
    case gen::kFlashAttention: return launchFlashAttention(a, in, nbIn, inputs, outputs, workspace, stream);
    case gen::kW8A8Linear: {
        if (out[0].type != DataType::kHALF) return "only float16 output is implemented by the W8A8 kernel";
        vlmx_status const st = vlmx_w8a8_linear(static_cast<int8_t const*>(inputs[0]),
            static_cast<float const*>(inputs[1]), static_cast<int8_t const*>(inputs[2]),
            static_cast<float const*>(inputs[3]), nbIn == 5 ? inputs[4] : nullptr, outputs[0], nullptr, nullptr,
            static_cast<int>(rows), static_cast<int>(in[2].dims.d[0]), static_cast<int>(cols), stream);
        return st == VLMX_OK ? "" : kernelError(st);
    }
    case gen::kQuantizePerToken:
    case gen::kGeluQuant:
        args.ptr("x_ptr", inputs[0]).ptr("q_ptr", outputs[0]).ptr("scale_ptr", outputs[1]);
        args.i64("C", cols).i64("rows", rows).f32("clip_range", a.getFloat("clip_range"));
        if (a.op() == gen::kGeluQuant) args.i64("approx_tanh", a.getString("approximate") == "tanh" ? 1 : 0);
        break;
    case gen::kNormQuant:
        // Without a bias the kernel still takes a valid pointer (it reads none when has_bias = 0).
        args.ptr("x_ptr", inputs[0]).ptr("w_ptr", inputs[1]).ptr("b_ptr", nbIn == 3 ? inputs[2] : inputs[1]);
        args.ptr("q_ptr", outputs[0]).ptr("scale_ptr", outputs[1]).ptr("sum_ptr", outputs[2]);
        args.i64("C", cols).i64("rows", rows).i64("has_bias", nbIn == 3 ? 1 : 0);
        args.i64("is_rms", a.getString("mode") == "rmsnorm" ? 1 : 0).i64("per_token", a.getInt("per_token") ? 1 : 0);
        args.f32("eps", a.getFloat("eps")).f32("static_scale", a.getFloat("static_scale"));
        args.f32("clip_range", a.getFloat("clip_range"));
        break;
    case gen::kTokenImportance: {
        int64_t const H = a.getInt("num_heads");
        int64_t const Hkv = kvHeads(a);
        int64_t const D = a.getInt("head_dim");
        int64_t const B = in[0].dims.d[0];
        int64_t const T = in[0].dims.d[1];
        int64_t const N = in[1].dims.d[1];
        if (T < 1) return "TokenImportance needs at least one text token (q_text has T = 0)";
        // The kernel accumulates the head/text mean into scores with atomics: start from zero.
        std::string const e = cudaCheck(cudaMemsetAsync(outputs[0], 0, static_cast<size_t>(B * N) * sizeof(float),
            stream), "cudaMemsetAsync(scores)");
        if (!e.empty()) return e;
        float const scale = a.getFloat("scale");
        args.ptr("q_ptr", inputs[0]).ptr("k_ptr", inputs[1]).ptr("out_ptr", outputs[0]);
        args.i64("T", T).i64("N", N).i64("D", D).i64("group", H / Hkv).i64("H", H).i64("B", B);
        args.i64("q_stride_b", T * H * D).i64("q_stride_t", H * D).i64("k_stride_b", N * Hkv * D);
        args.i64("k_stride_n", Hkv * D);
        args.f32("scale", scale > 0.0F ? scale : 1.0F / std::sqrt(static_cast<float>(D)));
        args.f32("inv_count", 1.0F / static_cast<float>(H * T));
        break;
    }
    case gen::kGatherTopK: {
        // keep is the kept-token dimension of the outputs (a shape input at build time): no device read, no sync.
        int64_t const B = in[0].dims.d[0];
        int64_t const N = in[0].dims.d[1];
        int64_t const keep = out[0].dims.d[1];
        if (keep < 1 || keep > N || out[1].dims.d[1] != keep) {
            return "keep = " + std::to_string(keep) + " is outside [1, N = " + std::to_string(N) + "]; pass a token "
                "budget between 1 and the number of visual tokens";
        }
        std::string e;
        // Same sequence as plugins/triton_ops.gather_topk: rank -> kept mask [B, N] int8 (workspace), compact ->
        // ascending indices, gather rows.
        KernelArgs rank;
        rank.ptr("scores_ptr", inputs[1]).ptr("kept_ptr", workspace).i64("N", N).i64("keep", keep).i64("B", B);
        e = tritonLaunch("topk_rank", DataType::kFLOAT, rank, stream);
        if (!e.empty()) return e;
        KernelArgs compact;
        compact.ptr("kept_ptr", workspace).ptr("idx_ptr", outputs[1]).i64("N", N).i64("keep", keep).i64("B", B);
        e = tritonLaunch("topk_compact", DataType::kFLOAT, compact, stream);  // dtype-free kernel: any dtype matches
        if (!e.empty() || in[0].dims.d[2] == 0) return e;
        args.ptr("x_ptr", inputs[0]).ptr("idx_ptr", outputs[1]).ptr("out_ptr", outputs[0]);
        args.i64("N", N).i64("keep", keep).i64("C", in[0].dims.d[2]).i64("B", B);
        break;
    }
    default: return "unknown op";
    }
    return rows == 0 ? "" : tritonLaunch(opTritonKernel(a), t, args, stream);
}

}  // namespace vlmx

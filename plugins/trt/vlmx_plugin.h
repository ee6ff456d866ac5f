// vlmx TensorRT plugins: one IPluginV3 class (core + build + runtime capabilities) parameterised by the op-table
// entry, and one IPluginCreatorV3One per vlmx op. Names, versions, namespaces and fields come from the generated
// op table (generated/vlmx_op_table.h), so the creators match the exported ONNX nodes by construction.
#ifndef VLMX_PLUGIN_H_
#define VLMX_PLUGIN_H_

#include "generated/vlmx_op_table.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vlmx {

//! Logs through the logger TensorRT handed to setLoggerFinder (stderr before that).
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg);
void setLoggerFinderImpl(nvinfer1::ILoggerFinder* finder);

//! One attribute value; which member is meaningful follows the op table's AttrKind.
struct AttrValue {
    int32_t i{0};
    float f{0.0F};
    std::string s;
};

//! The full attribute set of one node, defaults filled in, validated against the op table.
class OpAttrs {
public:
    OpAttrs() = default;
    explicit OpAttrs(int32_t op);

    //! Reads PluginFields (INT32/FLOAT32/CHAR as the ONNX parser passes them); unknown names are rejected.
    //! Returns an empty string on success, else a message naming the field and what was expected.
    std::string parse(nvinfer1::PluginFieldCollection const* fc);

    int32_t op() const { return op_; }
    gen::OpDef const& def() const { return gen::kOps[op_]; }
    int32_t getInt(char const* name) const;
    float getFloat(char const* name) const;
    std::string const& getString(char const* name) const;

    //! PluginFields pointing into this object (valid while it lives and is not modified).
    std::vector<nvinfer1::PluginField> toFields() const;

private:
    int32_t index(char const* name) const;
    int32_t op_{0};
    std::vector<AttrValue> values_;
};

//! The IPluginV3 for every vlmx op. Per-op shape, type and launch rules live in vlmx_ops.cpp.
class VlmxPlugin : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
public:
    explicit VlmxPlugin(OpAttrs attrs);
    ~VlmxPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    OpAttrs const& attrs() const { return attrs_; }

private:
    OpAttrs attrs_;
    int32_t numInputs_{0};  // set by configurePlugin (build) and onShapeChange (runtime)
    std::vector<nvinfer1::PluginField> serialFields_;
    nvinfer1::PluginFieldCollection serialCollection_{};
};

//! The creator of one vlmx op's plugin (name/version/namespace from the op table).
class VlmxPluginCreator : public nvinfer1::IPluginCreatorV3One {
public:
    explicit VlmxPluginCreator(int32_t op);

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    int32_t op_;
    std::vector<nvinfer1::PluginField> fieldNames_;
    nvinfer1::PluginFieldCollection fieldCollection_{};
};

// ---- per-op rules (vlmx_ops.cpp) -------------------------------------------------------------------------------

//! Outputs TensorRT sees: the op table's outputs.
int32_t opNbOutputs(int32_t op);

//! Output data types from input types; returns an error message or "".
std::string opOutputTypes(OpAttrs const& a, nvinfer1::DataType const* in, int32_t nbIn, nvinfer1::DataType* out,
    int32_t nbOut);

//! Output shapes through the expression builder; returns an error message or "".
std::string opOutputShapes(OpAttrs const& a, nvinfer1::DimsExprs const* in, int32_t nbIn,
    nvinfer1::DimsExprs const* shapeIn, int32_t nbShapeIn, nvinfer1::DimsExprs* out, int32_t nbOut,
    nvinfer1::IExprBuilder& eb);

//! Whether the tensor at `pos` (inputs then outputs) may have the given type/format, given positions < pos.
bool opSupportsFormat(OpAttrs const& a, int32_t pos, nvinfer1::PluginTensorDesc const* desc, int32_t nbIn,
    int32_t nbOut);

//! Attribute values the kernels cannot run (FlashAttention head_dim, heads); checked when the build configures the
//! plugin so an unsupported node fails the build instead of the first inference. Returns an error message or "".
std::string opCheckAttrs(OpAttrs const& a);

//! Validates concrete shapes before launch (heads vs hidden size, K % 16, ...); returns an error message or "".
std::string opCheckShapes(OpAttrs const& a, nvinfer1::PluginTensorDesc const* in, int32_t nbIn,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOut);

//! Scratch memory the op needs at the profile's largest shapes (FlashAttention's split-KV partials, GatherTopK's
//! kept mask), in bytes; enqueue receives it as `workspace` (never allocated per call).
size_t opWorkspaceSize(OpAttrs const& a, nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbIn);

//! FlashAttention's split-KV workspace for these input dims (attention_launch.cpp; non-decreasing in every size).
size_t flashAttentionWorkspaceSize(OpAttrs const& a, nvinfer1::Dims const* dims, int32_t nbIn);

//! FlashAttention through the CUDA C ABI (attention_launch.cpp), partials in `workspace`; returns an error or "".
std::string launchFlashAttention(OpAttrs const& a, nvinfer1::PluginTensorDesc const* in, int32_t nbIn,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream);

//! Launches the op; returns an error message or "".
std::string opEnqueue(OpAttrs const& a, nvinfer1::PluginTensorDesc const* in, int32_t nbIn,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOut, void const* const* inputs, void* const* outputs,
    void* workspace, cudaStream_t stream);

//! Name of the Triton kernel an op launches (as in plugins/triton_aot.py; "" for the CUDA C ABI ops).
std::string opTritonKernel(OpAttrs const& a);

}  // namespace vlmx
#endif  // VLMX_PLUGIN_H_

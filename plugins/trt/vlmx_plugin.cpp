// VlmxPlugin / VlmxPluginCreator: the op-independent IPluginV3 glue (fields, serialization, capability plumbing),
// plus the library entry points getCreators / setLoggerFinder for trtexec --dynamicPlugins and load_library().
#include "vlmx_plugin.h"

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>

using namespace nvinfer1;

namespace vlmx {
namespace {

std::mutex gLogMutex;
ILoggerFinder* gLoggerFinder = nullptr;

std::string opName(int32_t op) { return std::string(gen::kPluginNamespace) + "::" + gen::kOps[op].name; }

bool inChoices(char const* choices, std::string const& v) {
    if (choices == nullptr || choices[0] == '\0') return true;
    std::string const all = std::string("|") + choices + "|";
    return all.find("|" + v + "|") != std::string::npos;
}

}  // namespace

void setLoggerFinderImpl(ILoggerFinder* finder) {
    std::lock_guard<std::mutex> lock(gLogMutex);
    gLoggerFinder = finder;
}

void logMessage(ILogger::Severity severity, std::string const& msg) {
    ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLogMutex);
        if (gLoggerFinder != nullptr) logger = gLoggerFinder->findLogger();
    }
    std::string const text = "[vlmx plugin] " + msg;
    if (logger != nullptr) {
        logger->log(severity, text.c_str());
    } else if (severity <= ILogger::Severity::kWARNING) {
        std::cerr << text << std::endl;
    }
}

//! VLMX_PLUGIN_TRACE=1: every TensorRT call into a plugin or creator prints "[vlmx trace] <op> <method>" to stderr,
//! so a build log proves which methods TensorRT called (tests/test_rtx_parser_plugins.py). Read once.
void trace(int32_t op, char const* method) {
    static bool const on = [] {
        char const* v = std::getenv("VLMX_PLUGIN_TRACE");
        return v != nullptr && v[0] != '\0' && v[0] != '0';
    }();
    if (on) std::cerr << "[vlmx trace] " << gen::kOps[op].name << " " << method << std::endl;
}

// ---- OpAttrs -------------------------------------------------------------------------------------------------

OpAttrs::OpAttrs(int32_t op) : op_(op) {
    gen::OpDef const& d = def();
    values_.resize(static_cast<size_t>(d.nbAttrs));
    for (int32_t i = 0; i < d.nbAttrs; ++i) {
        values_[i].i = d.attrs[i].defaultInt;
        values_[i].f = d.attrs[i].defaultFloat;
        values_[i].s = d.attrs[i].defaultString;
    }
}

int32_t OpAttrs::index(char const* name) const {
    gen::OpDef const& d = def();
    for (int32_t i = 0; i < d.nbAttrs; ++i) {
        if (std::strcmp(d.attrs[i].name, name) == 0) return i;
    }
    return -1;
}

int32_t OpAttrs::getInt(char const* name) const { return values_.at(static_cast<size_t>(index(name))).i; }
float OpAttrs::getFloat(char const* name) const { return values_.at(static_cast<size_t>(index(name))).f; }
std::string const& OpAttrs::getString(char const* name) const {
    return values_.at(static_cast<size_t>(index(name))).s;
}

std::string OpAttrs::parse(PluginFieldCollection const* fc) {
    gen::OpDef const& d = def();
    std::vector<bool> seen(static_cast<size_t>(d.nbAttrs), false);
    for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f) {
        PluginField const& field = fc->fields[f];
        if (field.name == nullptr) continue;
        int32_t const i = index(field.name);
        if (i < 0) {
            return opName(op_) + ": unknown field \"" + field.name + "\"; the op table lists only its attributes";
        }
        gen::AttrDef const& a = d.attrs[i];
        AttrValue& v = values_[static_cast<size_t>(i)];
        if (field.data == nullptr || field.length < 1) {
            if (a.kind == gen::AttrKind::kString && field.data != nullptr) {
                v.s.clear();  // empty string attribute
                if (!inChoices(a.choices, v.s)) {
                    return opName(op_) + ": " + field.name + "=\"\" is not allowed; choose one of " + a.choices;
                }
                seen[static_cast<size_t>(i)] = true;
                continue;
            }
            return opName(op_) + ": field \"" + field.name + "\" has no data";
        }
        switch (a.kind) {
        case gen::AttrKind::kInt:
            if (field.type == PluginFieldType::kINT32) v.i = *static_cast<int32_t const*>(field.data);
            else if (field.type == PluginFieldType::kINT64) v.i = static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
            else return opName(op_) + ": field \"" + field.name + "\" must be INT32 (an ONNX INT attribute)";
            break;
        case gen::AttrKind::kFloat:
            if (field.type == PluginFieldType::kFLOAT32) v.f = *static_cast<float const*>(field.data);
            else if (field.type == PluginFieldType::kFLOAT64) v.f = static_cast<float>(*static_cast<double const*>(field.data));
            else return opName(op_) + ": field \"" + field.name + "\" must be FLOAT32 (an ONNX FLOAT attribute)";
            break;
        case gen::AttrKind::kString: {
            if (field.type != PluginFieldType::kCHAR) {
                return opName(op_) + ": field \"" + field.name + "\" must be CHAR (an ONNX STRING attribute)";
            }
            char const* s = static_cast<char const*>(field.data);
            size_t n = static_cast<size_t>(field.length);
            while (n > 0 && s[n - 1] == '\0') --n;  // the parser may or may not count a terminating NUL
            v.s.assign(s, n);
            if (!inChoices(a.choices, v.s)) {
                return opName(op_) + ": " + field.name + "=\"" + v.s + "\" is not allowed; choose one of " + a.choices;
            }
            break;
        }
        }
        seen[static_cast<size_t>(i)] = true;
    }
    for (int32_t i = 0; i < d.nbAttrs; ++i) {
        if (d.attrs[i].required && !seen[static_cast<size_t>(i)]) {
            return opName(op_) + ": required attribute \"" + d.attrs[i].name + "\" is missing; re-export the model";
        }
    }
    return "";
}

std::vector<PluginField> OpAttrs::toFields() const {
    gen::OpDef const& d = def();
    std::vector<PluginField> out;
    for (int32_t i = 0; i < d.nbAttrs; ++i) {
        AttrValue const& v = values_[static_cast<size_t>(i)];
        switch (d.attrs[i].kind) {
        case gen::AttrKind::kInt: out.emplace_back(d.attrs[i].name, &v.i, PluginFieldType::kINT32, 1); break;
        case gen::AttrKind::kFloat: out.emplace_back(d.attrs[i].name, &v.f, PluginFieldType::kFLOAT32, 1); break;
        case gen::AttrKind::kString:
            out.emplace_back(d.attrs[i].name, v.s.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(v.s.size()));
            break;
        }
    }
    return out;
}

// ---- VlmxPlugin ----------------------------------------------------------------------------------------------

VlmxPlugin::VlmxPlugin(OpAttrs attrs) : attrs_(std::move(attrs)) {}

IPluginCapability* VlmxPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    trace(attrs_.op(), "getCapabilityInterface");
    switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* VlmxPlugin::clone() noexcept {
    trace(attrs_.op(), "clone");
    try {
        return new VlmxPlugin(attrs_);
    } catch (std::exception const& e) {
        logMessage(ILogger::Severity::kERROR, std::string("clone failed: ") + e.what());
        return nullptr;
    }
}

char const* VlmxPlugin::getPluginName() const noexcept { return attrs_.def().name; }
char const* VlmxPlugin::getPluginVersion() const noexcept { return gen::kPluginVersion; }
char const* VlmxPlugin::getPluginNamespace() const noexcept { return gen::kPluginNamespace; }
int32_t VlmxPlugin::getNbOutputs() const noexcept {
    trace(attrs_.op(), "getNbOutputs");
    return opNbOutputs(attrs_.op());
}

int32_t VlmxPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
    int32_t nbInputs) const noexcept {
    trace(attrs_.op(), "getOutputDataTypes");
    std::string const err = opOutputTypes(attrs_, inputTypes, nbInputs, outputTypes, nbOutputs);
    if (!err.empty()) logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + err);
    return err.empty() ? 0 : -1;
}

int32_t VlmxPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept {
    trace(attrs_.op(), "getOutputShapes");
    try {
        std::string const err = opOutputShapes(attrs_, inputs, nbInputs, shapeInputs, nbShapeInputs, outputs,
            nbOutputs, exprBuilder);
        if (!err.empty()) logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + err);
        return err.empty() ? 0 : -1;
    } catch (std::exception const& e) {
        logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + e.what());
        return -1;
    }
}

bool VlmxPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
    int32_t nbOutputs) noexcept {
    trace(attrs_.op(), "supportsFormatCombination");
    std::vector<PluginTensorDesc> desc(static_cast<size_t>(nbInputs + nbOutputs));
    for (int32_t i = 0; i < nbInputs + nbOutputs; ++i) desc[static_cast<size_t>(i)] = inOut[i].desc;
    return opSupportsFormat(attrs_, pos, desc.data(), nbInputs, nbOutputs);
}

int32_t VlmxPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
    DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    trace(attrs_.op(), "configurePlugin");
    gen::OpDef const& d = attrs_.def();
    // Shape inputs (GatherTopK's keep) reach getOutputShapes only, not the tensor inputs counted here.
    int32_t minInputs = 0;
    int32_t maxInputs = 0;
    for (int32_t i = 0; i < d.nbInputs; ++i) {
        if (d.inputs[i].shapeInput) continue;
        minInputs += d.inputs[i].optional ? 0 : 1;
        ++maxInputs;
    }
    if (nbInputs < minInputs || nbInputs > maxInputs || nbOutputs != getNbOutputs()) {
        logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": got " + std::to_string(nbInputs) + " tensor "
            "inputs and " + std::to_string(nbOutputs) + " outputs; expected " + std::to_string(minInputs) + ".."
            + std::to_string(maxInputs) + " tensor inputs (plus any shape inputs) and " + std::to_string(getNbOutputs())
            + " outputs");
        return -1;
    }
    (void) in;
    (void) out;
    numInputs_ = nbInputs;
    std::string const err = opCheckAttrs(attrs_);
    if (!err.empty()) logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + err);
    return err.empty() ? 0 : -1;
}

size_t VlmxPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const*, int32_t) const noexcept {
    trace(attrs_.op(), "getWorkspaceSize");
    return opWorkspaceSize(attrs_, inputs, nbInputs);
}

int32_t VlmxPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
    int32_t nbOutputs) noexcept {
    trace(attrs_.op(), "onShapeChange");
    numInputs_ = nbInputs;
    std::string const err = opCheckShapes(attrs_, in, nbInputs, out, nbOutputs);
    if (!err.empty()) logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + err);
    return err.empty() ? 0 : -1;
}

int32_t VlmxPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    trace(attrs_.op(), "enqueue");
    try {
        std::string const err = opEnqueue(attrs_, inputDesc, numInputs_, outputDesc, getNbOutputs(), inputs, outputs,
            workspace, stream);
        if (!err.empty()) logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + err);
        return err.empty() ? 0 : -1;
    } catch (std::exception const& e) {
        logMessage(ILogger::Severity::kERROR, opName(attrs_.op()) + ": " + e.what());
        return -1;
    }
}

IPluginV3* VlmxPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept {
    trace(attrs_.op(), "attachToContext");
    return clone();
}

PluginFieldCollection const* VlmxPlugin::getFieldsToSerialize() noexcept {
    trace(attrs_.op(), "getFieldsToSerialize");
    serialFields_ = attrs_.toFields();
    serialCollection_.nbFields = static_cast<int32_t>(serialFields_.size());
    serialCollection_.fields = serialFields_.data();
    return &serialCollection_;
}

// ---- VlmxPluginCreator ---------------------------------------------------------------------------------------

VlmxPluginCreator::VlmxPluginCreator(int32_t op) : op_(op) {
    gen::OpDef const& d = gen::kOps[op];
    for (int32_t i = 0; i < d.nbAttrs; ++i) {
        PluginFieldType const t = d.attrs[i].kind == gen::AttrKind::kInt ? PluginFieldType::kINT32
            : d.attrs[i].kind == gen::AttrKind::kFloat ? PluginFieldType::kFLOAT32 : PluginFieldType::kCHAR;
        fieldNames_.emplace_back(d.attrs[i].name, nullptr, t, d.attrs[i].kind == gen::AttrKind::kString ? 0 : 1);
    }
    fieldCollection_.nbFields = static_cast<int32_t>(fieldNames_.size());
    fieldCollection_.fields = fieldNames_.data();
}

char const* VlmxPluginCreator::getPluginName() const noexcept { return gen::kOps[op_].name; }
char const* VlmxPluginCreator::getPluginVersion() const noexcept { return gen::kPluginVersion; }
char const* VlmxPluginCreator::getPluginNamespace() const noexcept { return gen::kPluginNamespace; }
PluginFieldCollection const* VlmxPluginCreator::getFieldNames() noexcept { return &fieldCollection_; }

IPluginV3* VlmxPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
    TensorRTPhase /*phase*/) noexcept {
    trace(op_, "createPlugin");
    try {
        OpAttrs attrs(op_);
        std::string const err = attrs.parse(fc);
        if (!err.empty()) {
            logMessage(ILogger::Severity::kERROR, std::string("node ") + (name != nullptr ? name : "?") + ": " + err);
            return nullptr;
        }
        return new VlmxPlugin(std::move(attrs));
    } catch (std::exception const& e) {
        logMessage(ILogger::Severity::kERROR, opName(op_) + ": createPlugin failed: " + e.what());
        return nullptr;
    }
}

}  // namespace vlmx

// ---- library entry points (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary) -----------------------------

extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    vlmx::setLoggerFinderImpl(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static vlmx::VlmxPluginCreator creators[] = {
        vlmx::VlmxPluginCreator(vlmx::gen::kFlashAttention), vlmx::VlmxPluginCreator(vlmx::gen::kW8A8Linear),
        vlmx::VlmxPluginCreator(vlmx::gen::kQuantizePerToken), vlmx::VlmxPluginCreator(vlmx::gen::kGeluQuant),
        vlmx::VlmxPluginCreator(vlmx::gen::kNormQuant), vlmx::VlmxPluginCreator(vlmx::gen::kTokenImportance),
        vlmx::VlmxPluginCreator(vlmx::gen::kGatherTopK)};
    static_assert(sizeof(creators) / sizeof(creators[0]) == vlmx::gen::kNbOps, "one creator per op-table entry");
    static nvinfer1::IPluginCreatorInterface* pointers[vlmx::gen::kNbOps] = {&creators[0], &creators[1], &creators[2],
        &creators[3], &creators[4], &creators[5], &creators[6]};
    nbCreators = vlmx::gen::kNbOps;
    return pointers;
}

}  // extern "C"

// Control plugin for probing TensorRT(-RTX)'s ONNX parser (tests/test_rtx_parser_plugins.py, docs/tensorrt.md):
// one IPluginV3 creator "VlmxProbe" (namespace "vlmxprobe", version "1") with no fields, one input, one output
// of the input's shape and type. Every method prints "[probe] <method>" to stderr before returning, and a
// std::terminate handler prints the native backtrace, so a log shows the last call TensorRT made into the plugin
// and who called terminate. Needs only TensorRT's headers (no libnvinfer, no CUDA runtime):
//   g++ -std=c++17 -shared -fPIC -I<trt>/include -I<cuda>/include parser_probe_plugin.cpp -o libvlmx_probe.so
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <execinfo.h>
#include <unistd.h>

using namespace nvinfer1;

namespace {

void say(char const* what) {
    std::fprintf(stderr, "[probe] %s\n", what);
    std::fflush(stderr);
}

[[noreturn]] void onTerminate() {
    say("std::terminate called; native backtrace follows");
    void* frames[64];
    int const n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, STDERR_FILENO);
    std::abort();
}

struct InstallHandler {
    InstallHandler() { std::set_terminate(onTerminate); }
} const kInstall;

char const* const kName = "VlmxProbe";
char const* const kVersion = "1";
char const* const kNamespace = "vlmxprobe";

class ProbePlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
public:
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        say(type == PluginCapabilityType::kCORE ? "getCapabilityInterface(CORE)"
            : type == PluginCapabilityType::kBUILD ? "getCapabilityInterface(BUILD)"
                                                    : "getCapabilityInterface(RUNTIME)");
        if (type == PluginCapabilityType::kCORE) return static_cast<IPluginV3OneCore*>(this);
        if (type == PluginCapabilityType::kBUILD) return static_cast<IPluginV3OneBuild*>(this);
        return static_cast<IPluginV3OneRuntime*>(this);
    }
    IPluginV3* clone() noexcept override {
        say("clone");
        return new ProbePlugin();
    }
    char const* getPluginName() const noexcept override {
        say("getPluginName");
        return kName;
    }
    char const* getPluginVersion() const noexcept override {
        say("getPluginVersion");
        return kVersion;
    }
    char const* getPluginNamespace() const noexcept override {
        say("getPluginNamespace");
        return kNamespace;
    }
    int32_t getNbOutputs() const noexcept override {
        say("getNbOutputs");
        return 1;
    }
    int32_t getOutputDataTypes(DataType* out, int32_t, DataType const* in, int32_t) const noexcept override {
        say("getOutputDataTypes");
        out[0] = in[0];
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
        IExprBuilder&) noexcept override {
        say("getOutputShapes");
        out[0] = in[0];
        return 0;
    }
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
        say("supportsFormatCombination");
        bool const linear = io[pos].desc.format == TensorFormat::kLINEAR;
        return linear && (pos == 0 ? io[0].desc.type == DataType::kFLOAT : io[pos].desc.type == io[0].desc.type);
    }
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept
        override {
        say("configurePlugin");
        return 0;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) const
        noexcept override {
        say("getWorkspaceSize");
        return 0;
    }
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override {
        say("onShapeChange");
        return 0;
    }
    int32_t enqueue(PluginTensorDesc const*, PluginTensorDesc const*, void const* const*, void* const*, void*,
        cudaStream_t) noexcept override {
        say("enqueue");
        return 0;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override {
        say("attachToContext");
        return clone();
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        say("getFieldsToSerialize");
        return &empty_;
    }

private:
    PluginFieldCollection empty_{0, nullptr};
};

class ProbeCreator : public IPluginCreatorV3One {
public:
    char const* getPluginName() const noexcept override { return kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override {
        say("creator.getFieldNames");
        return &empty_;
    }
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override {
        std::fprintf(stderr, "[probe] creator.createPlugin(nbFields=%d, phase=%s)\n", fc ? fc->nbFields : -1,
            phase == TensorRTPhase::kBUILD ? "BUILD" : "RUNTIME");
        std::fflush(stderr);
        return new ProbePlugin();
    }

private:
    PluginFieldCollection empty_{0, nullptr};
};

}  // namespace

extern "C" {
__attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder*) { say("setLoggerFinder"); }

__attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    say("getCreators");
    static ProbeCreator creator;
    static IPluginCreatorInterface* const list[] = {&creator};
    nbCreators = 1;
    return list;
}
}

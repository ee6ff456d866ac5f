// Runs the vlmx TensorRT plugins on a GPU without TensorRT: the plugin interfaces are header-only, so this harness
// plays TensorRT's part. It dlopens libvlmx_trt_plugins.so, finds each op's creator through getCreators(), and for
// every case makes the calls a TensorRT build + inference makes, in that order:
//   build:   createPlugin(kBUILD, fields as the ONNX parser passes them) -> getNbOutputs, getOutputDataTypes,
//            getOutputShapes (evaluating IExprBuilder), supportsFormatCombination (every position), configurePlugin,
//            getWorkspaceSize, getFieldsToSerialize
//   runtime: createPlugin(kRUNTIME, serialized fields) -> attachToContext -> onShapeChange -> enqueue(PluginTensorDesc,
//            device pointers, workspace, stream), then the same enqueue captured into a CUDA graph and replayed
//            ("graph_capture_ok": enqueue neither synchronizes, copies to the host nor allocates)
// Inputs are raw little-endian files written by scripts/plugin_enqueue_check.py; outputs (and the workspace) are
// poisoned with 0xFF bytes (NaN for float16/float32) before enqueue and written back as raw files. One JSON line per
// case on stdout; plugin messages go to stderr.
//
//   usage: plugin_enqueue_check <libvlmx_trt_plugins.so> <cases.txt> [--no-device] [--iters N]
// Case line: NAME|OP|attr=i:3;attr=f:0.5;attr=s:bsd|dtype:2x577x1024:in0.bin;...|dtype:2x577x1024:out0.bin;...|
//            shape-input values (e.g. "144": GatherTopK's keep, passed to getOutputShapes only)
// dtypes: half, float, int8, int32, int64; an output dim of -1 is a size-tensor dimension (its concrete value is
// given in the output's shape after '=', e.g. 2x-1x4096=2x144x4096). --no-device stops before any CUDA call
// (host check of the case plumbing); --iters N also times N enqueues with CUDA events.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

// ---- an IExprBuilder that evaluates (constants stay constants; size tensors get an opaque -1) ---------------
#include "harness_common.h"

bool parseType(std::string const& t, DataType* out, size_t* bytes) {
    struct { char const* name; DataType type; size_t size; } const table[] = {{"half", DataType::kHALF, 2},
        {"float", DataType::kFLOAT, 4}, {"int8", DataType::kINT8, 1}, {"int32", DataType::kINT32, 4},
        {"int64", DataType::kINT64, 8}};
    for (auto const& e : table) {
        if (t == e.name) {
            *out = e.type;
            *bytes = e.size;
            return true;
        }
    }
    return false;
}

Dims parseDims(std::string const& s) {
    Dims d{};
    d.nbDims = 0;
    if (s.empty() || s == "scalar") return d;
    for (auto const& v : split(s, 'x')) d.d[d.nbDims++] = std::atoll(v.c_str());
    return d;
}

std::string dimsJson(Dims const& d) {
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
    return s + "]";
}

int64_t volume(Dims const& d) {
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i) v *= d.d[i];
    return v;
}

std::string jsonEscape(std::string const& s) {
    std::string o;
    for (char c : s) {
        if (c == '"' || c == '\\') o += '\\';
        if (c == '\n') {
            o += "\\n";
            continue;
        }
        o += c;
    }
    return o;
}

//! One tensor of a case: type, build-time dims (-1 = size tensor dim), concrete runtime dims, file.
struct Tensor {
    DataType type{DataType::kFLOAT};
    size_t elemBytes{4};
    Dims buildDims{};
    Dims runDims{};
    std::string path;
    void* device{nullptr};
};

bool parseTensors(std::string const& spec, std::vector<Tensor>* out, std::string* err) {
    for (auto const& item : split(spec, ';')) {
        if (item.empty()) continue;
        auto const f = split(item, ':');
        if (f.size() != 3) {
            *err = "bad tensor spec '" + item + "' (dtype:shape:path)";
            return false;
        }
        Tensor t;
        if (!parseType(f[0], &t.type, &t.elemBytes)) {
            *err = "unknown dtype " + f[0];
            return false;
        }
        size_t const eq = f[1].find('=');
        t.buildDims = parseDims(f[1].substr(0, eq));
        t.runDims = eq == std::string::npos ? t.buildDims : parseDims(f[1].substr(eq + 1));
        t.path = f[2];
        out->push_back(t);
    }
    return true;
}

#define CUDA_TRY(expr)                                                                                               \
    do {                                                                                                             \
        cudaError_t const e_ = (expr);                                                                               \
        if (e_ != cudaSuccess) {                                                                                     \
            cudaErr = std::string(#expr) + ": " + cudaGetErrorString(e_);                                            \
            goto done;                                                                                               \
        }                                                                                                            \
    } while (0)

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: plugin_enqueue_check <libvlmx_trt_plugins.so> <cases.txt> [--no-device] [--iters N]"
                  << std::endl;
        return 2;
    }
    bool device = true;
    int iters = 0;
    for (int i = 3; i < argc; ++i) {
        if (std::strcmp(argv[i], "--no-device") == 0) device = false;
        else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) iters = std::atoi(argv[++i]);
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        std::cerr << "dlopen: " << dlerror() << std::endl;
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    if (getCreators == nullptr) {
        std::cerr << "library lacks getCreators" << std::endl;
        return 2;
    }
    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    std::ifstream cases(argv[2]);
    if (!cases) {
        std::cerr << "cannot read " << argv[2] << std::endl;
        return 2;
    }
    int failures = 0;
    std::string line;
    while (std::getline(cases, line)) {
        if (line.empty() || line[0] == '#') continue;
        auto parts = split(line, '|');
        parts.resize(6);  // name | op | fields | inputs | outputs | shape-input values
        std::string const name = parts[0];
        std::ostringstream js;
        js << "{\"case\": \"" << jsonEscape(name) << "\", \"op\": \"" << parts[1] << "\"";
        auto fail = [&](std::string const& why) {
            ++failures;
            std::cout << js.str() << ", \"ok\": false, \"error\": \"" << jsonEscape(why) << "\"}" << std::endl;
        };
        IPluginCreatorV3One* creator = nullptr;
        for (int32_t i = 0; i < nb; ++i) {
            if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
            auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
            if (parts[1] == c->getPluginName() && std::strcmp(c->getPluginNamespace(), "vlmx") == 0
                && std::strcmp(c->getPluginVersion(), "1") == 0) {
                creator = c;
            }
        }
        if (creator == nullptr) {
            fail("no creator vlmx::" + parts[1] + " version 1");
            continue;
        }
        ParsedFields const parsed(parts[2]);
        std::vector<Tensor> ins, outs;
        std::string err;
        if (!parseTensors(parts[3], &ins, &err) || !parseTensors(parts[4], &outs, &err)) {
            fail(err);
            continue;
        }
        int32_t const nbIn = static_cast<int32_t>(ins.size());
        int32_t const nbOut = static_cast<int32_t>(outs.size());

        // ---- build phase ----
        PluginFieldCollection const fc = parsed.collection();
        std::unique_ptr<IPluginV3> built(creator->createPlugin(name.c_str(), &fc, TensorRTPhase::kBUILD));
        if (!built) {
            fail("createPlugin(kBUILD) returned null");
            continue;
        }
        auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
        if (build->getNbOutputs() != nbOut) {
            fail("getNbOutputs() = " + std::to_string(build->getNbOutputs()) + ", case has " + std::to_string(nbOut));
            continue;
        }
        std::vector<DataType> inTypes, outTypes(static_cast<size_t>(nbOut));
        for (auto const& t : ins) inTypes.push_back(t.type);
        int32_t const typesRc = build->getOutputDataTypes(outTypes.data(), nbOut, inTypes.data(), nbIn);
        bool typesOk = typesRc == 0;
        std::string typesJson = "[";
        for (int32_t o = 0; o < nbOut; ++o) {
            typesOk = typesOk && outTypes[o] == outs[o].type;
            typesJson += (o ? ", \"" : "\"") + std::string(typeName(outTypes[o])) + "\"";
        }
        typesJson += "]";
        Builder eb;
        std::vector<DimsExprs> inExprs(static_cast<size_t>(nbIn)), outExprs(static_cast<size_t>(nbOut));
        for (int32_t i = 0; i < nbIn; ++i) {
            inExprs[i].nbDims = ins[i].buildDims.nbDims;
            for (int32_t j = 0; j < inExprs[i].nbDims; ++j) inExprs[i].d[j] = eb.impl.constant(ins[i].buildDims.d[j]);
        }
        std::vector<DimsExprs> const shapeIn = shapeInputs(parts[5], eb);
        int32_t const shapesRc = build->getOutputShapes(inExprs.data(), nbIn, shapeIn.data(),
            static_cast<int32_t>(shapeIn.size()), outExprs.data(), nbOut, eb);
        bool shapesOk = shapesRc == 0;
        std::string shapesJson = "[";
        for (int32_t o = 0; o < nbOut && shapesRc == 0; ++o) {
            Dims got{};
            got.nbDims = outExprs[o].nbDims;
            for (int32_t j = 0; j < got.nbDims; ++j) got.d[j] = outExprs[o].d[j]->getConstantValue();
            shapesOk = shapesOk && got.nbDims == outs[o].buildDims.nbDims;
            for (int32_t j = 0; shapesOk && j < got.nbDims; ++j) shapesOk = got.d[j] == outs[o].buildDims.d[j];
            shapesJson += (o ? ", " : "") + dimsJson(got);
        }
        shapesJson += "]";
        std::vector<DynamicPluginTensorDesc> io(static_cast<size_t>(nbIn + nbOut));
        for (int32_t i = 0; i < nbIn + nbOut; ++i) {
            Tensor const& t = i < nbIn ? ins[i] : outs[i - nbIn];
            io[i].desc.type = t.type;
            io[i].desc.format = TensorFormat::kLINEAR;
            io[i].desc.scale = 1.0F;
            io[i].desc.dims = t.buildDims;  // -1 where the dimension is data-dependent
            io[i].min = io[i].max = t.buildDims;
        }
        bool formatsOk = true;
        for (int32_t p = 0; p < nbIn + nbOut; ++p) {
            formatsOk = build->supportsFormatCombination(p, io.data(), nbIn, nbOut) && formatsOk;
        }
        int32_t const configureRc = build->configurePlugin(io.data(), nbIn, io.data() + nbIn, nbOut);
        size_t const workspace = build->getWorkspaceSize(io.data(), nbIn, io.data() + nbIn, nbOut);
        auto* buildRt = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* serialized = buildRt->getFieldsToSerialize();

        // ---- runtime phase: deserialize from the serialized fields, attach to an execution context ----
        std::unique_ptr<IPluginV3> deser(creator->createPlugin(name.c_str(), serialized, TensorRTPhase::kRUNTIME));
        std::unique_ptr<IPluginV3> attached;
        if (deser) {
            attached.reset(static_cast<IPluginV3OneRuntime*>(deser->getCapabilityInterface(
                PluginCapabilityType::kRUNTIME))->attachToContext(nullptr));
        }
        js << ", \"types_rc\": " << typesRc << ", \"output_types\": " << typesJson << ", \"types_ok\": "
           << (typesOk ? "true" : "false") << ", \"shapes_rc\": " << shapesRc << ", \"output_shapes\": " << shapesJson
           << ", \"shapes_ok\": " << (shapesOk ? "true" : "false") << ", \"size_tensors\": [";
        for (size_t s = 0; s < eb.impl.sizeTensors.size(); ++s) js << (s ? ", " : "") << eb.impl.sizeTensors[s];
        js << "], \"formats_ok\": " << (formatsOk ? "true" : "false") << ", \"configure_rc\": " << configureRc
           << ", \"workspace\": " << workspace << ", \"serialized_fields\": " << (serialized ? serialized->nbFields : -1)
           << ", \"runtime_plugin\": " << (attached ? "true" : "false");
        if (!attached) {
            fail("createPlugin(kRUNTIME)/attachToContext returned null");
            continue;
        }
        auto* runtime = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        std::vector<PluginTensorDesc> rtIn(static_cast<size_t>(nbIn)), rtOut(static_cast<size_t>(nbOut));
        for (int32_t i = 0; i < nbIn; ++i) rtIn[i] = io[i].desc, rtIn[i].dims = ins[i].runDims;
        for (int32_t o = 0; o < nbOut; ++o) rtOut[o] = io[nbIn + o].desc, rtOut[o].dims = outs[o].runDims;
        int32_t const shapeRc = runtime->onShapeChange(rtIn.data(), nbIn, rtOut.data(), nbOut);
        js << ", \"on_shape_change_rc\": " << shapeRc;
        bool const buildOk = typesOk && shapesOk && formatsOk && configureRc == 0 && shapeRc == 0;
        if (!device) {
            if (!buildOk) ++failures;
            std::cout << js.str() << ", \"ok\": " << (buildOk ? "true" : "false") << ", \"enqueued\": false}" << std::endl;
            continue;
        }

        // ---- enqueue with real device buffers ----
        std::string cudaErr;
        std::string captureErr;
        bool captureOk = false;
        int32_t enqueueRc = -99;
        float ms = -1.0F;
        void* ws = nullptr;
        cudaStream_t stream = nullptr;
        cudaEvent_t ev0 = nullptr, ev1 = nullptr;
        std::vector<void const*> inPtrs;
        std::vector<void*> outPtrs;
        std::vector<char> host;
        CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        for (auto& t : ins) {
            size_t const bytes = static_cast<size_t>(volume(t.runDims)) * t.elemBytes;
            std::ifstream f(t.path, std::ios::binary);
            host.assign(bytes, 0);
            if (!f.read(host.data(), static_cast<std::streamsize>(bytes))) {
                cudaErr = "cannot read " + std::to_string(bytes) + " bytes from " + t.path;
                goto done;
            }
            CUDA_TRY(cudaMalloc(&t.device, bytes > 0 ? bytes : 1));
            CUDA_TRY(cudaMemcpy(t.device, host.data(), bytes, cudaMemcpyHostToDevice));
            inPtrs.push_back(t.device);
        }
        for (auto& t : outs) {
            size_t const bytes = static_cast<size_t>(volume(t.runDims)) * t.elemBytes;
            CUDA_TRY(cudaMalloc(&t.device, bytes > 0 ? bytes : 1));
            CUDA_TRY(cudaMemset(t.device, 0xFF, bytes));  // poison: NaN for float16/float32, -1 for integers
            outPtrs.push_back(t.device);
        }
        if (workspace > 0) {
            CUDA_TRY(cudaMalloc(&ws, workspace));
            CUDA_TRY(cudaMemset(ws, 0xFF, workspace));
        }
        CUDA_TRY(cudaDeviceSynchronize());
        enqueueRc = runtime->enqueue(rtIn.data(), rtOut.data(), inPtrs.data(), outPtrs.data(), ws, stream);
        CUDA_TRY(cudaStreamSynchronize(stream));
        CUDA_TRY(cudaGetLastError());
        for (auto& t : outs) {
            size_t const bytes = static_cast<size_t>(volume(t.runDims)) * t.elemBytes;
            host.assign(bytes, 0);
            CUDA_TRY(cudaMemcpy(host.data(), t.device, bytes, cudaMemcpyDeviceToHost));
            std::ofstream f(t.path, std::ios::binary);
            f.write(host.data(), static_cast<std::streamsize>(bytes));
            if (!f) {
                cudaErr = "cannot write " + t.path;
                goto done;
            }
        }
        if (enqueueRc == 0) {
            // The same enqueue captured into a CUDA graph and replayed: capture fails if enqueue synchronizes the
            // stream, copies to the host or allocates (GatherTopK's kept count, FlashAttention's split-KV partials).
            cudaGraph_t graph = nullptr;
            cudaGraphExec_t exec = nullptr;
            int32_t rc = -99;
            cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
            if (e == cudaSuccess) {
                rc = runtime->enqueue(rtIn.data(), rtOut.data(), inPtrs.data(), outPtrs.data(), ws, stream);
                cudaError_t const end = cudaStreamEndCapture(stream, &graph);
                e = end != cudaSuccess ? end : cudaGetLastError();
            }
            if (e == cudaSuccess && rc == 0) e = cudaGraphInstantiate(&exec, graph, 0);
            if (e == cudaSuccess && rc == 0) e = cudaGraphLaunch(exec, stream);
            if (e == cudaSuccess && rc == 0) e = cudaStreamSynchronize(stream);
            captureOk = e == cudaSuccess && rc == 0;
            captureErr = e != cudaSuccess ? cudaGetErrorString(e) : (rc != 0 ? "enqueue returned non-zero" : "");
            cudaGetLastError();
            if (exec != nullptr) cudaGraphExecDestroy(exec);
            if (graph != nullptr) cudaGraphDestroy(graph);
        }
        if (iters > 0 && enqueueRc == 0) {
            CUDA_TRY(cudaEventCreate(&ev0));
            CUDA_TRY(cudaEventCreate(&ev1));
            runtime->enqueue(rtIn.data(), rtOut.data(), inPtrs.data(), outPtrs.data(), ws, stream);  // warm-up
            CUDA_TRY(cudaEventRecord(ev0, stream));
            for (int it = 0; it < iters; ++it) {
                runtime->enqueue(rtIn.data(), rtOut.data(), inPtrs.data(), outPtrs.data(), ws, stream);
            }
            CUDA_TRY(cudaEventRecord(ev1, stream));
            CUDA_TRY(cudaEventSynchronize(ev1));
            CUDA_TRY(cudaEventElapsedTime(&ms, ev0, ev1));
            ms /= static_cast<float>(iters);
        }
    done:
        for (auto& t : ins) cudaFree(t.device);
        for (auto& t : outs) cudaFree(t.device);
        if (ws != nullptr) cudaFree(ws);
        if (ev0 != nullptr) cudaEventDestroy(ev0);
        if (ev1 != nullptr) cudaEventDestroy(ev1);
        if (stream != nullptr) cudaStreamDestroy(stream);
        bool const ok = buildOk && enqueueRc == 0 && cudaErr.empty();
        if (!ok) ++failures;
        js << ", \"enqueue_rc\": " << enqueueRc << ", \"cuda_error\": \"" << jsonEscape(cudaErr) << "\"";
        js << ", \"graph_capture_ok\": " << (captureOk ? "true" : "false") << ", \"graph_capture_error\": \""
           << jsonEscape(captureErr) << "\"";
        if (ms >= 0.0F) js << ", \"enqueue_ms\": " << ms << ", \"iters\": " << iters;
        std::cout << js.str() << ", \"ok\": " << (ok ? "true" : "false") << ", \"enqueued\": true}" << std::endl;
        if (!cudaErr.empty() && cudaErr.find("cudaStreamSynchronize") != std::string::npos) break;  // sticky error
    }
    return failures == 0 ? 0 : 1;
}

// Host-side check of the plugin library without TensorRT's runtime: dlopens libvlmx_trt_plugins.so (built against
// TensorRT headers only), calls getCreators(), and for each case read from stdin creates a plugin from fields,
// round-trips its serialization, and queries output count, types, shapes (through an evaluating IExprBuilder) and
// format support. Prints one JSON object per case; tests/test_plugin_lib_compile.py checks them against the op table.
//
// Case line: OP|name=i:3;name=f:0.5;name=s:bsd|half,half,half|2x8x64;2x8x64;2x8x64
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

// ---- an IExprBuilder that evaluates: constants stay constants, size tensors get ids -------------------------
#include "harness_common.h"

DataType parseType(std::string const& t) {
    if (t == "half") return DataType::kHALF;
    if (t == "float") return DataType::kFLOAT;
    if (t == "int8") return DataType::kINT8;
    if (t == "int32") return DataType::kINT32;
    if (t == "int64") return DataType::kINT64;
    std::cerr << "unknown dtype " << t << std::endl;
    std::exit(2);
}

std::string fieldsJson(PluginFieldCollection const* fc) {
    std::string out = "[";
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        out += (i ? ", " : "") + std::string("[\"") + f.name + "\", ";
        switch (f.type) {
        case PluginFieldType::kINT32: out += "\"int\", " + std::to_string(*static_cast<int32_t const*>(f.data)); break;
        case PluginFieldType::kFLOAT32: {
            std::ostringstream ss;
            ss.precision(9);
            ss << *static_cast<float const*>(f.data);
            out += "\"float\", " + ss.str();
            break;
        }
        case PluginFieldType::kCHAR:
            out += "\"string\", \"" + std::string(static_cast<char const*>(f.data), static_cast<size_t>(f.length)) + "\"";
            break;
        default: out += "\"other\", null";
        }
        out += "]";
    }
    return out + "]";
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: plugin_host_check <libvlmx_trt_plugins.so> < cases" << std::endl;
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL);
    if (lib == nullptr) {
        std::cerr << "dlopen: " << dlerror() << std::endl;
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    if (getCreators == nullptr || dlsym(lib, "setLoggerFinder") == nullptr) {
        std::cerr << "library lacks getCreators/setLoggerFinder" << std::endl;
        return 2;
    }
    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    std::cout << "{\"creators\": [";
    for (int32_t i = 0; i < nb; ++i) {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::cout << (i ? ", " : "") << "{\"name\": \"" << c->getPluginName() << "\", \"version\": \""
                  << c->getPluginVersion() << "\", \"namespace\": \"" << c->getPluginNamespace()
                  << "\", \"interface\": \"" << c->getInterfaceInfo().kind << "\", \"fields\": [";
        PluginFieldCollection const* fn = c->getFieldNames();
        for (int32_t f = 0; f < fn->nbFields; ++f) {
            std::cout << (f ? ", " : "") << "[\"" << fn->fields[f].name << "\", " << static_cast<int>(fn->fields[f].type)
                      << "]";
        }
        std::cout << "]}";
    }
    std::cout << "]}" << std::endl;

    std::string line;
    while (std::getline(std::cin, line)) {
        if (line.empty()) continue;
        std::vector<std::string> parts = split(line, '|');
        parts.resize(5);  // op | fields | input types | input shapes | shape-input values
        IPluginCreatorV3One* creator = nullptr;
        for (int32_t i = 0; i < nb; ++i) {
            auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
            if (parts[0] == c->getPluginName()) creator = c;
        }
        if (creator == nullptr) {
            std::cout << "{\"error\": \"no creator " << parts[0] << "\"}" << std::endl;
            continue;
        }
        ParsedFields const parsed(parts[1]);
        PluginFieldCollection const fc = parsed.collection();
        std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
        if (!plugin) {
            std::cout << "{\"created\": false}" << std::endl;
            continue;
        }
        auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
        auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
        auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        std::string const serialized = fieldsJson(runtime->getFieldsToSerialize());
        // Round trip: a plugin created (runtime phase) from the serialized fields serializes identically.
        std::unique_ptr<IPluginV3> again(
            creator->createPlugin("node", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
        std::string const reserialized = again ? fieldsJson(static_cast<IPluginV3OneRuntime*>(
            again->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize()) : "null";
        std::unique_ptr<IPluginV3> cloned(plugin->clone());

        auto const types = split(parts[2], ',');
        auto const shapes = split(parts[3], ';');
        int32_t const nbIn = static_cast<int32_t>(types.size());
        int32_t const nbOut = build->getNbOutputs();
        std::vector<DataType> inTypes, outTypes(static_cast<size_t>(nbOut));
        for (auto const& t : types) inTypes.push_back(parseType(t));
        int32_t const typesRc = build->getOutputDataTypes(outTypes.data(), nbOut, inTypes.data(), nbIn);

        Builder eb;
        std::vector<DimsExprs> inExprs(static_cast<size_t>(nbIn)), outExprs(static_cast<size_t>(nbOut));
        for (int32_t i = 0; i < nbIn; ++i) {
            auto const dims = split(shapes[static_cast<size_t>(i)], 'x');
            inExprs[static_cast<size_t>(i)].nbDims = static_cast<int32_t>(dims.size());
            for (size_t j = 0; j < dims.size(); ++j) {
                inExprs[static_cast<size_t>(i)].d[j] = eb.impl.constant(std::atoll(dims[j].c_str()));
            }
        }
        std::vector<DimsExprs> const shapeIn = shapeInputs(parts[4], eb);
        int32_t const shapesRc = build->getOutputShapes(inExprs.data(), nbIn, shapeIn.data(),
            static_cast<int32_t>(shapeIn.size()), outExprs.data(), nbOut, eb);

        // Format support for the given input types followed by the reported output types (linear).
        std::vector<DynamicPluginTensorDesc> io(static_cast<size_t>(nbIn + nbOut));
        for (int32_t i = 0; i < nbIn + nbOut; ++i) {
            io[static_cast<size_t>(i)].desc.type = i < nbIn ? inTypes[static_cast<size_t>(i)]
                                                             : outTypes[static_cast<size_t>(i - nbIn)];
            io[static_cast<size_t>(i)].desc.format = TensorFormat::kLINEAR;
            if (i < nbIn) {  // a profile whose min = max = the given input shape
                Dims d{};
                d.nbDims = inExprs[static_cast<size_t>(i)].nbDims;
                for (int32_t j = 0; j < d.nbDims; ++j) d.d[j] = inExprs[static_cast<size_t>(i)].d[j]->getConstantValue();
                io[static_cast<size_t>(i)].desc.dims = io[static_cast<size_t>(i)].min = io[static_cast<size_t>(i)].max = d;
            }
        }
        int32_t const configureRc = build->configurePlugin(io.data(), nbIn, io.data() + nbIn, nbOut);
        size_t const workspace = build->getWorkspaceSize(io.data(), nbIn, io.data() + nbIn, nbOut);
        // Runtime shape check with the concrete input shapes (what onShapeChange sees before enqueue).
        std::vector<PluginTensorDesc> rtIn(static_cast<size_t>(nbIn)), rtOut(static_cast<size_t>(nbOut));
        for (int32_t i = 0; i < nbIn; ++i) rtIn[static_cast<size_t>(i)] = io[static_cast<size_t>(i)].desc;
        for (int32_t o = 0; o < nbOut; ++o) rtOut[static_cast<size_t>(o)] = io[static_cast<size_t>(nbIn + o)].desc;
        int32_t const shapeCheck = runtime->onShapeChange(rtIn.data(), nbIn, rtOut.data(), nbOut);
        std::cout << "{\"created\": true, \"name\": \"" << core->getPluginName() << "\", \"cloned\": "
                  << (cloned ? "true" : "false") << ", \"serialized\": " << serialized
                  << ", \"reserialized\": " << reserialized << ", \"nb_outputs\": " << nbOut
                  << ", \"configure_rc\": " << configureRc << ", \"workspace\": " << workspace << ", \"shape_check\": " << shapeCheck << ", \"types_rc\": " << typesRc << ", \"output_types\": [";
        for (int32_t o = 0; o < nbOut; ++o) std::cout << (o ? ", " : "") << "\"" << typeName(outTypes[o]) << "\"";
        std::cout << "], \"shapes_rc\": " << shapesRc << ", \"output_shapes\": [";
        for (int32_t o = 0; o < nbOut && shapesRc == 0; ++o) {
            std::cout << (o ? ", " : "") << "[";
            for (int32_t j = 0; j < outExprs[o].nbDims; ++j) {
                IDimensionExpr const* e = outExprs[o].d[j];
                std::cout << (j ? ", " : "") << (e->isSizeTensor() ? -1 : e->getConstantValue());
            }
            std::cout << "]";
        }
        std::cout << "], \"size_tensors\": [";
        for (size_t s = 0; s < eb.impl.sizeTensors.size(); ++s) std::cout << (s ? ", " : "") << eb.impl.sizeTensors[s];
        std::cout << "], \"formats\": [";
        for (int32_t p = 0; p < nbIn + nbOut; ++p) {
            std::cout << (p ? ", " : "") << (build->supportsFormatCombination(p, io.data(), nbIn, nbOut) ? "true" : "false");
        }
        std::cout << "]}" << std::endl;
    }
    return 0;
}

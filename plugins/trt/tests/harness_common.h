// Shared by the plugin harnesses (plugin_host_check.cpp, plugin_enqueue_check.cpp): an IExprBuilder that
// evaluates (constants stay constants, declared size tensors are recorded and get a placeholder), the case-line
// splitter, dtype names, and the attribute parser that builds PluginFields as the ONNX parser passes them.
// Included inside each harness's anonymous namespace after `using namespace nvinfer1;`.
#ifndef VLMX_TRT_TESTS_HARNESS_COMMON_H_
#define VLMX_TRT_TESTS_HARNESS_COMMON_H_

struct ExprImpl : apiv::VDimensionExpr {
    int64_t value{0};
    bool size{false};
    bool isConstant() const override { return !size; }
    int64_t getConstantValue() const override { return size ? -1 : value; }
    bool isSizeTensor() const override { return size; }
};

struct Expr : IDimensionExpr {
    ExprImpl impl;
    Expr(int64_t v, bool s) {
        impl.value = v;
        impl.size = s;
        mImpl = &impl;
    }
    ~Expr() noexcept override = default;
};

struct BuilderImpl : apiv::VExprBuilder {
    std::vector<std::unique_ptr<Expr>> pool;
    std::vector<std::string> sizeTensors;
    IDimensionExpr const* make(int64_t v, bool s = false) {
        pool.emplace_back(new Expr(v, s));
        return pool.back().get();
    }
    IDimensionExpr const* constant(int64_t value) override { return make(value); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        int64_t const x = a.getConstantValue();
        int64_t const y = b.getConstantValue();
        switch (op) {
        case DimensionOperation::kSUM: return make(x + y);
        case DimensionOperation::kPROD: return make(x * y);
        case DimensionOperation::kMAX: return make(x > y ? x : y);
        case DimensionOperation::kMIN: return make(x < y ? x : y);
        case DimensionOperation::kSUB: return make(x - y);
        case DimensionOperation::kEQUAL: return make(x == y);
        case DimensionOperation::kLESS: return make(x < y);
        case DimensionOperation::kFLOOR_DIV: return make(x / y);
        case DimensionOperation::kCEIL_DIV: return make((x + y - 1) / y);
        }
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t outputIndex, IDimensionExpr const& opt,
        IDimensionExpr const& upper) override {
        sizeTensors.push_back("{\"output\": " + std::to_string(outputIndex) + ", \"opt\": "
            + std::to_string(opt.getConstantValue()) + ", \"upper\": " + std::to_string(upper.getConstantValue()) + "}");
        return make(-1, true);
    }
};

struct Builder : IExprBuilder {
    BuilderImpl impl;
    Builder() { mImpl = &impl; }
};

std::vector<std::string> split(std::string const& s, char sep) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, sep)) out.push_back(item);
    if (!s.empty() && s.back() == sep) out.emplace_back();
    return out;
}

//! Shape inputs of a case ("144;2x3": one DimsExprs of constants per ';'-separated value list), as TensorRT
//! passes a node's tensorrt_plugin_shape_input_indices inputs to getOutputShapes.
std::vector<DimsExprs> shapeInputs(std::string const& spec, Builder& eb) {
    std::vector<DimsExprs> out;
    for (auto const& item : split(spec, ';')) {
        if (item.empty()) continue;
        DimsExprs e{};
        for (auto const& v : split(item, 'x')) e.d[e.nbDims++] = eb.impl.constant(std::atoll(v.c_str()));
        out.push_back(e);
    }
    return out;
}

char const* typeName(DataType t) {
    switch (t) {
    case DataType::kHALF: return "half";
    case DataType::kFLOAT: return "float";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    default: return "other";
    }
}

// Attributes `name=i:3;name=f:0.5;name=s:bsd` as the ONNX parser passes them: INT32 / FLOAT32 / CHAR (length
// without NUL). The storage is reserved up front and the object is not copyable, so the field pointers stay valid.
struct ParsedFields {
    std::vector<std::string> names, strs;
    std::vector<int32_t> ints;
    std::vector<float> floats;
    std::vector<PluginField> fields;

    explicit ParsedFields(std::string const& spec) {
        auto const attrs = split(spec, ';');
        names.reserve(attrs.size());
        strs.reserve(attrs.size());
        ints.reserve(attrs.size());
        floats.reserve(attrs.size());
        for (auto const& a : attrs) {
            if (a.empty()) continue;
            size_t const eq = a.find('=');
            names.push_back(a.substr(0, eq));
            char const kind = a[eq + 1];
            std::string const val = a.substr(eq + 3);
            if (kind == 'i') {
                ints.push_back(std::atoi(val.c_str()));
                fields.emplace_back(names.back().c_str(), &ints.back(), PluginFieldType::kINT32, 1);
            } else if (kind == 'f') {
                floats.push_back(static_cast<float>(std::atof(val.c_str())));
                fields.emplace_back(names.back().c_str(), &floats.back(), PluginFieldType::kFLOAT32, 1);
            } else {
                strs.push_back(val);
                fields.emplace_back(names.back().c_str(), strs.back().c_str(), PluginFieldType::kCHAR,
                    static_cast<int32_t>(strs.back().size()));
            }
        }
    }
    ParsedFields(ParsedFields const&) = delete;
    ParsedFields& operator=(ParsedFields const&) = delete;
    PluginFieldCollection collection() const { return {static_cast<int32_t>(fields.size()), fields.data()}; }
};

#endif  // VLMX_TRT_TESTS_HARNESS_COMMON_H_

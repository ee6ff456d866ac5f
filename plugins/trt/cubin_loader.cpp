// Triton cubin registry: manifest parsing, driver-API module loading (per CUDA context) and launches.
#include "cubin_loader.h"

#include "vlmx_json.h"

#include <cuda.h>
#include <dlfcn.h>

#include <cctype>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace vlmx {
namespace {

// The few driver entry points the loader needs, resolved from libcuda.so.1 at first launch.
struct Driver {
    CUresult (*ctxGetCurrent)(CUcontext*){nullptr};
    CUresult (*moduleLoadData)(CUmodule*, void const*){nullptr};
    CUresult (*moduleGetFunction)(CUfunction*, CUmodule, char const*){nullptr};
    CUresult (*launchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**){nullptr};
    CUresult (*funcSetAttribute)(CUfunction, CUfunction_attribute, int){nullptr};
    CUresult (*getErrorString)(CUresult, char const**){nullptr};
    std::string error;
    bool ok{false};
};

Driver const& driver() {
    static Driver const d = [] {
        Driver r;
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr) {
            r.error = std::string("cannot open libcuda.so.1 (is an NVIDIA driver installed?): ") + dlerror();
            return r;
        }
        auto sym = [&](char const* name) {
            void* p = dlsym(lib, name);
            if (p == nullptr && r.error.empty()) r.error = std::string("libcuda.so.1 lacks ") + name;
            return p;
        };
        r.ctxGetCurrent = reinterpret_cast<decltype(r.ctxGetCurrent)>(sym("cuCtxGetCurrent"));
        r.moduleLoadData = reinterpret_cast<decltype(r.moduleLoadData)>(sym("cuModuleLoadData"));
        r.moduleGetFunction = reinterpret_cast<decltype(r.moduleGetFunction)>(sym("cuModuleGetFunction"));
        r.launchKernel = reinterpret_cast<decltype(r.launchKernel)>(sym("cuLaunchKernel"));
        r.funcSetAttribute = reinterpret_cast<decltype(r.funcSetAttribute)>(sym("cuFuncSetAttribute"));
        r.getErrorString = reinterpret_cast<decltype(r.getErrorString)>(sym("cuGetErrorString"));
        r.ok = r.error.empty();
        return r;
    }();
    return d;
}

std::string cuError(CUresult rc) {
    char const* msg = nullptr;
    if (driver().getErrorString != nullptr) driver().getErrorString(rc, &msg);
    return msg != nullptr ? std::string(msg) : "CUDA driver error " + std::to_string(static_cast<int>(rc));
}

ParamType parseParamType(std::string const& t, std::string const& where) {
    if (!t.empty() && (t[0] == '*' || t == "ptr")) return ParamType::kPtr;
    if (t == "i32" || t == "u32" || t == "i1" || t == "i8" || t == "i16") return ParamType::kI32;
    if (t == "i64" || t == "u64") return ParamType::kI64;
    if (t == "fp32" || t == "f32") return ParamType::kF32;
    throw std::runtime_error(where + ": parameter type \"" + t + "\" is not supported (expected *<dtype>, i32, i64 "
                             "or fp32)");
}

std::string readFile(std::string const& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path);
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

}  // namespace

CubinManifest parseCubinManifest(std::string const& text, std::string const& manifestDir) {
    json::Value root = json::parse(text);
    if (!root.has("format") || root.at("format").type != json::Value::Type::kNumber || root.at("format").integer() != 1) {
        throw std::runtime_error("not a format-1 vlmx Triton manifest (\"format\" is missing or not 1); rebuild the "
                                 "Triton kernels with this vlmx");
    }
    CubinManifest m;
    m.sm = static_cast<int32_t>(root.at("sm").integer());
    auto path = [&](std::string const& rel) { return (!rel.empty() && rel[0] == '/') ? rel : manifestDir + "/" + rel; };
    for (auto const& k : root.at("kernels").array) {
        std::string where = "kernel entry";
        try {
            KernelSpec spec;
            spec.kernel = k.at("kernel").str();
            spec.spec = k.at("spec").str();
            where = "kernel " + spec.kernel + "." + spec.spec;
            spec.symbol = k.at("symbol").str();
            spec.cubinPath = path(k.at("cubin").str());
            spec.ptxPath = k.has("ptx") ? path(k.at("ptx").str()) : "";
            for (auto const& p : k.at("params").array) {
                spec.params.push_back({p.at("name").str(), parseParamType(p.at("type").str(), where)});
            }
            if (k.has("trailing_params")) {
                for (auto const& p : k.at("trailing_params").array) {
                    if (p.has("size") && p.at("size").integer() != 0) {
                        throw std::runtime_error("needs " + std::to_string(p.at("size").integer()) + " bytes of "
                                                 + p.at("name").str() + " scratch, which this loader does not allocate");
                    }
                    ++spec.trailingParams;
                }
            }
            spec.threadsPerBlock = static_cast<int32_t>(k.has("threads_per_block") ? k.at("threads_per_block").integer()
                                                                                   : 32 * k.at("num_warps").integer());
            spec.sharedBytes = static_cast<int32_t>(k.has("shared_bytes") ? k.at("shared_bytes").integer() : 0);
            auto const& grid = k.at("grid").array;
            if (grid.empty() || grid.size() > 3) throw std::runtime_error("grid must have 1 to 3 entries");
            for (auto const& g : grid) {
                spec.grid.push_back(g.type == json::Value::Type::kNumber ? std::to_string(g.integer()) : g.str());
            }
            while (spec.grid.size() < 3) spec.grid.push_back("1");
            if (k.has("match")) {
                json::Value const& match = k.at("match");
                if (match.has("dtype") && match.at("dtype").type == json::Value::Type::kString) {
                    spec.dtype = match.at("dtype").str();
                }
                if (match.has("ranges")) {
                    for (auto const& r : match.at("ranges").object) {
                        auto const& lohi = r.second.array;
                        if (lohi.size() != 2) throw std::runtime_error("range " + r.first + " is not [lo, hi]");
                        spec.ranges.push_back({r.first, lohi[0].integer(),
                            lohi[1].type == json::Value::Type::kNull ? -1 : lohi[1].integer()});
                    }
                }
            }
            if (k.has("divisible_by_16")) {
                for (auto const& n : k.at("divisible_by_16").array) spec.divisibleBy16.push_back(n.str());
            }
            m.kernels.push_back(spec);
        } catch (std::exception const& e) {
            throw std::runtime_error(where + ": " + e.what());
        }
    }
    return m;
}

KernelSpec const* selectKernel(CubinManifest const& m, std::string const& kernel, std::string const& dtype,
    KernelArgs const& args, std::string* why) {
    std::string seen;
    for (KernelSpec const& e : m.kernels) {
        if (e.kernel != kernel) continue;
        seen += (seen.empty() ? "" : ", ") + e.spec;
        if (!e.dtype.empty() && e.dtype != dtype) continue;
        bool ok = true;
        for (KernelRange const& r : e.ranges) {
            if (!args.hasInt(r.name)) {
                ok = false;
                break;
            }
            int64_t const v = args.getInt(r.name);
            ok = ok && v >= r.lo && (r.hi < 0 || v <= r.hi);
        }
        for (std::string const& n : e.divisibleBy16) {
            if (args.hasPtr(n)) ok = ok && reinterpret_cast<uintptr_t>(args.getPtr(n)) % 16 == 0;
            else if (args.hasInt(n)) ok = ok && args.getInt(n) % 16 == 0;
            else ok = false;
        }
        if (ok) return &e;
    }
    if (why != nullptr) {
        *why = seen.empty() ? "the manifest has no kernel \"" + kernel + "\""
                            : "no specialisation of " + kernel + " fits dtype " + dtype + " and these sizes; available: " + seen;
    }
    return nullptr;
}

int64_t evalGridEntry(std::string const& entry, KernelArgs const& args) {
    auto value = [&](std::string const& tok) -> int64_t {
        if (!tok.empty() && (std::isdigit(static_cast<unsigned char>(tok[0])) != 0)) return std::stoll(tok);
        if (!args.hasInt(tok)) throw std::runtime_error("grid refers to \"" + tok + "\", which the plugin does not pass");
        return args.getInt(tok);
    };
    int64_t v = 0;
    if (entry.rfind("cdiv(", 0) == 0 && entry.back() == ')') {
        std::string const inner = entry.substr(5, entry.size() - 6);
        size_t const comma = inner.find(',');
        if (comma == std::string::npos) throw std::runtime_error("grid entry \"" + entry + "\" is not cdiv(a,b)");
        auto trim = [](std::string s) {
            s.erase(0, s.find_first_not_of(' '));
            s.erase(s.find_last_not_of(' ') + 1);
            return s;
        };
        int64_t const a = value(trim(inner.substr(0, comma)));
        int64_t const b = value(trim(inner.substr(comma + 1)));
        if (b <= 0) throw std::runtime_error("grid entry \"" + entry + "\" divides by a non-positive value");
        v = (a + b - 1) / b;
    } else {
        v = value(entry);
    }
    if (v <= 0 || v > 0x7fffffff) {
        throw std::runtime_error("grid entry \"" + entry + "\" evaluates to " + std::to_string(v)
                                 + " (expected 1..2^31-1)");
    }
    return v;
}

CubinRegistry& CubinRegistry::instance() {
    static CubinRegistry registry;
    return registry;
}

std::string CubinRegistry::defaultManifestPath() {
    if (char const* env = std::getenv("VLMX_TRITON_MANIFEST")) return env;
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&CubinRegistry::instance), &info) != 0 && info.dli_fname != nullptr) {
        std::string lib(info.dli_fname);
        size_t const slash = lib.find_last_of('/');
        std::string const dir = slash == std::string::npos ? "." : lib.substr(0, slash);
        return dir + "/triton/manifest.json";
    }
    return "triton/manifest.json";
}

void CubinRegistry::loadManifest(std::string const& path) {
    std::lock_guard<std::mutex> lock(mutex_);
    attempted_ = true;
    manifestPath_ = path;
    manifest_ = CubinManifest{};
    functions_.clear();  // modules stay loaded until process exit: a context may still run them
    error_.clear();
    try {
        size_t const slash = path.find_last_of('/');
        manifest_ = parseCubinManifest(readFile(path), slash == std::string::npos ? "." : path.substr(0, slash));
    } catch (std::exception const& e) {
        error_ = "Triton kernel manifest " + path + ": " + e.what()
            + " (build it with `python -m vlmx.plugins.triton_aot --target trt-sm75 --out <dir>` and put it in "
              "<plugin library dir>/triton/, or set VLMX_TRITON_MANIFEST)";
    }
}

bool CubinRegistry::ensureLoaded() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (attempted_) return error_.empty();
    }
    loadManifest(defaultManifestPath());
    std::lock_guard<std::mutex> lock(mutex_);
    return error_.empty();
}

bool CubinRegistry::has(std::string const& kernel, std::string const& dtype) {
    if (!ensureLoaded()) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    for (KernelSpec const& e : manifest_.kernels) {
        if (e.kernel == kernel && (e.dtype.empty() || e.dtype == dtype)) return true;
    }
    error_ = "Triton kernel " + kernel + " for " + dtype + " is not in " + manifestPath_
        + "; rebuild the Triton kernels (python -m vlmx.plugins.triton_aot)";
    return false;
}

std::string CubinRegistry::lastError() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
}

void* CubinRegistry::moduleFunction(KernelSpec const& spec) {
    Driver const& d = driver();
    if (!d.ok) throw std::runtime_error(d.error);
    CUcontext ctx = nullptr;
    CUresult rc = d.ctxGetCurrent(&ctx);
    if (rc != CUDA_SUCCESS || ctx == nullptr) throw std::runtime_error("no current CUDA context: " + cuError(rc));
    auto key = std::make_pair(static_cast<void*>(ctx), spec.kernel + "." + spec.spec);
    auto it = functions_.find(key);
    if (it != functions_.end()) return it->second;
    // cubin when the device runs the manifest's sm natively (same major, minor >=), else the PTX through the JIT.
    int dev = 0;
    int major = 0;
    int minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    int const deviceSm = 10 * major + minor;
    if (deviceSm < manifest_.sm) {
        throw std::runtime_error("kernels built for sm_" + std::to_string(manifest_.sm) + " cannot run on this sm_"
                                 + std::to_string(deviceSm) + " GPU; build them for a target <= sm_" + std::to_string(deviceSm));
    }
    char const* prefer = std::getenv("VLMX_TRITON_PREFER");
    bool const native = manifest_.sm / 10 == deviceSm / 10;
    bool const usePtx = prefer != nullptr ? std::string(prefer) == "ptx" : !native;
    std::string image = readFile(usePtx ? spec.ptxPath : spec.cubinPath);
    if (usePtx) image.push_back('\0');  // the driver wants NUL-terminated PTX
    CUmodule mod = nullptr;
    rc = d.moduleLoadData(&mod, image.data());
    if (rc != CUDA_SUCCESS) {
        throw std::runtime_error("cuModuleLoadData(" + (usePtx ? spec.ptxPath : spec.cubinPath) + ") failed: " + cuError(rc));
    }
    CUfunction fn = nullptr;
    rc = d.moduleGetFunction(&fn, mod, spec.symbol.c_str());
    if (rc != CUDA_SUCCESS) throw std::runtime_error("module has no function " + spec.symbol + ": " + cuError(rc));
    if (spec.sharedBytes > 48 * 1024) {
        rc = d.funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, spec.sharedBytes);
        if (rc != CUDA_SUCCESS) throw std::runtime_error("cannot raise dynamic shared memory: " + cuError(rc));
    }
    functions_[key] = fn;
    return fn;
}

int32_t CubinRegistry::launch(std::string const& kernel, std::string const& dtype, KernelArgs const& args,
    cudaStream_t stream) {
    if (!has(kernel, dtype)) return -1;
    std::lock_guard<std::mutex> lock(mutex_);
    try {
        std::string why;
        KernelSpec const* found = selectKernel(manifest_, kernel, dtype, args, &why);
        if (found == nullptr) throw std::runtime_error(why);
        KernelSpec const& spec = *found;
        // Argument storage must outlive cuLaunchKernel: 8 bytes per slot covers every scalar and pointer.
        std::vector<uint64_t> storage(spec.params.size() + static_cast<size_t>(spec.trailingParams), 0);
        std::vector<void*> slots(storage.size());
        for (size_t i = 0; i < spec.params.size(); ++i) {
            KernelParam const& p = spec.params[i];
            void* slot = &storage[i];
            switch (p.type) {
            case ParamType::kPtr:
                if (!args.hasPtr(p.name)) throw std::runtime_error("pointer \"" + p.name + "\" not passed");
                *static_cast<void**>(slot) = args.getPtr(p.name);
                break;
            case ParamType::kI32: {
                if (!args.hasInt(p.name)) throw std::runtime_error("int \"" + p.name + "\" not passed");
                int64_t const v = args.getInt(p.name);
                if (v < INT32_MIN || v > INT32_MAX) throw std::runtime_error(p.name + " does not fit int32");
                *static_cast<int32_t*>(slot) = static_cast<int32_t>(v);
                break;
            }
            case ParamType::kI64:
                if (!args.hasInt(p.name)) throw std::runtime_error("int \"" + p.name + "\" not passed");
                *static_cast<int64_t*>(slot) = args.getInt(p.name);
                break;
            case ParamType::kF32:
                if (!args.hasFloat(p.name)) throw std::runtime_error("float \"" + p.name + "\" not passed");
                *static_cast<float*>(slot) = args.getFloat(p.name);
                break;
            }
            slots[i] = slot;
        }
        for (size_t i = spec.params.size(); i < storage.size(); ++i) slots[i] = &storage[i];
        int64_t grid[3];
        for (int j = 0; j < 3; ++j) grid[j] = evalGridEntry(spec.grid[static_cast<size_t>(j)], args);
        auto fn = static_cast<CUfunction>(moduleFunction(spec));
        CUresult const rc = driver().launchKernel(fn, static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]),
            static_cast<unsigned>(grid[2]), static_cast<unsigned>(spec.threadsPerBlock), 1, 1,
            static_cast<unsigned>(spec.sharedBytes), reinterpret_cast<CUstream>(stream), slots.data(), nullptr);
        if (rc != CUDA_SUCCESS) throw std::runtime_error("cuLaunchKernel failed: " + cuError(rc));
    } catch (std::exception const& e) {
        error_ = "Triton kernel " + kernel + " (" + dtype + "): " + e.what();
        return -1;
    }
    return 0;
}

}  // namespace vlmx

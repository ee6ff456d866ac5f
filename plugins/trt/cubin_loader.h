// Loads the ahead-of-time compiled Triton kernels (vlmx.plugins.triton_aot: cubins, PTX and manifest.json) and
// launches them through the CUDA driver API, mirroring vlmx.plugins.cubin_loader (the Python loader). The driver is
// opened with dlopen("libcuda.so.1") so the plugin library links only cudart and loads without a driver (CI).
//
// Manifest (format 1, see plugins/triton_aot.py and docs/tensorrt.md): {"format": 1, "sm": 75, "kernels": [entry...]},
// entry = {kernel, spec, symbol, cubin, ptx, params: [{name, type}], trailing_params: [{name, type, size}],
//          num_warps, threads_per_block, shared_bytes, grid: [3 x "int" | "name" | "cdiv(name,int)"],
//          match: {dtype: "float16"|"float32"|null, ranges: {name: [lo, hi|null]}}, divisible_by_16: [names]}.
// A launch names the kernel, the dtype and the values (KernelArgs, by the manifest's param names); the first entry
// whose dtype, ranges and 16-divisibility hold is used, exactly as the Python loader selects.
#ifndef VLMX_CUBIN_LOADER_H_
#define VLMX_CUBIN_LOADER_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace vlmx {

//! Named kernel arguments: device pointers and scalars, matched to the manifest's params by name.
class KernelArgs {
public:
    KernelArgs& ptr(std::string const& name, void const* p) {
        ptrs_[name] = const_cast<void*>(p);
        return *this;
    }
    KernelArgs& i64(std::string const& name, int64_t v) {
        ints_[name] = v;
        return *this;
    }
    KernelArgs& f32(std::string const& name, float v) {
        floats_[name] = v;
        return *this;
    }
    bool hasPtr(std::string const& n) const { return ptrs_.count(n) != 0; }
    bool hasInt(std::string const& n) const { return ints_.count(n) != 0; }
    bool hasFloat(std::string const& n) const { return floats_.count(n) != 0; }
    void* getPtr(std::string const& n) const { return ptrs_.at(n); }
    int64_t getInt(std::string const& n) const { return ints_.at(n); }
    float getFloat(std::string const& n) const { return floats_.at(n); }

private:
    std::map<std::string, void*> ptrs_;
    std::map<std::string, int64_t> ints_;
    std::map<std::string, float> floats_;
};

enum class ParamType : int32_t { kPtr = 0, kI32 = 1, kI64 = 2, kF32 = 3 };

struct KernelParam {
    std::string name;
    ParamType type;
};

struct KernelRange {
    std::string name;
    int64_t lo;
    int64_t hi;  // -1: unbounded
};

struct KernelSpec {
    std::string kernel;
    std::string spec;
    std::string symbol;
    std::string cubinPath;
    std::string ptxPath;
    std::vector<KernelParam> params;
    int32_t trailingParams{0};  // scratch pointers Triton appends (passed as 0; a non-zero size is rejected)
    int32_t threadsPerBlock{128};
    int32_t sharedBytes{0};
    std::vector<std::string> grid;  // three entries: integer literal, value name, or cdiv(name,k)
    std::string dtype;              // "" = any
    std::vector<KernelRange> ranges;
    std::vector<std::string> divisibleBy16;
};

struct CubinManifest {
    int32_t sm{0};
    std::vector<KernelSpec> kernels;
};

//! Parses a manifest; throws std::runtime_error naming the entry and the bad field.
CubinManifest parseCubinManifest(std::string const& text, std::string const& manifestDir);

//! The first entry of `kernel` whose dtype, ranges and divisibility hold for the args, or nullptr (why in `why`).
KernelSpec const* selectKernel(CubinManifest const& m, std::string const& kernel, std::string const& dtype,
    KernelArgs const& args, std::string* why);

//! Evaluates one grid entry against the arguments; throws when a name is unknown or the result is not positive.
int64_t evalGridEntry(std::string const& entry, KernelArgs const& args);

//! Process-wide registry of Triton kernels, loaded lazily from the manifest on first use.
class CubinRegistry {
public:
    static CubinRegistry& instance();

    //! Path of the manifest: $VLMX_TRITON_MANIFEST, else <directory of this library>/triton/manifest.json.
    static std::string defaultManifestPath();

    //! True when the manifest is readable and has some entry of `kernel` for `dtype` (else see lastError()).
    bool has(std::string const& kernel, std::string const& dtype);

    //! Selects and launches a specialisation on the stream; 0 on success, -1 with lastError() set otherwise.
    int32_t launch(std::string const& kernel, std::string const& dtype, KernelArgs const& args, cudaStream_t stream);

    std::string lastError() const;

    //! Replaces the manifest (tests and tools); functions loaded from the previous one are forgotten.
    void loadManifest(std::string const& path);

private:
    CubinRegistry() = default;
    bool ensureLoaded();
    void* moduleFunction(KernelSpec const& spec);

    mutable std::mutex mutex_;
    bool attempted_{false};
    std::string manifestPath_;
    std::string error_;
    CubinManifest manifest_;
    std::map<std::pair<void*, std::string>, void*> functions_;  // (CUcontext, kernel.spec) -> CUfunction
};

}  // namespace vlmx
#endif  // VLMX_CUBIN_LOADER_H_

// Loads the ahead-of-time compiled Triton kernels (cubins + manifest.json written by vlmx.plugins.triton_aot) and
// launches them through the CUDA driver API. The driver is opened with dlopen("libcuda.so.1") so the plugin library
// links only cudart and loads on machines (and in CI) without a driver.
//
// Manifest schema (format "vlmx-triton-cubins", format_version 1), see docs/tensorrt.md:
//   {"format": "vlmx-triton-cubins", "format_version": 1, "sm": 75,
//    "kernels": {"<kernel>": {"cubin": "<path relative to the manifest>", "function": "<entry symbol>",
//                             "num_warps": 4, "shared": 0,
//                             "params": [{"name": "x", "type": "*fp16"}, {"name": "n_cols", "type": "i32"}, ...],
//                             "grid": ["n_rows", 1, 1],            // ints, param names, or "cdiv(<name>,<int>)"
//                             "trailing_null_ptrs": 2}}}           // Triton >= 3.5 scratch pointers, passed as 0
// The plugin supplies arguments by name (KernelArgs); the manifest's params fix their order and types.
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

struct KernelSpec {
    std::string name;
    std::string cubinPath;
    std::string function;
    int32_t numWarps{4};
    int32_t sharedBytes{0};
    std::vector<KernelParam> params;
    std::vector<std::string> grid;  // three entries: integer literal, param name, or cdiv(name,k)
    int32_t trailingNullPtrs{0};
};

//! Parses a manifest; throws std::runtime_error naming the file, the kernel and the bad entry.
std::map<std::string, KernelSpec> parseCubinManifest(std::string const& text, std::string const& manifestDir);

//! Evaluates one grid entry against the arguments; throws when a name is unknown or the result is not positive.
int64_t evalGridEntry(std::string const& entry, KernelArgs const& args);

//! Process-wide registry of Triton kernels, loaded lazily from the manifest on first use.
class CubinRegistry {
public:
    static CubinRegistry& instance();

    //! Path of the manifest: $VLMX_TRITON_MANIFEST, else <directory of this library>/triton/manifest.json.
    static std::string defaultManifestPath();

    //! True when the manifest is readable and lists the kernel (the reason is in lastError() otherwise).
    bool has(std::string const& kernel);

    //! Launches a kernel on the stream; returns 0 on success, -1 with lastError() set otherwise.
    int32_t launch(std::string const& kernel, KernelArgs const& args, cudaStream_t stream);

    std::string lastError() const;

    //! Replaces the manifest (tests and tools); clears modules loaded from the previous one.
    void loadManifest(std::string const& path);

private:
    CubinRegistry() = default;
    bool ensureLoaded();
    void* moduleFunction(KernelSpec const& spec);

    mutable std::mutex mutex_;
    bool attempted_{false};
    std::string manifestPath_;
    std::string error_;
    std::map<std::string, KernelSpec> kernels_;
    std::map<std::pair<void*, std::string>, void*> functions_;  // (CUcontext, kernel) -> CUfunction
    std::vector<void*> modules_;
};

}  // namespace vlmx
#endif  // VLMX_CUBIN_LOADER_H_

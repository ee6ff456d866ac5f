// Prints which Triton specialisation the C++ loader selects, so tests/test_plugin_lib_compile.py can compare it with
// the Python loader (plugins/cubin_loader.select_entry) on a real manifest from plugins/triton_aot.py.
//
// Usage: cubin_select_check <manifest.json> < cases; case line: kernel|dtype|name=i:V;name=p:ADDR;name=f:V
// Output line per case: {"spec": "<spec>"} or {"spec": null, "why": "..."}; a bad manifest exits 3 with the reason.
#include "cubin_loader.h"

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {
std::vector<std::string> split(std::string const& s, char sep) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, sep)) out.push_back(item);
    return out;
}
}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: cubin_select_check <manifest.json> < cases" << std::endl;
        return 2;
    }
    std::ifstream f(argv[1]);
    std::stringstream text;
    text << f.rdbuf();
    std::string const path(argv[1]);
    vlmx::CubinManifest manifest;
    try {
        manifest = vlmx::parseCubinManifest(text.str(), path.substr(0, path.find_last_of('/')));
    } catch (std::exception const& e) {
        std::cout << "{\"error\": \"" << e.what() << "\"}" << std::endl;
        return 3;
    }
    std::string line;
    while (std::getline(std::cin, line)) {
        if (line.empty()) continue;
        auto parts = split(line, '|');
        parts.resize(3);
        vlmx::KernelArgs args;
        for (auto const& kv : split(parts[2], ';')) {
            size_t const eq = kv.find('=');
            std::string const name = kv.substr(0, eq);
            char const kind = kv[eq + 1];
            std::string const v = kv.substr(eq + 3);
            if (kind == 'i') args.i64(name, std::atoll(v.c_str()));
            else if (kind == 'f') args.f32(name, static_cast<float>(std::atof(v.c_str())));
            else args.ptr(name, reinterpret_cast<void const*>(static_cast<uintptr_t>(std::strtoull(v.c_str(), nullptr, 10))));
        }
        std::string why;
        vlmx::KernelSpec const* spec = vlmx::selectKernel(manifest, parts[0], parts[1], args, &why);
        if (spec != nullptr) {
            std::cout << "{\"spec\": \"" << spec->spec << "\", \"grid\": [";
            for (int j = 0; j < 3; ++j) std::cout << (j ? ", " : "") << vlmx::evalGridEntry(spec->grid[j], args);
            std::cout << "], \"threads\": " << spec->threadsPerBlock << "}" << std::endl;
        } else {
            std::cout << "{\"spec\": null}" << std::endl;
        }
    }
    return 0;
}

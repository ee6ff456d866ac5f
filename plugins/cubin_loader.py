"""Load precompiled Triton cubins/PTX with the CUDA driver API and launch them from a manifest (no Triton needed).

The manifest (:mod:`vlmx.plugins.triton_aot`) is pure data; this module turns it into launches:

- :func:`select_entry`: the first specialisation whose dtype, size ranges and 16-divisibility promises hold;
- :func:`grid_of` / :func:`pack_args`: grid and the packed parameter list (params, then Triton's trailing
  scratch pointers, 0 when their size is 0) — both pure, tested on the CPU;
- :func:`load_module` / :func:`launch` and :class:`KernelLibrary`: ``cuModuleLoadData`` and ``cuLaunchKernel``
  through ``cuda.bindings.driver``, imported lazily so CPU-only installs never need a driver.

The TensorRT plugin library (C++) follows the same rules on the same manifest.
"""
from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "fp32": ctypes.c_float}
_INITIALIZED = False
_GRID_CDIV = re.compile(r"^cdiv\((\w+),(\d+)\)$")


class LoaderError(RuntimeError):
    """A manifest, a selection or the CUDA driver could not give what a launch needs."""


# ------------------------------------------------------------------------------------------------ pure logic
def read_manifest(directory) -> dict:
    """Read ``<directory>/manifest.json``; the error says how to build one."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise LoaderError(f"no Triton kernel manifest at {path}; build one with "
                          f"`python -m vlmx.plugins.triton_aot --target trt-sm75 --out {directory}`")
    m = json.loads(path.read_text())
    m["_dir"] = str(Path(directory))
    return m


def _divisible(value, name: str) -> bool:
    v = value if isinstance(value, int) else getattr(value, "data_ptr", lambda: None)()
    if v is None:
        raise LoaderError(f"cannot check 16-divisibility of {name}={value!r}: expected an int or a tensor")
    return v % 16 == 0


def select_entry(manifest: dict, kernel: str, dtype: str | None, values: dict) -> dict:
    """The first entry of ``kernel`` whose match (dtype, ranges) and ``divisible_by_16`` hold for ``values``.

    ``values`` maps parameter and size names to ints, floats or tensors (pointers: ``data_ptr()``).
    """
    seen = []
    for e in manifest["kernels"]:
        if e["kernel"] != kernel:
            continue
        seen.append(e["spec"])
        if e["match"]["dtype"] not in (None, dtype):
            continue
        ok = True
        for name, (lo, hi) in e["match"]["ranges"].items():
            v = values[name]
            if v < lo or (hi is not None and v > hi):
                ok = False
        if ok and all(_divisible(values[n], n) for n in e["divisible_by_16"]):
            return e
    if not seen:
        raise LoaderError(f"manifest for {manifest.get('target')} has no kernel {kernel!r}; rebuild it with "
                          "python -m vlmx.plugins.triton_aot")
    ranges = {n: values.get(n) for e in manifest["kernels"] if e["kernel"] == kernel for n in e["match"]["ranges"]}
    raise LoaderError(f"no specialisation of {kernel} fits dtype={dtype} sizes={ranges}; available: {seen}")


def grid_of(entry: dict, values: dict) -> tuple[int, int, int]:
    """Evaluate the entry's grid formula (integers, value names, ``cdiv(name,k)``) over ``values``."""
    dims = []
    for g in entry["grid"]:
        g = g.replace(" ", "")
        if g.isdigit():
            dims.append(int(g))
        elif (m := _GRID_CDIV.match(g)):
            dims.append(-(-int(values[m.group(1)]) // int(m.group(2))))
        elif g in values:
            dims.append(int(values[g]))
        else:
            raise LoaderError(f"{entry['kernel']}.{entry['spec']}: grid term {g!r} names no launch value; "
                              f"have {sorted(values)}")
    if any(d < 1 or d > 2**31 - 1 for d in dims) or dims[1] > 65535 or dims[2] > 65535:
        raise LoaderError(f"{entry['kernel']}.{entry['spec']}: grid {dims} is outside CUDA limits "
                          "(x in [1, 2^31-1], y and z in [1, 65535])")
    return tuple(dims)


def pack_args(entry: dict, values: dict) -> list:
    """ctypes objects for every kernel parameter in ABI order: params, then trailing scratch pointers (0)."""
    out = []
    for p in entry["params"]:
        name, typ = p["name"], p["type"]
        if name not in values:
            raise LoaderError(f"{entry['kernel']}: missing launch value {name!r} ({typ})")
        v = values[name]
        if typ.startswith("*"):
            ptr = v if isinstance(v, int) else v.data_ptr()
            out.append(ctypes.c_uint64(ptr))
        elif typ in ("i32", "i64"):
            lim = 2 ** (31 if typ == "i32" else 63)
            if not -lim <= int(v) < lim:
                raise LoaderError(f"{entry['kernel']}: {name}={v} does not fit {typ}; split the input")
            out.append(_CTYPES[typ](int(v)))
        elif typ == "fp32":
            out.append(ctypes.c_float(float(v)))
        else:
            raise LoaderError(f"{entry['kernel']}: parameter {name} has unknown type {typ!r}")
    for p in entry["trailing_params"]:
        if p.get("size", 0):
            raise LoaderError(f"{entry['kernel']}.{entry['spec']} needs {p['size']} bytes of {p['name']}, which "
                              "this loader does not allocate; the kernel must be changed to use no scratch")
        out.append(ctypes.c_uint64(0))
    return out


def choose_binary(manifest: dict, device_sm: int, prefer: str | None = None) -> str:
    """``cubin`` when the manifest's sm can run natively on ``device_sm`` (same major, minor <=), else ``ptx`` (driver
    JIT, needs ``device_sm >= sm``). ``prefer`` forces one ('cubin' or 'ptx')."""
    sm = int(manifest["sm"])
    if prefer not in (None, "cubin", "ptx"):
        raise LoaderError(f"prefer={prefer!r}; expected 'cubin', 'ptx' or None")
    native = sm // 10 == device_sm // 10 and sm <= device_sm
    if prefer == "cubin" and not native:
        raise LoaderError(f"sm_{sm} cubins cannot run on an sm_{device_sm} device; use prefer='ptx' or build for "
                          f"sm_{device_sm}")
    if device_sm < sm:
        raise LoaderError(f"kernels built for sm_{sm} cannot run on an sm_{device_sm} device; build for a target "
                          f"<= sm_{device_sm} (e.g. --target trt-sm75)")
    return prefer or ("cubin" if native else "ptx")


# ------------------------------------------------------------------------------------------------ CUDA driver
def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise LoaderError("the vlmx Triton kernels are launched through the CUDA driver API, but cuda-bindings is "
                          "not installed; pip install 'cuda-bindings>=12.6' (or the vlmx[gpu] extra)") from e
    return driver


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        d = _driver()
        name = d.cuGetErrorName(err)[1] if hasattr(d, "cuGetErrorName") else b"?"
        raise LoaderError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name} ({int(err)})")
    return rest[0] if len(rest) == 1 else rest


def ensure_context(device: int = 0):
    """Make a CUDA context current on this thread (the device's primary context, shared with torch)."""
    global _INITIALIZED
    d = _driver()
    if not _INITIALIZED:
        try:
            result = d.cuInit(0)
        except Exception as e:  # cuda-bindings raises when libcuda.so is absent
            raise LoaderError(f"no usable CUDA driver ({type(e).__name__}: {e}); the vlmx Triton kernels need an "
                              "NVIDIA GPU with its driver installed") from e
        _check(result, "cuInit")
        _INITIALIZED = True
    ctx = _check(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is not None and int(ctx) != 0 and int(_check(d.cuCtxGetDevice(), "cuCtxGetDevice")) == device:
        return ctx
    dev = _check(d.cuDeviceGet(device), "cuDeviceGet")
    ctx = _check(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    _check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


def load_module(image: bytes, device: int = 0):
    """``cuModuleLoadData`` on a cubin or a PTX image (PTX goes through the driver JIT) for ``device``."""
    ensure_context(device)
    if not image.startswith(b"\x7fELF"):  # PTX text: the driver wants it NUL-terminated
        image = image.rstrip(b"\0") + b"\0"
    return _check(_driver().cuModuleLoadData(image), "cuModuleLoadData")


def launch(function, grid, threads: int, shared: int, stream: int, args: list) -> None:
    """``cuLaunchKernel`` with ``args`` (ctypes objects in ABI order) on ``stream`` (a raw CUstream handle)."""
    d = _driver()
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    _check(d.cuLaunchKernel(function, *grid, threads, 1, 1, shared, d.CUstream(stream), ctypes.addressof(ptrs), 0),
           "cuLaunchKernel")


class KernelLibrary:
    """A manifest directory bound to a device: picks, loads (once) and launches specialisations."""

    def __init__(self, directory, device_sm: int, prefer: str | None = None, device: int = 0):
        self.device = device
        self.manifest = read_manifest(directory)
        self.binary = choose_binary(self.manifest, device_sm, prefer)
        self._functions: dict[tuple[str, str], object] = {}

    def function(self, entry: dict):
        key = (entry["kernel"], entry["spec"])
        if key not in self._functions:
            image = (Path(self.manifest["_dir"]) / entry[self.binary]).read_bytes()
            module = load_module(image, self.device)
            fn = _check(_driver().cuModuleGetFunction(module, entry["symbol"].encode()), "cuModuleGetFunction")
            if entry["shared_bytes"] > 48 * 1024:
                d = _driver()
                attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                _check(d.cuFuncSetAttribute(fn, attr, entry["shared_bytes"]), "cuFuncSetAttribute")
            self._functions[key] = fn
        return self._functions[key]

    def __call__(self, kernel: str, dtype: str | None, values: dict, stream: int) -> dict:
        """Select, pack and launch ``kernel`` over ``values``; returns the entry used."""
        entry = select_entry(self.manifest, kernel, dtype, values)
        grid = grid_of(entry, values)
        ensure_context(self.device)
        launch(self.function(entry), grid, entry["threads_per_block"], entry["shared_bytes"], stream,
               pack_args(entry, values))
        return entry

"""TensorRT backend: runs the engines ``vlm-build`` wrote (``<export>/engines/<graph>.plan`` + ``engines.json``).

:class:`TensorRTRunner` has the runner interface (``activate / infer / deactivate``), dynamic shapes through
``set_input_shape``, inputs as numpy arrays, torch tensors (CPU or CUDA) or CUDA buffers exposing
``__cuda_array_interface__`` (cuda-python / CuPy / Numba), and data-dependent outputs (vlmx GatherTopK) through an
output allocator. Before deserializing it refuses, with a message saying what to rebuild, an engine whose
TensorRT flavour/version, target compute capability or plugin library does not match this machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmx.torch_ref.contract import sha256_file

from .engine_build import ENGINES_FORMAT, ENGINES_JSON
from .runner import Runner
from .trt_import import TensorRT, TensorRTUnavailable, import_tensorrt


class EngineMismatch(RuntimeError):
    """The engine was built for another TensorRT, GPU or plugin library than the one here."""


def read_engines_json(engine_path) -> dict | None:
    """``engines.json`` next to an engine (None when absent)."""
    meta_path = Path(engine_path).with_name(ENGINES_JSON)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != ENGINES_FORMAT:
        raise EngineMismatch(f"{meta_path} is not a {ENGINES_FORMAT} file; rebuild the engines with vlm-build")
    return meta


def check_engine_compat(meta: dict, flavour: str, version: str, device_sm: int | None, device_name: str = "",
                        plugin_lib: str | None = None) -> None:
    """Raise :class:`EngineMismatch` unless an engine described by ``meta`` can run here."""
    built = f"{meta.get('backend')} {meta.get('tensorrt_version')}"
    if meta.get("backend") != flavour or str(meta.get("tensorrt_version")) != str(version):
        raise EngineMismatch(f"the engine was built with {built} but this runtime is {flavour} {version}; engines "
                             "only run on the exact TensorRT version that built them: rebuild with `vlm-build "
                             "--artifacts <export dir>` here, or install " + built)
    if device_sm is None:
        raise EngineMismatch(f"no CUDA GPU is visible; the engine targets sm_{meta.get('target_sm')} and needs that "
                             "GPU (and its driver) to run")
    target = meta.get("target_sm")
    if target is not None and int(target) != int(device_sm):
        raise EngineMismatch(f"the engine targets sm_{target} but this GPU{' (' + device_name + ')' if device_name else ''}"
                             f" is sm_{device_sm}; rebuild the engines for this GPU (vlm-build --target sm{device_sm})"
                             " or run on an sm_" + str(target) + " GPU")
    want = meta.get("plugin_lib")
    if want and plugin_lib and Path(plugin_lib).is_file() and sha256_file(Path(plugin_lib)) != want.get("sha256"):
        raise EngineMismatch(f"--plugin-lib {plugin_lib} differs (sha256) from the library the engine was built with "
                             f"({want.get('path')}); pass that library or rebuild the engines with this one")


def _device():
    import torch

    if not torch.cuda.is_available():
        return None, ""
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor, torch.cuda.get_device_name()


def engine_plugin_library(engine_path, plugin_lib=None) -> str | None:
    """The plugin library an engine needs: ``plugin_lib`` if given, else the one engines.json recorded (or None)."""
    if plugin_lib:
        return str(plugin_lib)
    meta = read_engines_json(engine_path) or {}
    return (meta.get("plugin_lib") or {}).get("path")


def load_plugin_library(trt: TensorRT, registry, plugin_lib) -> None:
    """Register the vlmx creators of ``plugin_lib`` in TensorRT's plugin registry (``load_library`` calls the
    library's getCreators; polygraphy's ``LoadPlugins`` only dlopens, which registers no IPluginV3 creator), before
    any engine that uses them is deserialized. Raises naming what is wrong and what to do."""
    if not trt.has_plugins:
        raise EngineMismatch(f"TensorRT-RTX cannot load plugin libraries; this engine needs {plugin_lib}: run it "
                             "with TensorRT")
    if not Path(plugin_lib).is_file():
        raise FileNotFoundError(f"plugin library {plugin_lib} (recorded in engines.json) is missing; pass "
                                "--plugin-lib or rebuild it with python -m vlmx.plugins.trt_build")
    if registry.load_library(str(plugin_lib)) is None:
        raise EngineMismatch(f"{trt.flavour} {trt.version} could not load the plugin library {plugin_lib}")


class _CudaArray:
    """A device buffer given through ``__cuda_array_interface__`` (pointer, shape, dtype)."""

    def __init__(self, obj):
        cai = obj.__cuda_array_interface__
        if cai.get("strides") not in (None, ()):
            expect = np.empty(cai["shape"], dtype=np.dtype(cai["typestr"])).strides
            if tuple(cai["strides"]) != tuple(expect):
                raise ValueError("CUDA buffers given to the TensorRT runner must be C-contiguous")
        self.ptr = int(cai["data"][0])
        self.shape = tuple(cai["shape"])
        self.dtype = np.dtype(cai["typestr"])
        self.owner = obj


class TensorRTRunner(Runner):
    """One TensorRT engine; ``infer`` returns numpy arrays (``return_torch=True``: torch CUDA tensors)."""

    name = "tensorrt"

    def __init__(self, engine_path, plugin_lib=None, return_torch: bool = False):
        super().__init__()
        self.engine_path = Path(engine_path)
        self.plugin_lib = str(plugin_lib) if plugin_lib else None
        self.return_torch = return_torch
        self.device_io = return_torch
        self.engine = self.context = self.trt = None

    def _activate(self):
        import torch

        if not self.engine_path.is_file():
            raise FileNotFoundError(f"engine {self.engine_path} does not exist; build it with vlm-build")
        meta = read_engines_json(self.engine_path)
        self.trt = import_tensorrt(meta["backend"] if meta else "auto")
        sm, name = _device()
        if meta is not None:
            self.plugin_lib = engine_plugin_library(self.engine_path, self.plugin_lib)
            check_engine_compat(meta, self.trt.flavour, self.trt.version, sm, name, self.plugin_lib)
        elif sm is None:
            raise EngineMismatch(f"no CUDA GPU is visible; {self.engine_path} needs one to run")
        mod = self.trt.module
        self.logger = mod.Logger(mod.Logger.WARNING)
        runtime = mod.Runtime(self.logger)
        if self.plugin_lib:
            load_plugin_library(self.trt, runtime.get_plugin_registry(), self.plugin_lib)
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"{self.trt.flavour} {self.trt.version} refused to deserialize {self.engine_path} "
                                 "(see the TensorRT error above); rebuild it with vlm-build on this machine")
        self.runtime = runtime
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == mod.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_in[n]]
        self.output_names = [n for n in names if not is_in[n]]
        self.dtypes = {n: torch.from_numpy(np.empty(0, dtype=mod.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in names}
        self.device = torch.device("cuda", torch.cuda.current_device())

    def _to_device(self, name, value):
        import torch

        want = self.dtypes[name]
        if hasattr(value, "__cuda_array_interface__") and not isinstance(value, torch.Tensor):
            buf = _CudaArray(value)
            if torch.from_numpy(np.empty(0, dtype=buf.dtype)).dtype != want:
                raise TypeError(f"input {name}: CUDA buffer dtype {buf.dtype} but the engine wants {want}")
            return buf
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        return t.to(device=self.device, dtype=want).contiguous()

    def alloc(self, name, shape, dtype):
        import torch

        return torch.zeros(tuple(shape), dtype=getattr(torch, np.dtype(dtype).name), device="cuda")

    def _infer(self, feed):
        import torch

        self.check_feed(feed, self.input_names, self.engine_path.name)
        # Bound buffers (Runner.bind): inputs not in the feed come from them, bound outputs are written into them.
        # TODO(issue 12): set their addresses once per generation and pick the decode profile for S_new = 1.
        feed = {**{n: b for n, b in self.bound.items() if n in self.input_names}, **feed}
        held = {}
        for n in self.input_names:
            if self.engine.is_shape_inference_io(n):  # shape tensors (e.g. TopK's k) live in host memory
                host = np.ascontiguousarray(np.asarray(feed[n].cpu() if hasattr(feed[n], "cpu") else feed[n],
                                                       dtype=self.trt.module.nptype(self.engine.get_tensor_dtype(n))))
                held[n] = host
                self.context.set_input_shape(n, host.shape)
                self.context.set_tensor_address(n, host.ctypes.data)
                continue
            x = self._to_device(n, feed[n])
            held[n] = x
            shape = x.shape if isinstance(x, _CudaArray) else tuple(x.shape)
            if not self.context.set_input_shape(n, tuple(shape)):
                lo, opt, hi = self.engine.get_tensor_profile_shape(n, 0)
                raise ValueError(f"{self.engine_path.name}: input {n} shape {tuple(shape)} is outside the engine's "
                                 f"profile min {tuple(lo)} / max {tuple(hi)}; re-export with a wider profile")
            self.context.set_tensor_address(n, x.ptr if isinstance(x, _CudaArray) else x.data_ptr())
        allocator = _OutputAllocator(self.trt.module, self.device, self.dtypes)
        outputs = {}
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            if n in self.bound:
                outputs[n] = self._to_device(n, self.bound[n])
                if outputs[n].data_ptr() != self.bound[n].data_ptr():
                    raise ValueError(f"bound output {n} must be a contiguous CUDA tensor of dtype {self.dtypes[n]}")
                self.context.set_tensor_address(n, outputs[n].data_ptr())
            elif any(d < 0 for d in shape):  # data-dependent (size tensor): allocated by TensorRT's callback
                self.context.set_output_allocator(n, allocator)
            else:
                outputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
                self.context.set_tensor_address(n, outputs[n].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.engine_path.name}: TensorRT execution failed (see the error above)")
        stream.synchronize()
        outputs.update(allocator.results())
        ordered = {n: outputs[n] for n in self.output_names}
        return ordered if self.return_torch else {n: t.cpu().numpy() for n, t in ordered.items()}

    def _deactivate(self):
        self.context = self.engine = self.runtime = None


class _OutputAllocator:
    """Allocates outputs whose shape TensorRT knows only after enqueue (torch memory, trimmed to the final shape)."""

    def __new__(cls, mod, device, dtypes):
        class Allocator(mod.IOutputAllocator):
            def __init__(self):
                mod.IOutputAllocator.__init__(self)
                self.buffers, self.shapes = {}, {}

            def reallocate_output(self, name, memory, size, alignment):
                import torch

                buf = self.buffers.get(name)
                if buf is None or buf.numel() < size:
                    self.buffers[name] = buf = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
                return buf.data_ptr()

            def reallocate_output_async(self, name, memory, size, alignment, stream=None):
                return self.reallocate_output(name, memory, size, alignment)  # torch allocates stream-ordered

            def notify_shape(self, name, shape):
                self.shapes[name] = tuple(shape)

            def results(self):
                out = {}
                for n, shape in self.shapes.items():
                    count = int(np.prod(shape)) if shape else 1
                    dt = dtypes[n]
                    nbytes = count * (dt.itemsize if hasattr(dt, "itemsize") else 1)
                    out[n] = self.buffers[n][:nbytes].view(dt).reshape(shape).clone()
                return out

        return Allocator()


def engine_layers(engine_path) -> tuple[str, list[str]]:
    """The engine's layers: from the engine inspector where the plan deserializes (a GPU), else the layer list the
    builder logged into ``engines.json``. Returns (source, lines)."""
    meta = read_engines_json(engine_path) or {}
    entry = next((e for e in meta.get("engines", {}).values() if e.get("file") == Path(engine_path).name), {})
    try:
        trt = import_tensorrt(meta.get("backend", "auto"))
        sm, _ = _device()
    except (ImportError, TensorRTUnavailable):
        sm = None
    if sm is not None:
        mod = trt.module
        runtime = mod.Runtime(mod.Logger(mod.Logger.ERROR))
        lib = (meta.get("plugin_lib") or {}).get("path")
        if lib and trt.has_plugins and Path(lib).is_file():
            runtime.get_plugin_registry().load_library(lib)
        engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is not None:
            info = engine.create_engine_inspector().get_engine_information(mod.LayerInformationFormat.ONELINE)
            return "engine inspector", [ln for ln in info.splitlines() if ln.strip()]
    return "builder log (engines.json)", list(entry.get("layers", []))


def graph_runners(artifacts, plugin_lib=None, engines_dir=None, return_torch=False, **_) -> dict[str, Runner]:
    """A :class:`TensorRTRunner` per graph, from ``<export>/engines`` (or ``engines_dir``)."""
    root = Path(engines_dir) if engines_dir else artifacts.root / "engines"
    meta_path = root / ENGINES_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root} has no {ENGINES_JSON}: build the engines first with `vlm-build --artifacts "
                                f"{artifacts.root}`")
    meta = json.loads(meta_path.read_text())
    missing = [g for g in artifacts.manifest["graphs"] if g not in meta.get("engines", {})]
    if missing:
        raise FileNotFoundError(f"{meta_path} lacks engines for {missing}; re-run vlm-build")
    return {g: TensorRTRunner(root / meta["engines"][g]["file"], plugin_lib, return_torch)
            for g in artifacts.manifest["graphs"]}

"""TensorRT backend: runs the engines ``vlm-build`` wrote (``<export>/engines/<graph>.plan`` + ``engines.json``).

:func:`trt_runner` is the one place an engine is opened, for every command (the pipeline's runners, vlm-compare,
``vlm-build --print-layers``): it reads ``engines.json`` and refuses, saying what to rebuild, an engine from another
TensorRT flavour or version, for another compute capability, without a GPU, or with a different plugin library;
registers the plugin library the engine was built with; and returns polygraphy's ``TrtRunner`` over
``EngineFromPath``. :class:`TensorRTRunner` adapts it to the runner interface (:mod:`.runner`): numpy, torch or
``__cuda_array_interface__`` inputs, the optimization profile chosen per call (the LM engine's prefill and decode),
and persistent buffers bound once (the KV cache: past and its aliased present share one device buffer, whose
address is set when bound and never again while it stays bound).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmx.torch_ref.contract import sha256_file

from .engine_build import ENGINES_FORMAT, ENGINES_JSON
from .runner import Runner
from .trt_import import import_tensorrt, load_plugin_library, polygraphy_trt, quiet_polygraphy


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


def open_engine(engine_path, plugin_lib=None):
    """(TensorRT, polygraphy.backend.trt, an ``EngineFromPath`` loader) for an engine that can run here: every
    refusal of :func:`check_engine_compat` first, then the plugin library registered (argument, else the one
    engines.json recorded) so the plan's plugin layers deserialize."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine {engine_path} does not exist; build it with vlm-build")
    meta = read_engines_json(engine_path)
    trt = import_tensorrt(meta["backend"] if meta else "auto")
    sm, name = _device()
    plugin_lib = engine_plugin_library(engine_path, plugin_lib)
    if meta is not None:
        check_engine_compat(meta, trt.flavour, trt.version, sm, name, plugin_lib)
    elif sm is None:
        raise EngineMismatch(f"no CUDA GPU is visible; {engine_path} needs one to run")
    if plugin_lib:
        load_plugin_library(trt, plugin_lib)
    pg = polygraphy_trt(trt)
    return trt, pg, pg.EngineFromPath(str(engine_path))


def engine_plugin_library(engine_path, plugin_lib=None) -> str | None:
    """The plugin library an engine needs: ``plugin_lib`` if given, else the one engines.json recorded (or None)."""
    if plugin_lib:
        return str(plugin_lib)
    meta = read_engines_json(engine_path) or {}
    return (meta.get("plugin_lib") or {}).get("path")


def trt_runner(engine_path, plugin_lib=None, name: str | None = None):
    """polygraphy's ``TrtRunner`` for an engine (see :func:`open_engine`): the one TensorRT runner of every
    command."""
    _, pg, loader = open_engine(engine_path, plugin_lib)
    return pg.TrtRunner(loader, name=name or f"tensorrt:{Path(engine_path).stem}")


def select_profile(ranges: list[dict], shapes: dict, what: str = "engine") -> int:
    """The optimization profile for these input shapes: among the profiles admitting them (min <= shape <= max),
    the one whose opt shapes are nearest (so a one-token step takes the LM engine's decode profile, a prompt its
    prefill profile). ``ranges``: per profile ``{input: (min, opt, max)}``."""
    best, best_dist = None, None
    for index, prof in enumerate(ranges):
        ok, dist = True, 0
        for n, shape in shapes.items():
            lo, opt, hi = (tuple(x) for x in prof[n])
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                ok = False
                break
            dist += sum(abs(s - o) for s, o in zip(shape, opt))
        if ok and (best_dist is None or dist < best_dist):
            best, best_dist = index, dist
    if best is None:
        spans = "; ".join(", ".join(f"{n} {tuple(p[n][0])}..{tuple(p[n][2])}" for n in shapes) for p in ranges)
        raise ValueError(f"{what}: input shapes {shapes} fit none of the engine's profiles ({spans}); re-export "
                         "with a wider profile")
    return best


class TensorRTRunner(Runner):
    """One TensorRT engine; ``infer`` returns numpy arrays (``return_torch=True``: torch CUDA tensors)."""

    name = "tensorrt"

    def __init__(self, engine_path, plugin_lib=None, return_torch: bool = False):
        super().__init__()
        self.engine_path = Path(engine_path)
        self.plugin_lib = str(plugin_lib) if plugin_lib else None
        self.return_torch = return_torch
        self.device_io = return_torch
        self.runner = None

    def _activate(self):
        import torch

        self.trt, pg, loader = open_engine(self.engine_path, self.plugin_lib)
        self.runner = pg.TrtRunner(loader, name=f"tensorrt:{self.engine_path.stem}")
        with quiet_polygraphy():
            self.runner.activate()
        engine, mod = self.runner.engine, self.trt.module
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == mod.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.host_inputs = {n for n in self.input_names if engine.is_shape_inference_io(n)}
        self.dtypes = {n: torch.from_numpy(np.empty(0, dtype=mod.nptype(engine.get_tensor_dtype(n)))).dtype
                       for n in names}
        device_inputs = [n for n in self.input_names if n not in self.host_inputs]
        self.profile_ranges = [{n: engine.get_tensor_profile_shape(n, p) for n in device_inputs}
                               for p in range(engine.num_optimization_profiles)]
        self.profile = 0

    def _input(self, name, value):
        """A contiguous torch tensor of the engine's dtype: on the GPU as given (no copy), host memory for shape
        tensors; numpy stays in host memory (polygraphy copies it in)."""
        import torch

        if hasattr(value, "__cuda_array_interface__") and not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, device="cuda")  # cuda-python / CuPy / Numba buffers, no copy
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        if name in self.host_inputs:
            t = t.cpu()
        elif self.return_torch:
            t = t.cuda()
        return t.to(self.dtypes[name]).contiguous()

    def bind(self, buffers):
        """Bind persistent buffers and set their shapes and addresses on the execution context now: later calls
        leave them alone (polygraphy sets an address only when it changed; an output aliased to a bound input, the
        KV cache's present, takes that input's address)."""
        super().bind(buffers)
        if self.runner is None:  # not active yet: the first call sets them
            return
        ctx = self.runner.context
        for n, buf in buffers.items():
            if n in self.input_names and n not in self.host_inputs and getattr(buf, "is_cuda", False):
                t = self._input(n, buf)
                if t.data_ptr() != buf.data_ptr():
                    raise ValueError(f"bound input {n} must be a contiguous CUDA tensor of dtype {self.dtypes[n]}")
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, t.data_ptr())

    def alloc(self, name, shape, dtype):
        import torch

        return torch.zeros(tuple(shape), dtype=getattr(torch, np.dtype(dtype).name), device="cuda")

    def _infer(self, feed):
        import torch

        self.check_feed(feed, self.input_names, self.engine_path.name)
        given = {**{n: b for n, b in self.bound.items() if n in self.input_names}, **feed}
        inputs = {n: self._input(n, given[n]) for n in self.input_names}
        index = select_profile(self.profile_ranges, {n: tuple(t.shape) for n, t in inputs.items()
                                                     if n not in self.host_inputs}, self.engine_path.name)
        with quiet_polygraphy():
            if index != self.profile:
                self.runner.set_profile(index)
                self.profile = index
            if torch.cuda.is_available():  # inputs written on torch's stream; polygraphy enqueues on its own
                torch.cuda.current_stream().synchronize()
            out = self.runner.infer(inputs, copy_outputs_to_host=not self.return_torch)
        result = {}
        for n in self.output_names:
            value, buf = out[n], self.bound.get(n)
            if buf is None:  # polygraphy reuses its output buffers on the next call
                result[n] = value.clone() if self.return_torch else value.numpy().copy()
                continue
            if value.data_ptr() != buf.data_ptr():  # not aliased to a bound input: one device copy
                buf.view(-1)[:value.numel()].copy_(value.reshape(-1))
            result[n] = buf
        return result

    def _deactivate(self):
        if self.runner is not None and self.runner.is_active:
            self.runner.deactivate()
        self.runner = None


def engine_layers(engine_path) -> tuple[str, list[str]]:
    """The engine's layers: from the engine inspector where the plan deserializes (a GPU), else the layer list the
    builder logged into ``engines.json``. Returns (source, lines)."""
    from polygraphy.exception import PolygraphyException

    meta = read_engines_json(engine_path) or {}
    entry = next((e for e in meta.get("engines", {}).values() if e.get("file") == Path(engine_path).name), {})
    try:
        trt, _, loader = open_engine(engine_path)
        with quiet_polygraphy():
            engine = loader()
        info = engine.create_engine_inspector().get_engine_information(trt.module.LayerInformationFormat.ONELINE)
        return "engine inspector", [ln for ln in info.splitlines() if ln.strip()]
    except (ImportError, OSError, RuntimeError, PolygraphyException):  # no GPU or TensorRT here, or a plan that
        # does not deserialize (EngineMismatch and PluginLibraryError are RuntimeErrors)
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

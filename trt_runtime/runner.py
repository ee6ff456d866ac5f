"""The runner interface every backend implements (polygraphy's shape), and the backend registry.

A runner executes one graph: ``activate()``, ``infer(feed) -> outputs`` (dicts keyed by the graph's I/O names),
``deactivate()``. A backend module exposes ``graph_runners(artifacts, **options) -> {graph: Runner}``. A new backend
is a new module registered in :data:`BACKENDS`, never a branch in an existing one.

Tensors: every runner accepts numpy arrays and torch tensors in ``feed``. A runner with ``device_io = True`` (GPU
backends) returns torch tensors on its device and takes device tensors without a host round trip; CPU runners
return numpy arrays. Persistent buffers (the KV cache) are bound once per generation:

- ``bind(buffers)``: ``{I/O name: tensor}`` kept bound until ``unbind()`` / ``deactivate()``. A bound input need not
  be in later feeds; a bound output is written into its buffer and returned as that same object. Binding one
  buffer as both an input and an output (``past.i.key`` and ``present.i.key``) is the in-place KV cache: the graph
  updates it where it lies, nothing is copied or allocated per step.
- ``alloc(name, shape, dtype)``: a buffer in the memory this runner binds without copies (numpy for CPU runners,
  a torch tensor on the device for GPU runners).

The TensorRT runner implements the same three methods (issue 12): ``bind`` sets tensor addresses once
(``set_tensor_address`` for past and present to the same pointer), ``infer`` sets only the changed input shapes
(``set_input_shape``) and addresses, and selects the ``decode`` optimization profile for S_new = 1.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import numpy as np

BACKENDS = {
    "onnxruntime": "vlmx.trt_runtime.ort_backend",
    "tensorrt": "vlmx.trt_runtime.trt_backend",
    "torch": "vlmx.trt_runtime.torch_backend",
}
DEFAULT_BACKEND = "onnxruntime"


class Runner:
    """Base runner: subclasses implement ``_activate``, ``_infer`` and optionally ``_deactivate``, ``bind``."""

    name = "runner"
    #: True when ``infer`` returns torch tensors on a GPU (stages then never see host memory)
    device_io = False

    def __init__(self):
        self.is_active = False
        self.bound: dict = {}

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def infer(self, feed: Mapping) -> dict:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() before infer()")
        return self._infer(feed)

    def bind(self, buffers: Mapping) -> None:
        """Bind persistent buffers by I/O name (see the module docstring); replaces earlier bindings of those names."""
        self.bound.update(buffers)

    def unbind(self) -> None:
        self.bound = {}

    def alloc(self, name: str, shape, dtype) -> object:
        """A zero-filled buffer this runner binds without a copy (CPU runners: numpy)."""
        return np.zeros(tuple(shape), dtype=np.dtype(dtype))

    def check_feed(self, feed: Mapping, names: list[str], what: str) -> None:
        """Raise one clear error naming every input of ``what`` that neither ``feed`` nor a binding provides."""
        missing = [n for n in names if n not in feed and n not in self.bound]
        if missing:
            raise ValueError(f"{what}: missing inputs {missing}; got {sorted(feed)}")

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.unbind()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def _activate(self):  # pragma: no cover - interface
        raise NotImplementedError

    def _infer(self, feed):  # pragma: no cover - interface
        raise NotImplementedError

    def _deactivate(self):
        pass


def get_backend(name: str):
    """Import a backend module by name; the error lists the known backends."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name} is not known; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def graph_runners(backend: str, artifacts, **options) -> dict[str, Runner]:
    """One runner per graph of the export, from the named backend."""
    return get_backend(backend).graph_runners(artifacts, **options)

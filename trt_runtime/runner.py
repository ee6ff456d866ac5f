"""The runner interface every backend implements (polygraphy's shape), and the backend registry.

A runner executes one graph: ``activate()``, ``infer(feed) -> outputs`` (dicts of numpy arrays keyed by the graph's
I/O names), ``deactivate()``. A backend module exposes ``graph_runners(artifacts, **options) -> {graph: Runner}``.
A new backend is a new module registered in :data:`BACKENDS`, never a branch in an existing one.
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
    """Base runner: subclasses implement ``_activate``, ``_infer`` and optionally ``_deactivate``."""

    name = "runner"

    def __init__(self):
        self.is_active = False

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() before infer()")
        return self._infer(feed)

    @staticmethod
    def check_feed(feed: Mapping, names: list[str], what: str) -> None:
        """Raise one clear error naming every input of ``what`` that ``feed`` lacks."""
        missing = [n for n in names if n not in feed]
        if missing:
            raise ValueError(f"{what}: missing inputs {missing}; got {sorted(feed)}")

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
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

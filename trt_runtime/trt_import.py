"""Import TensorRT or TensorRT-RTX lazily, with one clear message when neither is installed.

Two flavours share the Python API vlmx uses:

- ``tensorrt`` (the NVIDIA TensorRT wheels or the NGC container): builds for the GPU it runs on, loads the vlmx
  plugin library; needs an NVIDIA GPU and driver.
- ``tensorrt-rtx`` (PyPI ``tensorrt-rtx-cu12-libs`` + ``tensorrt-rtx-cu12-bindings``, import name ``tensorrt_rtx``
  or, in the 1.6/1.7 wheels, ``tensorrt_rtx_bindings``): its builder runs on the CPU and targets a compute
  capability (``ComputeCapability.SM75``); its ONNX parser builds plugin layers from 1.7 on (see
  :data:`RTX_PLUGIN_PARSER`).

Engines are built and run through polygraphy's loaders and ``TrtRunner``; :func:`polygraphy_trt` points polygraphy
at the imported flavour (``POLYGRAPHY_USE_TENSORRT_RTX``; polygraphy imports TensorRT-RTX as ``tensorrt_rtx``, the
1.6/1.7 wheels as ``tensorrt_rtx_bindings``).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

FLAVOURS = ("tensorrt", "tensorrt-rtx")
BACKEND_CHOICES = ("auto",) + FLAVOURS
_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
INSTALL_HINT = {
    "tensorrt": "install TensorRT for your GPU (pip install tensorrt, or use the NGC TensorRT container: see the "
                "Dockerfile and docs/tensorrt.md)",
    "tensorrt-rtx": "pip install 'tensorrt-rtx-cu12-libs==1.6.1.120' 'tensorrt-rtx-cu12-bindings==1.6.1.120' "
                    "(the vlmx[trt-rtx] extra)",
}


#: The first TensorRT-RTX whose ONNX parser builds plugin layers (1.6 refuses custom ops in its static check).
RTX_PLUGIN_PARSER = (1, 7)


class TensorRTUnavailable(ImportError):
    """Neither requested TensorRT flavour can be imported; the message says what to install."""


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT module and which flavour it is."""

    module: ModuleType
    flavour: str

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split(".") if p.isdigit())

    @property
    def parses_plugins(self) -> bool:
        """Whether this ONNX parser turns vlmx nodes into plugin layers (TensorRT; TensorRT-RTX from 1.7)."""
        return not self.is_rtx or self.version_tuple[:2] >= RTX_PLUGIN_PARSER


def _try_import(flavour: str) -> tuple[ModuleType | None, str]:
    errors = []
    for name in _MODULES[flavour]:
        try:
            return importlib.import_module(name), ""
        except ImportError as e:  # also OSError-derived loader failures surface as ImportError
            errors.append(f"import {name}: {e}")
        except OSError as e:
            errors.append(f"import {name}: {e}")
    return None, "; ".join(errors)


def import_tensorrt(backend: str = "auto") -> TensorRT:
    """Import the requested flavour (``auto``: TensorRT first, then TensorRT-RTX).

    Raises :class:`TensorRTUnavailable` naming what was tried and what to install.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"--backend {backend} is not known; choose one of {', '.join(BACKEND_CHOICES)}")
    order = FLAVOURS if backend == "auto" else (backend,)
    tried = []
    for flavour in order:
        module, err = _try_import(flavour)
        if module is not None:
            return TensorRT(module, flavour)
        tried.append(f"{flavour} ({err})")
    hints = " or ".join(INSTALL_HINT[f] for f in order)
    raise TensorRTUnavailable(f"no usable TensorRT Python package: tried {'; '.join(tried)}. To build or run "
                              f"engines, {hints}.")


def available_flavours() -> list[str]:
    """The flavours importable here (no message, no exception)."""
    return [f for f in FLAVOURS if _try_import(f)[0] is not None]


def polygraphy_trt(trt: TensorRT):
    """``polygraphy.backend.trt`` set up for ``trt``'s flavour (import this, not polygraphy's module directly).

    polygraphy picks its TensorRT module when ``polygraphy.backend.trt`` is first imported, so a process uses one
    flavour; asking for the other one afterwards raises :class:`TensorRTUnavailable`.
    """
    from polygraphy import config

    if "polygraphy.backend.trt" in sys.modules and config.USE_TENSORRT_RTX != trt.is_rtx:
        raise TensorRTUnavailable(f"this process already runs polygraphy with "
                                  f"{'tensorrt-rtx' if config.USE_TENSORRT_RTX else 'tensorrt'}; use {trt.flavour} "
                                  "in a separate process")
    config.USE_TENSORRT_RTX = trt.is_rtx
    if trt.is_rtx:
        sys.modules.setdefault("tensorrt_rtx", trt.module)
    with quiet_polygraphy():  # its "colored is not installed" notice
        import polygraphy.backend.trt as backend
    return backend


@contextlib.contextmanager
def quiet_polygraphy(verbose: bool = False):
    """polygraphy logs every loader, runner and comparison on stdout; keep only its fatal messages unless
    ``verbose`` (TensorRT's own errors reach our loggers), and never on stdout (``--json`` and results own it)."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    if not verbose:
        G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


class PluginLibraryError(RuntimeError):
    """The plugin library is missing or TensorRT could not load it; the message says what to do."""


_LOADED_LIBRARIES: dict[tuple[str, str], object] = {}


def load_plugin_library(trt: TensorRT, plugin_lib) -> None:
    """Register the creators of ``plugin_lib`` in TensorRT's global plugin registry, once per process, before any
    network is parsed or engine deserialized with them (``load_library`` calls the library's ``getCreators``; a
    second ``load_library`` of the same file fails; polygraphy's ``LoadPlugins`` only ``dlopen``s, which registers
    no IPluginV3 creator)."""
    from pathlib import Path

    lib = Path(plugin_lib)
    if not lib.is_file():
        raise PluginLibraryError(f"plugin library {lib} does not exist; pass --plugin-lib, or build it with "
                                 "`python -m vlmx.plugins.trt_build` (see docs/tensorrt.md)")
    key = (trt.flavour, str(lib.resolve()))
    if key in _LOADED_LIBRARIES:
        return
    handle = trt.module.get_plugin_registry().load_library(key[1])
    if handle is None:
        raise PluginLibraryError(f"{trt.flavour} {trt.version} could not load the plugin library {lib} (see the "
                                 "TensorRT error above); rebuild it against this TensorRT's headers")
    _LOADED_LIBRARIES[key] = handle

"""Import TensorRT or TensorRT-RTX lazily, with one clear message when neither is installed.

Two flavours share the Python API vlmx uses:

- ``tensorrt`` (the NVIDIA TensorRT wheels or the NGC container): builds for the GPU it runs on, loads the vlmx
  plugin library; needs an NVIDIA GPU and driver.
- ``tensorrt-rtx`` (PyPI ``tensorrt-rtx-cu12-libs`` + ``tensorrt-rtx-cu12-bindings``, import name ``tensorrt_rtx``
  or, in the 1.6/1.7 wheels, ``tensorrt_rtx_bindings``): its builder runs on the CPU and targets a compute
  capability (``ComputeCapability.SM75``); it has no plugin layers.
"""
from __future__ import annotations

import importlib
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
    def has_plugins(self) -> bool:
        """Whether plugin libraries can be loaded (TensorRT-RTX's network API has no plugin layers)."""
        return not self.is_rtx


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

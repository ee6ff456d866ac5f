"""Deployment targets (``--target``): one table read by the exporter, the plugin build and the runtime."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A TensorRT deployment target: compute capability and what the hardware offers."""

    name: str
    sm: int
    example_gpus: str
    int8_tensor_cores: bool = True
    bf16: bool = False
    cp_async: bool = False

    @property
    def compute_capability(self) -> tuple[int, int]:
        return divmod(self.sm, 10)

    @property
    def gencode(self) -> list[str]:
        """nvcc flags: SASS for this target plus compute_75 PTX (the Turing floor) embedded for JIT."""
        flags = [f"-gencode=arch=compute_{self.sm},code=sm_{self.sm}"]
        flags.append("-gencode=arch=compute_75,code=compute_75")
        return flags


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("trt-sm75", 75, "T4, RTX 20xx, Quadro RTX"),
    Target("trt-sm80", 80, "A100, A30", bf16=True, cp_async=True),
    Target("trt-sm86", 86, "A10, RTX 30xx", bf16=True, cp_async=True),
    Target("trt-sm87", 87, "Jetson Orin", bf16=True, cp_async=True),
    Target("trt-sm89", 89, "L4, RTX 40xx", bf16=True, cp_async=True),
    Target("trt-sm90", 90, "H100, H200", bf16=True, cp_async=True),
)}
DEFAULT_TARGET = "trt-sm75"


def get_target(name: str) -> Target:
    """Look a target up by name; the error lists the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"--target {name} is not a known target; choose one of {', '.join(TARGETS)}") from None

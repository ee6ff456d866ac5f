"""``vlm-export`` options and the opset rules, torch-free so the CLI checks every argument before importing torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIN_OPSET, MAX_OPSET = 17, 24
#: Opset that introduced the standard ``Attention`` op (``--attention native``).
NATIVE_ATTENTION_OPSET = 23
#: Opset with float16 Q/DQ scales (static calibration of a float16 graph).
STATIC_QDQ_OPSET = 19
DEFAULT_OPSET = 18


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} "
                         f"(the ONNX Attention op of --attention native needs {NATIVE_ATTENTION_OPSET}; the language "
                         "model graph's TensorScatter needs 24, which it uses whatever --opset says)")
    return opset


@dataclass
class ExportOptions:
    """Everything ``vlm-export`` takes (validated by :func:`vlmx.export.cli.validate`)."""

    model: str
    out: Path
    checkpoint: str | None = None
    target: str = "trt-sm75"
    precision: str = "fp16"
    attention: str = "plugin"
    opset: int | None = None
    calib: int = 0
    keep: float = 1.0
    prune: str = "text"
    seed: int = 0
    plugins_only: bool = False
    overwrite: bool = False
    report: bool = True
    #: KV-cache length S_max of the LM graph (None: the preset's context length)
    max_seq_len: int | None = None
    #: weight bytes above which a graph's weights go to external data and its passes stream (tests lower it)
    external_threshold: int | None = None
    #: w8a8: language-model linears (torch module names) kept float; None = chosen by calibration
    lm_skip: tuple[str, ...] | None = None

    def resolved_opset(self) -> int:
        """--opset, or the smallest one the options need (23 for native attention, 19 for static Q/DQ, else 18)."""
        if self.opset is not None:
            return check_opset(self.opset)
        if self.attention == "native":
            return NATIVE_ATTENTION_OPSET
        return STATIC_QDQ_OPSET if self.calib else DEFAULT_OPSET

    @property
    def dtype(self):
        import torch

        return torch.float32 if self.precision == "fp32" else torch.float16

"""The schema of manifest.json as a pydantic model: types, ranges and cross-field rules of every field.

Imported by :func:`vlmx.torch_ref.contract.validate_manifest` on first use, so ``import contract`` stays cheap.
Extending the manifest means adding a field here (top-level fields are strict: unknown ones are refused).
"""
from __future__ import annotations

from functools import lru_cache

from .contract import (ATTENTION_MODES, DTYPES, FORMAT, FORMAT_VERSION, GRAPH_NAMES, GRAPHS, PRECISIONS,
                       PRUNE_METHODS)


@lru_cache(maxsize=1)
def manifest_model():
    """The pydantic model of manifest.json (built on first use)."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    from .op_table import OPS
    from .targets import TARGETS

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class IOEntry(Strict):
        name: str = Field(min_length=1)
        shape: list[Union[int, str]]
        dtype: Literal[tuple(DTYPES.values())]

    class Range(Strict):
        min: list[int]
        opt: list[int]
        max: list[int]

    class GraphEntry(Strict):
        file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
        inputs: list[IOEntry]
        outputs: list[IOEntry]
        dynamic_axes: dict[str, dict[str, str]]
        profile: dict[str, Range]
        profiles: dict[str, dict[str, Range]] = {}
        opset: Optional[int] = None
        passes: list[str] = []

    class FileEntry(Strict):
        sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
        bytes: int = Field(ge=0)
        mtime_ns: Optional[int] = None

    class ModelInfo(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        vision: str
        language: str
        num_layers: int = Field(ge=1, le=4096)
        num_image_tokens: int = Field(ge=1)
        has_cls: bool
        position_ids: bool
        eos_token_id: Optional[int] = Field(default=None, ge=0)
        max_seq_len: Optional[int] = Field(default=None, ge=2)

    class Report(Strict):
        passed: bool
        file: str

    class ProcessorFiles(Strict):
        """The text/image processor files the export carries (vlmx.export.processor_files)."""
        source: Literal["checkpoint", "preset"]
        files: list[str]

    class Manifest(Strict):
        format: Literal[FORMAT]
        format_version: Literal[FORMAT_VERSION]
        model: str = Field(min_length=1)
        checkpoint: Optional[str]
        checkpoint_files: Optional[dict[str, FileEntry]] = None
        target: Literal[tuple(TARGETS)]
        sm: int
        precision: Literal[PRECISIONS]
        attention: Literal[ATTENTION_MODES]
        opset: int = Field(ge=1, le=100)
        keep: float = Field(gt=0.0, le=1.0)
        prune: Literal[PRUNE_METHODS]
        seed: int
        plugins_only: bool
        ops_used: list[str]
        model_info: ModelInfo
        graphs: dict[str, GraphEntry]
        reference: Optional[str]
        report: Optional[Report]
        processor: Optional[ProcessorFiles] = None
        notes: list[str] = []
        files: dict[str, FileEntry]
        versions: dict[str, Optional[str]]
        created: str
        manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

        @field_validator("keep", mode="before")
        @classmethod
        def _keep_number(cls, v):
            return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

        @field_validator("ops_used")
        @classmethod
        def _known_ops(cls, v):
            unknown = sorted(set(v) - set(OPS))
            if unknown:
                raise ValueError(f"ops {unknown} are unknown to this vlmx (it knows {sorted(OPS)})")
            return v

        @model_validator(mode="after")
        def _consistent(self):
            if self.sm != TARGETS[self.target].sm:
                raise ValueError(f"sm {self.sm} does not match target {self.target}")
            missing = [g for g in GRAPH_NAMES if g not in self.graphs]
            extra = [g for g in self.graphs if g not in GRAPHS]
            if missing or extra:
                raise ValueError(f"graphs must be {list(GRAPH_NAMES)} (lacks {missing}, unknown {extra})")
            if self.prune == "cls" and not self.model_info.has_cls:
                raise ValueError("prune is cls but the vision tower has no [CLS] token")
            return self

    return Manifest



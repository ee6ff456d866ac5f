"""The export contract: what an export directory (``vlm-export --out DIR``) holds, written by ``vlmx.export`` and
read by ``vlmx.trt_runtime`` through this one module.

It owns the manifest format and version, its schema (pydantic), the graph and KV-cache names and every graph's
declared I/O, the choices recorded in the manifest (precisions, prune methods, attention modes), the accuracy
thresholds and the relative-error and real-token rules, file digests, the manifest's own digest and the check of
an export directory. Torch-free and cheap to import: numpy, onnx and pydantic are imported where used.

Extending it (e.g. a new LM graph or KV layout) means editing the data below (:data:`GRAPHS`, :data:`KV_NAME`), not
the code that reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

FORMAT = "vlmx-export"
#: 2: files carry ``mtime_ns``; the manifest carries its own digest, ``created`` and ``checkpoint_files``.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
REPORT_JSON = "report.json"

PRECISIONS = ("fp16", "w8a8", "fp32")
PRUNE_METHODS = ("text", "cls")
ATTENTION_MODES = ("plugin", "native", "decomposed")
#: Relative-error thresholds per export precision (the accuracy contract of vlm-export, vlm-compare and tests).
THRESHOLDS = {"fp32": 1e-5, "fp16": 1e-3, "w8a8": 3e-2}
#: Tensor dtypes a graph's I/O may have (ONNX TensorProto enum value -> name).
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}

# ------------------------------------------------------------------------------------------- graphs and names
#: KV-cache tensor names: ``KV_NAME.format(prefix=..., layer=i, kind=k)`` for every layer and kind.
KV_NAME = "{prefix}.{layer}.{kind}"
KV_KINDS = ("key", "value")
KV_PAST, KV_PRESENT = "past", "present"


@dataclass(frozen=True)
class GraphDecl:
    """The declared I/O of one graph, in order. An entry is a tensor name, ``"name if flag"`` (present exactly
    when ``model_info[flag]`` is true) or ``"{kv:prefix}"`` (the KV names of every layer with that prefix)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: carries the model's linear layers (quantized under --precision w8a8)
    quantized: bool = False


GRAPHS: dict[str, GraphDecl] = {
    "vision": GraphDecl(("pixel_values",), ("image_features", "cls_attention if has_cls"), quantized=True),
    "embed": GraphDecl(("input_ids",), ("inputs_embeds",)),
    "score": GraphDecl(("text_embeds", "image_features"), ("scores",)),
    "prune": GraphDecl(("image_features", "scores", "keep"), ("kept_features", "kept_index")),
    "prefill": GraphDecl(("inputs_embeds", "attention_mask", "position_ids if position_ids"),
                         ("logits", "{kv:present}"), quantized=True),
    "decode": GraphDecl(("inputs_embeds", "attention_mask", "position_ids if position_ids", "{kv:past}"),
                        ("logits", "{kv:present}"), quantized=True),
}
GRAPH_NAMES = tuple(GRAPHS)
QUANT_GRAPHS = tuple(n for n, d in GRAPHS.items() if d.quantized)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """``[past.0.key, past.0.value, past.1.key, ...]`` for ``prefix`` ``past`` / ``present``."""
    return [KV_NAME.format(prefix=prefix, layer=i, kind=k) for i in range(num_layers) for k in KV_KINDS]


def declared_names(decl_entries: tuple[str, ...], info: dict) -> list[str]:
    """Expand a :class:`GraphDecl` entry list for one model (``model_info``)."""
    names = []
    for entry in decl_entries:
        if entry.startswith("{kv:") and entry.endswith("}"):
            names += kv_names(entry[4:-1], int(info["num_layers"]))
        elif " if " in entry:
            name, flag = entry.split(" if ")
            if info.get(flag):
                names.append(name)
        else:
            names.append(entry)
    return names


def declared_io(graph: str, info: dict) -> tuple[list[str], list[str]]:
    """(input names, output names) the contract declares for ``graph`` of a model with ``info``."""
    d = GRAPHS[graph]
    return declared_names(d.inputs, info), declared_names(d.outputs, info)


# ------------------------------------------------------------------------------------------- accuracy rules
def relative_error(out, ref) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64 (the plain norm when ref is zero; inf on a shape mismatch or a non-finite
    output)."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape or not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(out - ref)
    return float(diff / denom) if denom > 0 else float(diff)


def threshold_for(precision: str) -> float:
    try:
        return THRESHOLDS[precision]
    except KeyError:
        raise ArtifactError(f"precision {precision!r} has no accuracy threshold; known: {', '.join(THRESHOLDS)}") \
            from None


def token_axis(inputs: dict, output) -> int | None:
    """The axis of ``output`` that runs over the positions of ``attention_mask`` [B, S] (logits: 1, KV: 2)."""
    import numpy as np

    mask = inputs.get("attention_mask")
    shape = np.shape(output)
    if mask is None or len(shape) < 2 or shape[0] != np.shape(mask)[0]:
        return None
    return next((a for a in (1, 2) if a < len(shape) and shape[a] == np.shape(mask)[1]), None)


def real_tokens(inputs: dict, out, ref):
    """The real-token rule: keep only real-token positions of per-position outputs (logits, KV); returns
    ``(out, ref, masked)``.

    A left-padded query attends to no valid key, so its attention output, and everything later layers compute
    from it, is implementation-defined (zeros for vlmx FlashAttention, a uniform average for the eager path)
    and never read: padded keys are masked. Such positions are excluded from every comparison.
    """
    import numpy as np

    axis = token_axis(inputs, ref)
    if axis is None or np.shape(out) != np.shape(ref) or np.all(inputs["attention_mask"] != 0):
        return out, ref, False
    keep = np.asarray(inputs["attention_mask"]) != 0
    return np.moveaxis(np.asarray(out), axis, 1)[keep], np.moveaxis(np.asarray(ref), axis, 1)[keep], True


# ------------------------------------------------------------------------------------------- files and digests
class ArtifactError(ValueError):
    """The export directory is missing, incomplete, corrupt, or not what the caller asked for."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """``{"sha256", "bytes", "mtime_ns"}`` of one file."""
    st = os.stat(path)
    return {"sha256": sha256_file(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_table(root: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict:
    """:func:`file_record` of every file under ``root`` (relative POSIX paths) except ``exclude``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_record(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in exclude}


#: Files of a transformers checkpoint directory that decide its weights (fingerprinted in the manifest).
CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def checkpoint_table(directory: str | Path) -> dict:
    """:func:`file_record` of the config and weight files of a checkpoint directory."""
    directory = Path(directory)
    paths = sorted({p for pattern in CHECKPOINT_FILES for p in directory.glob(pattern) if p.is_file()})
    return {p.name: file_record(p) for p in paths}


def verify_files(root: str | Path, table: dict, full: bool = False, what: str = "manifest.json",
                 fix: str = "re-run vlm-export") -> None:
    """Check every file of ``table`` under ``root``: present, same size, and the same sha256 — taken from the
    record when the file's mtime is unchanged (fast), re-hashed otherwise or always with ``full`` (``--verify``)."""
    root = Path(root)
    for rel, meta in table.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in {what} but missing; {fix}")
        st = path.stat()
        if st.st_size != meta["bytes"]:
            raise ArtifactError(f"{path}: size {st.st_size} != {meta['bytes']} in {what} (checksum mismatch: the "
                                f"file was modified or truncated); {fix}")
        if full or st.st_mtime_ns != meta.get("mtime_ns") or not meta.get("mtime_ns"):
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"{path}: sha256 does not match {what} (checksum mismatch: the file was "
                                    f"modified); {fix}")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


VERSIONED = ("vlmx", "torch", "onnx", "transformers", "onnxruntime", "polygraphy")


def versions() -> dict:
    """Versions of the tools that made (or read) an export."""
    return {**{d: _version(d) for d in VERSIONED}, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------- graph I/O
def io_entries(values) -> list[dict]:
    """``[{"name", "shape": [int | axis name], "dtype"}]`` from ONNX value infos."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": DTYPES.get(t.elem_type, str(t.elem_type))})
    return out


def _varint(f) -> int | None:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _fields(f, end: int, wanted: dict[int, list]):
    """Walk the protobuf fields of one message up to offset ``end``: collect the bytes of length-delimited fields
    listed in ``wanted`` (field number -> list), seek past everything else (initializers are never read)."""
    while f.tell() < end:
        tag = _varint(f)
        if tag is None:
            raise ValueError("truncated message")
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(f)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        elif wire == 2:
            n = _varint(f)
            if n is None or f.tell() + n > end:
                raise ValueError("field runs past the end of the file")
            if number in wanted:
                wanted[number].append((f.tell(), n))
            f.seek(n, 1)
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _message(buf: bytes) -> dict[int, list]:
    """Fields of one small protobuf message: {field number: [int (varint) or bytes (length-delimited)]}."""
    import io

    f, out = io.BytesIO(buf), {}
    while f.tell() < len(buf):
        tag = _varint(f)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value = _varint(f)
        elif wire == 2:
            n = _varint(f)
            value = f.read(n)
            if len(value) != n:
                raise ValueError("truncated field")
        elif wire in (1, 5):
            value = f.read(8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _value_info(buf: bytes) -> dict:
    """``{"name", "shape", "dtype"}`` of an ONNX ValueInfoProto (name=1, type=2 -> tensor_type=1 -> elem_type=1,
    shape=2 -> dim=1 -> dim_value=1 | dim_param=2), parsed without the onnx package."""
    v = _message(buf)
    name = v.get(1, [b""])[0].decode()
    tensor = _message(_message(v[2][0]).get(1, [b""])[0]) if 2 in v else {}
    elem = tensor.get(1, [0])[0]
    dims = [_message(d) for d in _message(tensor[2][0]).get(1, [])] if 2 in tensor else []
    shape = [d[2][0].decode() if 2 in d else _signed(d.get(1, [0])[0]) for d in dims]
    return {"name": name, "shape": shape, "dtype": DTYPES.get(elem, str(elem))}


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def graph_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX file. Only the graph's input and output value infos are parsed (no onnx import):
    nodes and initializers are skipped on disk, so a multi-GB file costs a few seeks."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            graphs: list = []
            _fields(f, size, {7: graphs})  # ModelProto.graph
            if len(graphs) != 1:
                raise ValueError(f"{len(graphs)} graph fields")
            start, n = graphs[0]
            f.seek(start)
            ins, outs = [], []
            _fields(f, start + n, {11: ins, 12: outs})  # GraphProto.input / .output
            values = []
            for group in (ins, outs):
                entries = []
                for off, length in group:
                    f.seek(off)
                    entries.append(_value_info(f.read(length)))
                values.append(entries)
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e}); re-run vlm-export") \
            from None
    return values[0], values[1]


def graph_entry(path: str | Path, dynamic_axes: dict, profile: dict) -> dict:
    """The manifest entry of one graph file (its I/O read from the file)."""
    inputs, outputs = graph_io(path)
    return {"file": Path(path).name, "inputs": inputs, "outputs": outputs,
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
            "profile": profile}


def check_graph_decl(manifest: dict, graph: str) -> None:
    """The manifest's I/O names of ``graph`` are exactly the contract's declaration for this model."""
    entry, info = manifest["graphs"][graph], manifest["model_info"]
    want_in, want_out = declared_io(graph, info)
    got_in, got_out = [i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]]
    for side, want, got in (("inputs", want_in, got_in), ("outputs", want_out, got_out)):
        if got != want:
            raise ArtifactError(f"manifest.json: graph {graph} {side} {_diff(want, got)} (declared for "
                                f"num_layers={info.get('num_layers')}); the export is inconsistent: re-run vlm-export")


def check_graph_file(root: str | Path, manifest: dict, graph: str) -> None:
    """The ONNX file of ``graph`` has exactly the I/O (names, dtypes, ranks) the manifest records."""
    entry = manifest["graphs"][graph]
    path = Path(root) / entry["file"]
    got_in, got_out = graph_io(path)
    for side, want, got in (("inputs", entry["inputs"], got_in), ("outputs", entry["outputs"], got_out)):
        sig = [(e["name"], e["dtype"], len(e["shape"])) for e in want]
        found = [(e["name"], e["dtype"], len(e["shape"])) for e in got]
        if sig != found:
            raise ArtifactError(f"{path}: {side} {_diff([s[0] for s in sig], [f[0] for f in found])}"
                                f"{' (dtype or rank differs)' if [s[0] for s in sig] == [f[0] for f in found] else ''}"
                                " vs manifest.json; the graph was replaced: re-run vlm-export")


def _diff(want: list[str], got: list[str]) -> str:
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if not missing and not extra:
        return f"are out of order or mistyped (declared {want[:6]}{'...' if len(want) > 6 else ''})"
    return f"lack {missing[:6]} and have unexpected {extra[:6]}" if extra else f"lack {missing[:6]}"


# ------------------------------------------------------------------------------------------- the manifest
@lru_cache(maxsize=1)
def _schema():
    """The pydantic model of manifest.json (built on first use: pydantic stays out of ``import``)."""
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


def validate_manifest(manifest, where: str = MANIFEST) -> dict:
    """Schema + self-digest + declared-I/O check of a manifest dict; returns it. Raises :class:`ArtifactError`."""
    from pydantic import ValidationError

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{where} is not a {FORMAT} manifest (format={got!r}); pass a vlm-export --out directory")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: format_version {manifest.get('format_version')!r} is not supported (this "
                            f"vlmx reads {FORMAT_VERSION}); re-export with this vlmx version")
    try:
        _schema().model_validate(manifest)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]).encode("unicode_escape").decode() or "(top level)"
        raise ArtifactError(f"{where}: field {loc}: {first['msg'].encode('unicode_escape').decode()} ({e.error_count()} problem(s)); the manifest is "
                            "corrupt or was edited: re-run vlm-export") from None
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise ArtifactError(f"{where} was modified after the export (its manifest_sha256 does not match its "
                            "content); re-run vlm-export")
    for g in GRAPH_NAMES:
        check_graph_decl(manifest, g)
    return manifest


def make_manifest(root: str | Path, fields: dict) -> dict:
    """The complete manifest of ``root``: format header + ``fields`` + file table + versions + date + digest."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "files": file_table(root),
                "versions": versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return validate_manifest(manifest, f"{Path(root) / MANIFEST} (being written)")


def write_manifest(root: str | Path, fields: dict) -> dict:
    """Validate and write ``root/manifest.json``; returns the manifest. The export's only way to write one."""
    manifest = make_manifest(root, fields)
    Path(root, MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict:
    """Read and validate ``root/manifest.json`` (schema, digest, declared I/O); no file is hashed."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}; it is not a vlm-export output (re-run vlm-export)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the export is corrupt: re-run vlm-export") from None
    return validate_manifest(manifest, str(path))


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a vlmx export (a manifest.json whose format is ours, any version)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export(root: str | Path, verify: bool = False) -> dict:
    """Everything a reader checks before using an export directory; returns the manifest.

    The manifest (schema, own digest, declared I/O), every file (size, mtime or digest; full re-hash with
    ``verify``), every graph's I/O in its ONNX file against the manifest.
    """
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"--artifacts {root} is not a directory; pass the --out directory of vlm-export")
    manifest = read_manifest(root)
    for g, entry in manifest["graphs"].items():
        if entry["file"] not in manifest["files"]:
            raise ArtifactError(f"{root / MANIFEST}: graph {g} file {entry['file']} is not in its file table; "
                                "re-run vlm-export")
        if not (root / entry["file"]).is_file():
            raise ArtifactError(f"{root / entry['file']} is missing; the export is incomplete: re-run vlm-export")
    verify_files(root, manifest["files"], full=verify)
    for g in manifest["graphs"]:
        check_graph_file(root, manifest, g)
    return manifest


def report_failure(manifest: dict) -> str | None:
    """Why the export's own accuracy report failed (None when it passed or was not run)."""
    rep = manifest.get("report")
    if rep and not rep["passed"]:
        return (f"its accuracy report FAILED ({rep['file']}: outputs differ from the torch reference beyond the "
                f"{manifest['precision']} threshold {THRESHOLDS.get(manifest['precision'])})")
    return None

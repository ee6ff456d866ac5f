"""The export contract: what an export directory (``vlm-export --out DIR``) holds, written by ``vlmx.export`` and
read by ``vlmx.trt_runtime`` through this one module.

It owns the manifest format and version, its schema (pydantic), the graph and KV-cache names and every graph's
declared I/O, the choices recorded in the manifest (precisions, prune methods, attention modes), the accuracy
thresholds and the relative-error and real-token rules, file digests, the manifest's own digest and the check of
an export directory. Torch-free and cheap to import: numpy, onnx and pydantic are imported where used.

Extending it (e.g. a new LM graph or KV layout) means editing the data below (:data:`GRAPHS`, :data:`KV_NAME`), not
the code that reads it.
Two helpers sit beside it: :mod:`.manifest_schema` (the pydantic model of manifest.json, loaded on first use) and
:mod:`.onnx_io` (a graph's I/O read from the protobuf without the onnx package or the weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .onnx_io import DTYPES, OnnxReadError, io_entries, read_graph_io  # noqa: F401  (DTYPES, io_entries re-exported)

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

# ------------------------------------------------------------------------------------------- graphs and names
#: KV-cache tensor names: ``KV_NAME.format(prefix=..., layer=i, kind=k)`` for every layer and kind.
KV_NAME = "{prefix}.{layer}.{kind}"
KV_KINDS = ("key", "value")
KV_PAST, KV_PRESENT = "past", "present"
#: The language-model graph and its TensorRT optimization profiles (one engine, two profiles).
LM_GRAPH = "lm"
LM_PROFILES = ("prefill", "decode")
#: KV-cache layout of the LM graph: [batch, kv heads, S_max, head dim]; the sequence axis TensorScatter writes.
KV_LAYOUT = ("batch", "kv_heads", "max_seq_len", "head_dim")
KV_SEQ_AXIS = 2


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
    # One language-model graph for prefill (S_new = prompt) and decode (S_new = 1): the per-layer caches
    # [B, H_kv, S_max, D] are updated in place (TensorScatter at slot attention_mask.shape[1] - S_new); a runtime
    # binds past.* and present.* to the same buffers. S_max is model_info["max_seq_len"].
    LM_GRAPH: GraphDecl(("inputs_embeds", "attention_mask", "{kv:past}"), ("logits", "{kv:present}"),
                        quantized=True),
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
def graph_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX file, read without its weights and without the onnx package."""
    try:
        return read_graph_io(path)
    except OnnxReadError as e:
        raise ArtifactError(f"{path} is not a readable ONNX file ({e}); re-run vlm-export") from None


def graph_entry(path: str | Path, dynamic_axes: dict, profile: dict, profiles: dict | None = None) -> dict:
    """The manifest entry of one graph file (its I/O read from the file). ``profiles``: named TensorRT optimization
    profiles of one engine (the LM graph's :data:`LM_PROFILES`); ``profile`` is the first of them."""
    import onnx

    inputs, outputs = graph_io(path)
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    entry = {"file": Path(path).name, "opset": opset, "inputs": inputs, "outputs": outputs,
             "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
             "profile": profile}
    if profiles:
        entry["profiles"] = profiles
    return entry


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
        from .manifest_schema import manifest_model

        manifest_model().model_validate(manifest)
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

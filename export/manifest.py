"""``manifest.json`` of an export directory: what was exported, every graph's I/O, checksums, tool versions."""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import onnx

FORMAT = "vlmx-export"
FORMAT_VERSION = 1
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8", onnx.TensorProto.BOOL: "bool",
           onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BFLOAT16: "bfloat16"}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def io_entries(values) -> list[dict]:
    """``[{"name", "shape": [int | axis name], "dtype"}]`` from ONNX value infos."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))})
    return out


def graph_entry(path: str | Path, dynamic_axes: dict, profile: dict, profiles: dict | None = None) -> dict:
    """The manifest entry of one graph file (graph read without its weights). ``profiles``: named TensorRT
    optimization profiles of one engine (the LM graph's ``prefill`` and ``decode``); ``profile`` is the first."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    entry = {"file": Path(path).name, "opset": opset, "inputs": io_entries(model.graph.input),
             "outputs": io_entries(model.graph.output),
             "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
             "profile": profile}
    if profiles:
        entry["profiles"] = profiles
    return entry


def file_table(root: str | Path) -> dict:
    """sha256 and size of every file under ``root`` except the manifest itself."""
    root = Path(root)
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {"vlmx": _version("vlmx"), "torch": _version("torch"), "onnx": _version("onnx"),
            "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime"),
            "python": platform.python_version()}


def write_manifest(root: str | Path, fields: dict) -> dict:
    """Write ``root/manifest.json`` (format header + ``fields`` + files + versions); returns the dict."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "files": file_table(root),
                "versions": versions()}
    Path(root, "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

"""Graphs of any size: load without the weights, read only the initializers a pass touches, write external data.

- :func:`load` reads the graph with ``load_external_data=False`` and points every external initializer at its file
  by absolute path (checking that the file exists and is long enough); nothing is read yet.
- :func:`import_graph` imports it into graphsurgeon with :class:`FileValues`: a constant's bytes are read from disk
  when a pass asks for ``.values``, without copying them into the ``TensorProto``.
- :func:`release` (after each pass) drops the arrays a pass loaded but left unchanged, and moves the new large
  constants it made into the output's data file, so memory holds one pass's rewritten weights at most.
- :func:`save` streams every initializer into one external data file next to the output model (``<name>.data``),
  tensor by tensor, and writes the (small) model proto.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, external_data_helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

#: Initializers at or above this many bytes go to the external data file (onnx's own default threshold).
EXTERNAL_BYTES = 1024
_ALIGN = 64
_CHUNK = 64 << 20


class ModelError(ValueError):
    """The input model cannot be read; the message names the file and what to do."""


def _external(t: TensorProto) -> dict | None:
    if not external_data_helper.uses_external_data(t):
        return None
    return {e.key: e.value for e in t.external_data}


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def load(path: Path) -> onnx.ModelProto:
    """The model at ``path`` without its weights; external locations made absolute and checked."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist or is not a file; pass an .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise ModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    if not model.graph.node:
        raise ModelError(f"{path} has no graph nodes; is it an ONNX model?")
    base = path.resolve().parent
    for t in model.graph.initializer:
        ext = _external(t)
        if ext is None:
            continue
        loc = Path(ext["location"])
        full = loc if loc.is_absolute() else base / loc
        if not full.is_file():
            raise ModelError(f"{path}: initializer {t.name!r} lives in {ext['location']}, which is missing next to "
                             f"the model; copy the model together with its data file(s)")
        offset, length = int(ext.get("offset", 0)), int(ext.get("length", -1))
        need = int(np.prod(t.dims)) * _itemsize(t) if length < 0 else length
        if offset + need > full.stat().st_size:
            raise ModelError(f"{path}: {ext['location']} is shorter than initializer {t.name!r} needs "
                             f"(truncated copy?)")
        _set_external(t, str(full), offset, need)
    return model


def _itemsize(t: TensorProto) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


class FileValues(LazyValues):
    """Values of an initializer stored in a file; ``load`` reads them without filling the TensorProto."""

    def load(self):
        ext = _external(self.tensor)
        with open(ext["location"], "rb") as f:
            f.seek(int(ext["offset"]))
            raw = f.read(int(ext["length"]))
        copy = TensorProto()
        copy.CopyFrom(self.tensor)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = raw
        return np.array(numpy_helper.to_array(copy))


class Store:
    """The output's external data file, written once, front to back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.spilled: dict[int, FileValues] = {}

    def append(self, data) -> tuple[int, int]:
        pad = (-self.file.tell()) % _ALIGN
        if pad:
            self.file.write(b"\0" * pad)
        offset = self.file.tell()
        n = 0
        for chunk in data:
            self.file.write(chunk)
            n += len(chunk)
        return offset, n

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def import_graph(model: onnx.ModelProto) -> tuple[gs.Graph, dict]:
    """Graphsurgeon graph whose external constants read from disk on demand; also ``{id(constant): values}``."""
    graph = gs.import_onnx(model)
    lazy = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and _external(t._values.tensor):
            t._values = FileValues(t._values.tensor)
            lazy[id(t)] = t._values
    return graph, lazy


def release(graph: gs.Graph, lazy: dict, store: Store) -> None:
    """Drop arrays loaded from files (values unchanged: passes make new constants) and spill new large constants."""
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or isinstance(t._values, LazyValues):
            continue
        if id(t) in lazy:
            t._values = lazy[id(t)]
        elif np.asarray(t._values).nbytes >= EXTERNAL_BYTES:
            proto = _to_proto(t)
            offset, n = store.append([proto.raw_data])
            _set_external(proto, str(store.path.resolve()), offset, n)
            t._values = FileValues(proto)
            lazy[id(t)] = t._values


def _to_proto(t: gs.Constant) -> TensorProto:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_tensor_proto(t)
    if not proto.HasField("raw_data"):
        proto = numpy_helper.from_array(np.asarray(t.values), t.name)
    return proto


def _copy_chunks(src: str, offset: int, length: int):
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise ModelError(f"{src} ended early while copying weights")
            left -= len(chunk)
            yield chunk


def save(model: onnx.ModelProto, path: Path, store: Store) -> None:
    """Write ``model`` to ``path`` with every initializer of ≥ EXTERNAL_BYTES in ``store`` (named relative)."""
    path = Path(path)
    rel = os.path.relpath(store.path.resolve(), path.resolve().parent)
    mine = str(store.path.resolve())
    for t in model.graph.initializer:
        ext = _external(t)
        if ext is not None and ext["location"] == mine:
            offset, n = int(ext["offset"]), int(ext["length"])
        elif ext is not None:
            offset, n = store.append(_copy_chunks(ext["location"], int(ext["offset"]), int(ext["length"])))
        elif t.data_type != TensorProto.STRING and int(np.prod(t.dims)) * _itemsize(t) >= EXTERNAL_BYTES:
            if not t.HasField("raw_data"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            offset, n = store.append([t.raw_data])
        else:
            continue
        _set_external(t, rel, offset, n)
    store.close()
    with open(path, "wb") as f:
        f.write(model.SerializeToString())

"""Read an ONNX file's graph inputs and outputs without the onnx package and without reading its weights.

The protobuf wire format is walked field by field: ModelProto.graph (7) -> GraphProto.input (11) / .output (12);
nodes and initializers are skipped with a seek, so a multi-GB graph costs a few reads. Torch- and onnx-free.
"""
from __future__ import annotations

import io
from pathlib import Path

#: Tensor dtypes a graph's I/O may have (ONNX TensorProto enum value -> name).
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


class OnnxReadError(ValueError):
    """The file is not a readable ONNX model (truncated, corrupt, or something else)."""


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


def read_graph_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX file as ``{"name", "shape", "dtype"}`` entries; raises :class:`OnnxReadError`."""
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
        raise OnnxReadError(f"{type(e).__name__}: {e}") from None
    return values[0], values[1]

"""``insert_quant_streamed``: :func:`insert_quant` (dynamic W8A8) for graphs whose weights live in external data.

A 7B language model (13.5 GB of float16) cannot be imported into graphsurgeon with its weights. This pass works on
the ``onnx.ModelProto`` loaded with ``load_external_data=False`` and touches one initializer at a time::

    x ─ MatMul(W ext) [─ Add(b)] ─ y   =>   x ─ vlmx.QuantizePerToken ─ (q, s) ─ vlmx.W8A8Linear(q, s, Wq, w_scale [, b]) ─ y

Each float constant 2-D MatMul weight is read from its data file (offset/length), quantized with the same
:func:`~vlmx.export.passes.insert_quant.quantize_weight` (so the result equals the in-memory pass bit for bit), and
written as int8 ``[N, K]`` + float32 ``[N]`` scale into a new data file, which also receives every other still
referenced initializer, copied in chunks. The new file replaces the old one. Peak memory: one weight (float32) and
its int8 copy. ``skip``: node names of linears to keep float (as for :func:`insert_quant`; see
:func:`~vlmx.export.passes.insert_quant.skip_nodes`). Generic over MatMul-with-initializer patterns: prefill/decode or one LM graph alike.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlmx.torch_ref.op_table import DOMAIN, OPS, OPSET_VERSION

from ..domain import node_attrs
from .insert_quant import quantize_weight

_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_ALIGN = 4096
_CHUNK = 1 << 26


def _external(t: onnx.TensorProto) -> dict | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {kv.key: kv.value for kv in t.external_data}


def read_tensor(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """One initializer as numpy, reading only its bytes from the external data file (or from the proto)."""
    ext = _external(t)
    if ext is None:
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims)) if t.dims else 1
    with open(base_dir / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        data = np.fromfile(f, dtype=dtype, count=count)
    return data.reshape(tuple(t.dims))


def _linears(model: onnx.ModelProto, skip) -> list[tuple[int, int | None]]:
    """(index of the MatMul, of its bias Add or None) for every float MatMul whose second input is a 2-D
    initializer (indices: protobuf hands out a new wrapper object per access, so identity cannot be used)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for j, n in enumerate(nodes):
        for i in n.input:
            consumers.setdefault(i, []).append(j)
    found = []
    for j, n in enumerate(nodes):
        if n.op_type != "MatMul" or len(n.input) != 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if len(w.dims) != 2 or w.data_type not in _FLOAT or n.name in skip:
            continue
        add = None
        users = consumers.get(n.output[0], [])
        if len(users) == 1 and nodes[users[0]].op_type == "Add":
            other = [i for i in nodes[users[0]].input if i != n.output[0]]
            if len(other) == 1 and other[0] in inits and list(inits[other[0]].dims) == [w.dims[1]] \
                    and inits[other[0]].data_type == w.data_type:
                add = users[0]
        found.append((j, add))
    return found


def insert_quant_streamed(model: onnx.ModelProto, base_dir: str | Path, data_file: str | None = None,
                          skip=()) -> onnx.ModelProto:
    """Quantize every float constant-weight linear of ``model`` (loaded without its external data, which lives in
    ``base_dir``) to W8A8Linear, streaming tensor by tensor; writes the new data file ``data_file`` (default: the
    name the model already uses) in ``base_dir`` and returns the rewritten model (save it next to the data)."""
    base_dir = Path(base_dir)
    skip = set(skip)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    locations = {e["location"] for t in g.initializer if (e := _external(t))}
    data_file = data_file or (sorted(locations)[0] if locations else f"{g.name or 'model'}.onnx.data")
    tmp = base_dir / f"{data_file}.tmp-{os.getpid()}"
    new_inits: list[onnx.TensorProto] = []
    try:
        with open(tmp, "wb") as out:
            def put(name: str, array: np.ndarray) -> None:
                t = numpy_helper.from_array(np.ascontiguousarray(array), name)
                _append_raw(out, t, t.raw_data)
                new_inits.append(t)

            nodes = list(g.node)
            replaced: dict[int, list] = {}
            drop: set[int] = set()
            for i, (mi, ai) in enumerate(_linears(model, skip)):
                mm, add = nodes[mi], (nodes[ai] if ai is not None else None)
                w = read_tensor(inits[mm.input[1]], base_dir)
                wq, ws = quantize_weight(w)
                del w
                name = mm.name or f"linear_{i}"
                put(f"{name}_wq", wq.T)
                put(f"{name}_ws", ws)
                ins = [f"{name}_xq", f"{name}_xs", f"{name}_wq", f"{name}_ws"]
                if add is not None:
                    ins.append(next(x for x in add.input if x != mm.output[0]))
                last = add if add is not None else mm
                out_dtype = "float16" if inits[mm.input[1]].data_type == TensorProto.FLOAT16 else "float32"
                new = [helper.make_node("QuantizePerToken", [mm.input[0]], ins[:2], f"{name}_quantize",
                                          domain=DOMAIN, **node_attrs(OPS["QuantizePerToken"], {})),
                         helper.make_node("W8A8Linear", ins, [last.output[0]], f"{name}_w8a8", domain=DOMAIN,
                                          **node_attrs(OPS["W8A8Linear"], {"out_dtype": out_dtype}))]
                replaced[mi] = new
                if ai is not None:
                    drop.add(ai)
            rebuilt = []
            for j, n in enumerate(nodes):
                if j in replaced:
                    rebuilt += replaced[j]
                elif j not in drop:
                    rebuilt.append(n)
            del g.node[:]
            g.node.extend(rebuilt)
            used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
            fresh = {t.name for t in new_inits}
            kept = []
            for t in g.initializer:
                if t.name not in used or t.name in fresh:
                    continue
                ext = _external(t)
                if ext is None:
                    kept.append(t)
                    continue
                copy = onnx.TensorProto()
                copy.CopyFrom(t)
                del copy.external_data[:]
                copy.data_location = TensorProto.DEFAULT
                _append_file(out, copy, base_dir / ext["location"], int(ext.get("offset", 0)),
                             int(ext["length"]) if "length" in ext else None)
                kept.append(copy)
        del g.initializer[:]
        g.initializer.extend(kept + new_inits)
        for t in g.initializer:
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = data_file
        for old in locations - {data_file}:
            (base_dir / old).unlink(missing_ok=True)
        os.replace(tmp, base_dir / data_file)
        if any(n.domain == DOMAIN for n in g.node) and not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return model


def _set_external(t: onnx.TensorProto, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", "?"), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)


def _pad(out) -> int:
    pos = out.tell()
    if pos % _ALIGN:
        out.write(b"\0" * (_ALIGN - pos % _ALIGN))
    return out.tell()


def _append_raw(out, t: onnx.TensorProto, raw: bytes) -> None:
    offset = _pad(out)
    out.write(raw)
    _set_external(t, offset, len(raw))


def _append_file(out, t: onnx.TensorProto, src: Path, offset: int, length: int | None) -> None:
    if length is None:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        length = (int(np.prod(t.dims)) if t.dims else 1) * np.dtype(dtype).itemsize
    start = _pad(out)
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(_CHUNK, left))
            if not block:
                raise ValueError(f"external data file {src} ends before {t.name} (offset {offset}, length {length})")
            out.write(block)
            left -= len(block)
    _set_external(t, start, length)

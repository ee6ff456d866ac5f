"""Facts about graphsurgeon tensors that patterns need: the producer, small constant values (initializers or
``Constant`` nodes, as the legacy exporter writes scalars), ranks, and static sizes traced through the ops that
split heads (``dim``), for exports whose shape inference left sizes symbolic."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Neg", "Cast", "Concat")


def producer(t) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def const_values(t) -> np.ndarray | None:
    """Values of an initializer or of a ``Constant`` node's output, else None (small tensors only)."""
    if isinstance(t, gs.Constant):
        return None if t.shape is None or int(np.prod(t.shape)) > 64 else np.asarray(t.values)
    node = producer(t)
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def scalar(t) -> float | None:
    v = const_values(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def rank(t) -> int | None:
    return len(t.shape) if t.shape is not None else None


def dim(t, axis: int, depth: int = 8) -> int | None:
    """A static size of ``t`` along ``axis``: from its shape, else traced through Transpose, elementwise ops and the
    Reshape that produced it (a ``-1`` entry is solved from a static input, ``[B, S, H·D] -> [B, S, -1, D]``)."""
    shape = t.shape
    if shape is not None:
        axis = axis % len(shape)
        if isinstance(shape[axis], (int, np.integer)) and shape[axis] >= 0:
            return int(shape[axis])
    node = producer(t)
    if node is None or depth == 0 or shape is None:
        return None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return dim(node.inputs[0], perm[axis], depth - 1) if perm is not None else None
    if node.op == "Slice":  # sizes of axes it does not slice are kept
        axes = const_values(node.inputs[3]) if len(node.inputs) > 3 else None
        if axes is not None and all(int(a) % len(shape) != axis for a in axes.reshape(-1)):
            return dim(node.inputs[0], axis, depth - 1)
        return None
    concat_axis = node.attrs.get("axis") if node.op == "Concat" else None
    if concat_axis is not None and concat_axis % len(shape) == axis:
        return None
    if node.op in _ELEMENTWISE:  # broadcasting (or Concat along another axis): the largest size, when all are known
        dims = [dim(x, axis, depth - 1) if rank(x) == len(shape) else 1
                for x in node.inputs if isinstance(x, gs.Variable) or rank(x) == len(shape)]
        known = [d for d in dims if d is not None]
        if known and max(known) > 1:
            return max(known)
        return 1 if known and len(known) == len(dims) else None
    if node.op == "Reshape":
        target = const_values(node.inputs[1])
        if target is None:
            target = _concat_values(node.inputs[1])
        if target is None or len(target) != len(shape):
            return None
        e = target[axis]
        if e is not None and e > 0:
            return int(e)
        src = node.inputs[0]
        if e == 0:
            return dim(src, axis, depth - 1)
        if e == -1 and rank(src) == axis + 1 and axis == len(shape) - 2:  # [.., H·D] -> [.., -1, D]
            total, rest = dim(src, -1, depth - 1), target[axis + 1]
            if total is not None and rest is not None and rest > 0 and total % rest == 0:
                return total // int(rest)
    return None


def _concat_values(t) -> list | None:
    """A shape built by ``Concat`` of 1-element pieces: known constants, None for dynamic pieces."""
    node = producer(t)
    if node is None or node.op != "Concat":
        return None
    out = []
    for x in node.inputs:
        v = const_values(x)
        if v is None:
            if rank(x) != 1 or x.shape[0] != 1:
                return None
            out.append(None)
        else:
            out += [int(e) for e in v.reshape(-1)]
    return out

"""The in-place KV-cache update as a torch op: ``vlmx_onnx::tensor_scatter``, the semantics of ONNX ``TensorScatter``
(opset 24, ``mode="linear"``) that torch has no single op for.

``present = tensor_scatter(past, update, write_indices, axis)``: ``present`` equals ``past`` except that, for every row
``b``, positions ``write_indices[b] .. write_indices[b] + update.shape[axis] - 1`` along ``axis`` hold ``update[b]``.
The exporter emits it as one ``TensorScatter`` node (TensorRT imports it as an ``IKVCacheUpdateLayer`` whose output
aliases the cache input; ONNX Runtime updates in place when past and present are bound to one buffer). The
reference kernel here is functional (it clones); :func:`write_` is the in-place form the torch backend uses.

Not a ``vlmx`` custom op: it is a standard ONNX op, so it is not in the op table and needs no plugin.
"""
from __future__ import annotations

import torch

NAMESPACE = "vlmx_onnx"
LIB = torch.library.Library(NAMESPACE, "DEF")
LIB.define("tensor_scatter(Tensor past, Tensor update, Tensor write_indices, *, int axis=-2) -> Tensor")


def _index(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, axis: int) -> torch.Tensor:
    """int64 index of ``update``'s shape selecting positions ``write_indices[b] + t`` along ``axis``."""
    axis = axis % past.dim()
    steps = torch.arange(update.shape[axis], device=update.device)
    shape = [1] * update.dim()
    shape[axis] = -1
    row = [1] * update.dim()
    row[0] = -1
    idx = write_indices.to(device=update.device, dtype=torch.int64).view(row) + steps.view(shape)
    return idx.expand(update.shape)


def tensor_scatter(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, axis: int = -2):
    """Reference: a copy of ``past`` with ``update`` written at ``write_indices`` along ``axis`` (per row)."""
    return past.scatter(axis % past.dim(), _index(past, update, write_indices, axis), update.to(past.dtype))


def write_(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, axis: int = -2) -> torch.Tensor:
    """In-place :func:`tensor_scatter` (no host sync, CUDA-graph capturable); returns ``past``."""
    return past.scatter_(axis % past.dim(), _index(past, update, write_indices, axis), update.to(past.dtype))


LIB.impl("tensor_scatter", tensor_scatter, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::tensor_scatter", lambda past, update, write_indices, axis=-2:
                            torch.empty_like(past), lib=LIB)

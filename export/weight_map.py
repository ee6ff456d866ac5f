"""Where each torch weight of the model went in the written ONNX files, so the torch backend can load the
EXPORTED weights (the export directory alone, no checkpoint) into modules built on the meta device.

The exporter and the graph passes rename and reshape weights: constant folding turns ``W.T`` of a linear into an
initializer ``val_N``, ``fuse_qkv`` concatenates three projections into one ``[K, Nq+Nk+Nv]`` constant, position
embeddings become ``[1, S, C]``, identical constants are shared. So the map is found by value, in the export dtype,
right after each graph is written: a torch tensor is an initializer's bytes as they are (any reshape), its
transpose, or a block of columns (the last axis) of a fused initializer: a projection's weight, transposed, or its
bias. Tensors found in no graph are listed as
``unmapped`` (weights the exported graphs never read, e.g. the vision layers past the feature layer; the runtime
zero-fills them). Entry: ``{"graph", "initializer", "transpose", "columns": [start, end] | None}``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

#: Fused-column search only in initializers up to this size (fuse_qkv runs only on graphs held in memory).
MAX_FUSED_BYTES = 512 * 1024 * 1024


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).data).hexdigest() + str(a.dtype)


def model_tensors(model: torch.nn.Module) -> dict[int, list[str]]:
    """``{id(tensor): [every name of it in model]}`` over parameters and buffers (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    return names


class WeightMap:
    """Accumulates the map over the graphs of one export (:meth:`add` per written graph, :meth:`to_dict` at the end)."""

    def __init__(self, model: torch.nn.Module):
        self.names = model_tensors(model)
        self.tensors: dict[str, dict] = {}
        self.seen: set[int] = set()

    def add(self, graph: str, module: torch.nn.Module, onnx_path: str | Path) -> None:
        """Map every parameter / buffer of ``module`` (a graph module of the model) found in ``onnx_path``."""
        proto = onnx.load(str(onnx_path), load_external_data=False)
        base = str(Path(onnx_path).parent)
        by_digest: dict[str, str] = {}
        fusable: list[tuple[str, np.ndarray]] = []
        for init in proto.graph.initializer:
            arr = numpy_helper.to_array(init, base)
            by_digest.setdefault(_digest(arr), init.name)
            if arr.ndim in (1, 2) and arr.nbytes <= MAX_FUSED_BYTES and init.data_location != onnx.TensorProto.EXTERNAL:
                fusable.append((init.name, arr))
        for t in [*module.parameters(), *module.buffers()]:
            names = self.names.get(id(t))
            if not names or id(t) in self.seen or t.device.type == "meta":
                continue
            entry = self._find(t.detach().cpu().numpy(), by_digest, fusable)
            if entry is not None:
                self.seen.add(id(t))
                for n in names:
                    self.tensors[n] = {"graph": graph, **entry}

    @staticmethod
    def _find(a: np.ndarray, by_digest: dict, fusable: list) -> dict | None:
        name = by_digest.get(_digest(a))
        if name is not None:
            return {"initializer": name, "transpose": False, "columns": None}
        if a.ndim == 1:  # a bias [N] inside a fused one [Nq + Nk + Nv]
            for init_name, w in fusable:
                if w.ndim == 1 and w.shape[0] > a.shape[0] and w.dtype == a.dtype:
                    for start in np.flatnonzero(w[:w.shape[0] - a.shape[0] + 1] == a[0]):
                        if np.array_equal(w[start:start + a.shape[0]], a):
                            return {"initializer": init_name, "transpose": False,
                                    "columns": [int(start), int(start + a.shape[0])]}
            return None
        if a.ndim != 2:
            return None
        name = by_digest.get(_digest(a.T))
        if name is not None:
            return {"initializer": name, "transpose": True, "columns": None}
        n, k = a.shape  # a linear weight [N, K]; a fused initializer holds it as columns [K, start:start + N]
        for init_name, w in fusable:
            if w.ndim != 2 or w.shape[0] != k or w.shape[1] <= n or w.dtype != a.dtype:
                continue
            for start in np.flatnonzero((w == a[0][:, None]).all(axis=0)):
                if start + n <= w.shape[1] and np.array_equal(w[:, start:start + n], a.T):
                    return {"initializer": init_name, "transpose": True, "columns": [int(start), int(start + n)]}
        return None

    def to_dict(self, config_file: str) -> dict:
        """The manifest's ``weights`` record; ``unmapped``: names of the model's tensors no graph holds."""
        unmapped = sorted(n for i, ns in self.names.items() if i not in self.seen for n in ns)
        return {"config": config_file, "tensors": dict(sorted(self.tensors.items())), "unmapped": unmapped}

"""Where each torch weight of the model went in the written ONNX files, so the torch backend can load the
EXPORTED weights (the export directory alone, no checkpoint) into modules built on the meta device.

The exporter and the graph passes rename and reshape weights: constant folding turns ``W.T`` of a linear into an
initializer ``val_N``, ``fuse_qkv`` concatenates three projections into one ``[K, Nq+Nk+Nv]`` constant, position
embeddings become ``[1, S, C]``, identical constants are shared. So the map is found by value, in the export dtype,
right after each graph is written: a torch tensor is an initializer's bytes as they are (any reshape), its
transpose, or a block of columns (the last axis) of a fused initializer: a projection's weight, transposed, or its
bias. Tensors found in no graph are listed as
``unmapped`` (weights the exported graphs never read, e.g. the vision layers past the feature layer; the runtime
zero-fills them). The map is per graph (a tensor two graphs read, like LM layer 0's projections in ``score`` and
``lm``, has an entry in each, and may differ: float in one, int8 in the other). Entry: ``{"initializer",
"transpose", "columns", "rows", "scale"}``: the tensor is ``initializer[rows][..., columns]``, transposed, reshaped;
under w8a8 a linear's float weight maps to its W8A8Linear node's int8 ``[N, K]`` weight with its per-channel
``scale`` (``{"initializer", "columns"}``), which the torch backend loads into a W8A8 module.
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


def _block(b: np.ndarray, fusable: list, rows: bool = False) -> tuple[str, list[int]] | None:
    """``(initializer, [start, end])``: ``b`` as a contiguous block along an initializer's last axis (``rows``:
    its first axis), e.g. one projection of a fused q/k/v weight or bias."""
    bb = b.T if rows else b
    n = bb.shape[-1]
    for name, w in fusable:
        ww = w.T if rows else w
        if ww.ndim != bb.ndim or ww.dtype != bb.dtype or ww.shape[:-1] != bb.shape[:-1] or ww.shape[-1] <= n:
            continue
        span = ww.shape[-1] - n + 1
        first = (ww[..., :span] == bb[..., :1]).reshape(-1, span).all(axis=0)
        for start in np.flatnonzero(first):
            if np.array_equal(ww[..., start:start + n], bb):
                return name, [int(start), int(start + n)]
    return None


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
        self.graphs: dict[str, dict[str, dict]] = {}
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
        found = self.graphs.setdefault(graph, {})
        for t in [*module.parameters(), *module.buffers()]:
            names = self.names.get(id(t))
            if not names or t.device.type == "meta":
                continue
            entry = self._find(t.detach().cpu().numpy(), by_digest, fusable)
            if entry is not None:
                self.seen.add(id(t))
                for n in names:
                    found[n] = entry

    @staticmethod
    def _find(a: np.ndarray, by_digest: dict, fusable: list) -> dict | None:
        ref = {"initializer": None, "transpose": False, "columns": None, "rows": None, "scale": None}
        name = by_digest.get(_digest(a))
        if name is not None:
            return {**ref, "initializer": name}
        if a.ndim == 1:  # a bias [N] inside a fused one [Nq + Nk + Nv]
            block = _block(a, fusable)
            return {**ref, "initializer": block[0], "columns": block[1]} if block else None
        if a.ndim != 2:
            return None
        name = by_digest.get(_digest(a.T))  # a linear weight [N, K] as MatMul's [K, N]
        if name is not None:
            return {**ref, "initializer": name, "transpose": True}
        block = _block(a.T, fusable)  # ... or as columns of a fused [K, Nq + Nk + Nv]
        if block:
            return {**ref, "initializer": block[0], "transpose": True, "columns": block[1]}
        if not np.issubdtype(a.dtype, np.floating):
            return None
        from .passes.insert_quant import quantize_weight  # W8A8Linear's int8 [N, K] and per-channel scale [N]

        wq, ws = quantize_weight(a.T)
        wq = np.ascontiguousarray(wq.T)
        name, block = by_digest.get(_digest(wq)), None
        if name is None:
            block = _block(wq, fusable, rows=True)  # rows of a fused [Nq + Nk + Nv, K]
            if block is None:
                return None
            name = block[0]
        scale = by_digest.get(_digest(ws))
        scale = {"initializer": scale, "columns": None} if scale else None
        if scale is None:
            sblock = _block(ws, fusable)
            scale = {"initializer": sblock[0], "columns": sblock[1]} if sblock else None
        if scale is None:
            return None
        return {**ref, "initializer": name, "rows": block[1] if block else None, "scale": scale}

    def to_dict(self, config_file: str) -> dict:
        """The manifest's ``weights`` record; ``unmapped``: names of the model's tensors no graph holds."""
        unmapped = sorted(n for i, ns in self.names.items() if i not in self.seen for n in ns)
        return {"config": config_file, "graphs": {g: dict(sorted(t.items())) for g, t in self.graphs.items()},
                "unmapped": unmapped}

"""The torch reference's inputs and outputs per graph: kept as traced, padded on access, saved one array at a time.

The LM graph's caches are traced with a few slots but written with the fixed length S_max (``GraphSpec.
reference_pad``); padded, a 7B model's 32 layers x (past + present) are ~5 GB of zeros. They are therefore kept at
their traced size while the model is in memory, padded only where an array is used (the report's ONNX Runtime run,
one graph at a time) and written to ``reference.npz`` with deflate, one array at a time, so the zeros cost almost
nothing on disk and never sit in memory beside the weights. ``numpy.load`` reads the file as before.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


def pad_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``array`` zero-padded at the end of ``axis`` to ``size``."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths)


class GraphReference:
    """One graph's reference I/O; ``ref["inputs"]`` / ``ref["outputs"]`` are padded to the file's sizes on access.

    ``pad``: ``{tensor: (axis, size)}``; holds only arrays and that table (never the graph's module)."""

    def __init__(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 pad: Mapping[str, tuple[int, int]] | None = None):
        self._parts = {"inputs": dict(inputs), "outputs": dict(outputs)}
        self._pad = dict(pad or {})

    def arrays(self, part: str) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, padded array)`` of ``part``, one at a time."""
        for name, array in self._parts[part].items():
            yield name, pad_axis(array, *self._pad[name]) if name in self._pad else array

    def __getitem__(self, part: str) -> dict[str, np.ndarray]:
        return dict(self.arrays(part))


def save_references(path: Path, references: Mapping[str, GraphReference]) -> None:
    """Write ``reference.npz`` (members ``<graph>.<tensor>.npy``, deflated) padding one array at a time."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as z:
        for graph, ref in references.items():
            for part in ("inputs", "outputs"):
                for name, array in ref.arrays(part):
                    with z.open(f"{graph}.{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

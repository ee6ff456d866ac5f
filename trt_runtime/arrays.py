"""The few array operations the pipeline does between stages, native to the backend's own arrays.

A runner says which array library its I/O lives in (:attr:`vlmx.trt_runtime.runner.Runner.array_api`): ``numpy``
for CPU runners (ONNX Runtime on the CPU: no torch is imported at all), ``torch`` for runners whose tensors live on
a GPU (torch CUDA tensors: stages then never cross host memory) and for the torch backend. The pipeline only
concatenates embeddings, casts, builds an index tensor, samples and reads token ids back through this seam.
"""
from __future__ import annotations

import numpy as np

from .sampling import NumpySampler, Sampling


class NumpyArrays:
    """Host arrays (numpy; ONNX Runtime's CPU provider reads and writes them in place)."""

    name = "numpy"
    device = "cpu"

    def concat(self, parts, axis: int = 1):
        """Concatenate along ``axis`` in the first part's dtype."""
        dtype = np.asarray(parts[0]).dtype
        return np.concatenate([np.asarray(p).astype(dtype, copy=False) for p in parts], axis=axis)

    def float32(self, x):
        return np.asarray(x, dtype=np.float32)

    def index(self, values) -> np.ndarray:
        """An int64 vector (e.g. the ``keep`` input)."""
        return np.asarray(values, dtype=np.int64)

    def tokens(self, ids):
        """Token ids ``[n]`` as the ``[1, n]`` int64 ``input_ids`` of the embed graph."""
        return np.asarray(ids, dtype=np.int64).reshape(1, -1)

    def host(self, x) -> np.ndarray:
        return np.asarray(x)

    def sampler(self, params: Sampling):
        return NumpySampler(params)


class TorchArrays:
    """torch tensors on ``device`` (a GPU backend's device tensors, or the torch backend on any device)."""

    name = "torch"

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, torch.device(device)

    def _t(self, x):
        t = self.torch
        return x if isinstance(x, t.Tensor) else t.from_numpy(np.asarray(x))

    def concat(self, parts, axis: int = 1):
        parts = [self._t(p) for p in parts]
        return self.torch.cat([p.to(parts[0].dtype) for p in parts], dim=axis)

    def float32(self, x):
        return self._t(x).float()

    def index(self, values):
        return self.torch.tensor(values, dtype=self.torch.int64)

    def tokens(self, ids):
        return self._t(ids).to(self.torch.int64).reshape(1, -1)

    def host(self, x) -> np.ndarray:
        return self._t(x).cpu().numpy()

    def sampler(self, params: Sampling):
        from .torch_sampling import TorchSampler

        return TorchSampler(params, self.device)


def array_ops(runner) -> NumpyArrays | TorchArrays:
    """The array operations for a runner's I/O (its ``array_api``; GPU runners put tensors on CUDA)."""
    if getattr(runner, "array_api", "numpy") == "numpy":
        return NumpyArrays()
    return TorchArrays(getattr(runner, "device", None) or ("cuda" if runner.device_io else "cpu"))

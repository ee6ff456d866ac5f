"""torch backend: the export's own graph modules run in PyTorch, on the GPU with the vlmx kernels.

The model is rebuilt from the manifest (preset, checkpoint, seed), prepared with the exporter's family config for
``--attention plugin`` (every attention is ``vlmx::flash_attention``), and each graph is the same
:mod:`vlmx.export.graphs` module that was exported, so the outputs line up name for name with the ONNX files.
On a CPU (tests) the ops run their reference kernels.
"""
from __future__ import annotations

import numpy as np
import torch

from .runner import Runner

#: Inputs that stay float32 whatever the model dtype (the artifact contract's scores).
FLOAT32_INPUTS = {"scores"}


class TorchGraphRunner(Runner):
    """One export graph module; numpy feeds in, numpy outputs (floats as float32) out."""

    name = "torch"

    def __init__(self, graph: str, module: torch.nn.Module, input_names: list[str], output_names: list[str],
                 device: str, dtype: torch.dtype):
        super().__init__()
        self.graph, self.module = graph, module
        self.input_names, self.output_names = input_names, output_names
        self.device, self.dtype = device, dtype

    def _activate(self):
        self.module.eval()

    def _tensor(self, name: str, value) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(value)).to(self.device)
        if t.is_floating_point():
            t = t.float() if name in FLOAT32_INPUTS else t.to(self.dtype)
        return t

    def _infer(self, feed):
        self.check_feed(feed, self.input_names, f"torch graph {self.graph}")
        args = [self._tensor(n, feed[n]) for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in zip(self.output_names, out)}


def graph_runners(artifacts, device: str | None = None, **_) -> dict[str, Runner]:
    """A :class:`TorchGraphRunner` per graph, built from the manifest's preset, checkpoint and seed."""
    from vlmx.export.model_configs import ExportContext, family_for
    from vlmx.torch_ref import models

    m = artifacts.manifest
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        from .torch_kernels import enable_vlmx_kernels

        enable_vlmx_kernels()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    spec = models.get_preset(m["model"])
    model = models.build_model(spec.name, checkpoint=m.get("checkpoint"), seed=int(m.get("seed", 0)))
    family = family_for(spec)
    family.prepare(model, "plugin")
    model.to(device=device, dtype=dtype).eval()
    ctx = ExportContext(model, spec, attention="plugin", dtype=dtype, seed=int(m.get("seed", 0)))
    runners = {}
    for g in family.graphs(ctx):
        if g.name in m["graphs"]:
            runners[g.name] = TorchGraphRunner(g.name, g.module.to(device), artifacts.input_names(g.name),
                                               artifacts.output_names(g.name), device, dtype)
    return runners

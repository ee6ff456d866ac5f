"""torch backend: the export's own graph modules run in PyTorch, on the GPU with the vlmx kernels.

The model is rebuilt from the manifest (preset, checkpoint, seed) in the export's precision, only when that is the
exported model (fp32, or fp16 on a GPU; the checkpoint's files unchanged since the export, or seeded random weights
under the same torch and transformers; never w8a8), prepared with the exporter's family config for
``--attention plugin`` (every attention is ``vlmx::flash_attention``), and each graph is the same
:mod:`vlmx.export.graphs` module that was exported, so the outputs line up name for name with the ONNX files.
Tensors stay torch tensors on the device in the model dtype (fp16 on a GPU): no host copy, no upcast. The LM graph
writes its bound KV-cache buffers in place, and on a GPU its decode step (S_new = 1) is captured once per generation
in a CUDA graph (:class:`CudaGraphDecode`). On a CPU (tests) the ops run their reference kernels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlmx.torch_ref.contract import KV_PAST, LM_GRAPH

from .runner import Runner

#: Inputs that stay float32 whatever the model dtype (the artifact contract's scores).
FLOAT32_INPUTS = {"scores"}


class TorchGraphRunner(Runner):
    """One export graph module; numpy or torch feeds in, torch tensors on ``device`` out."""

    name = "torch"

    def __init__(self, graph: str, module: torch.nn.Module, input_names: list[str], output_names: list[str],
                 device: str, dtype: torch.dtype):
        super().__init__()
        self.graph, self.module = graph, module
        self.input_names, self.output_names = input_names, output_names
        self.device, self.dtype = torch.device(device), dtype
        self.device_io = self.device.type == "cuda"

    def _activate(self):
        self.module.eval()

    def alloc(self, name, shape, dtype):
        dt = getattr(torch, np.dtype(dtype).name)
        if dt.is_floating_point and name not in FLOAT32_INPUTS:
            dt = self.dtype
        return torch.zeros(tuple(shape), dtype=dt, device=self.device)

    def _tensor(self, name: str, value) -> torch.Tensor:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        t = t.to(self.device, non_blocking=True)
        if t.is_floating_point():
            t = t.float() if name in FLOAT32_INPUTS else t.to(self.dtype)
        return t

    def _infer(self, feed):
        self.check_feed(feed, self.input_names, f"torch graph {self.graph}")
        args = [self.bound[n] if n in self.bound and n not in feed else self._tensor(n, feed[n])
                for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for n, o in zip(self.output_names, out):
            buf = self.bound.get(n)
            if buf is not None and buf is not o:  # a bound output lives in its buffer (in-place caches already do)
                buf.copy_(o)
                o = buf
            result[n] = o
        return result

    def capture_decode(self, batch: int, hidden: int, s_max: int, num_layers: int) -> "CudaGraphDecode":
        """The LM graph's decode step over the bound caches, captured in a CUDA graph (GPU only)."""
        return CudaGraphDecode(self, batch, hidden, s_max, num_layers)


class CudaGraphDecode:
    """The LM decode step captured in one CUDA graph over the bound caches (GPU only; built per generation).

    Static buffers: ``embeds`` [B, 1, C], ``write_pos`` [B], ``key_mask`` [B, S_max]; per token the caller copies the
    new embedding in (device to device), sets the write position, and replays. Shapes never change, so attention
    spans the whole cache with ``kv_len`` masking (:meth:`vlmx.export.graphs.LanguageModelGraph.step`)."""

    def __init__(self, runner: TorchGraphRunner, batch: int, hidden: int, s_max: int, num_layers: int):
        from vlmx.torch_ref.contract import kv_names

        if runner.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the torch backend on a GPU")
        dev = runner.device
        self.embeds = torch.zeros(batch, 1, hidden, dtype=runner.dtype, device=dev)
        self.write_pos = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.key_mask = torch.ones(batch, s_max, dtype=torch.int64, device=dev)
        caches = [runner.bound[n] for n in kv_names(KV_PAST, num_layers)]
        module = runner.module
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):  # warm-up outside capture (allocator, kernels)
            module.step(self.embeds, self.write_pos, self.key_mask, *caches)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = module.step(self.embeds, self.write_pos, self.key_mask, *caches)

    def __call__(self, embeds: torch.Tensor, length: int) -> torch.Tensor:
        """Write token ``length - 1`` (its embedding ``embeds`` [B, 1, C]) and return the logits buffer [B, 1, V]."""
        self.embeds.copy_(embeds)
        self.write_pos.fill_(length - 1)
        self.graph.replay()
        return self.logits


class NotReproducible(ValueError):
    """The torch backend cannot rebuild the exported model exactly (precision or weights); says why and what to use."""


def check_reproducible(artifacts, device: str) -> None:
    """Refuse unless the model rebuilt from the manifest is the exported one: same precision, same weights."""
    m = artifacts.manifest
    other = "use --backend onnxruntime (or tensorrt), which runs the exported graphs themselves"
    if m["precision"] == "w8a8":
        raise NotReproducible("--backend torch cannot run a --precision w8a8 export: its int8 weights come from "
                              f"ONNX graph passes the torch model does not have; {other}")
    if m["precision"] == "fp16" and not device.startswith("cuda"):
        raise NotReproducible("--backend torch runs float16 exports on a CUDA GPU only (none is visible here); "
                              f"{other}")
    if m["checkpoint"]:
        from vlmx.torch_ref.contract import ArtifactError, verify_files

        ckpt = Path(m["checkpoint"])
        try:
            verify_files(ckpt, m.get("checkpoint_files") or {}, what="the export's record of its checkpoint",
                         fix=f"its weights changed since the export, so --backend torch would not run the exported "
                             f"model; re-export, or {other}")
        except ArtifactError as e:
            raise NotReproducible(str(e)) from None
        if not m.get("checkpoint_files"):
            raise NotReproducible(f"the export records no fingerprint of checkpoint {ckpt}; re-export, or {other}")
        return
    from vlmx.torch_ref.contract import versions

    here = versions()
    changed = [f"{k} {m['versions'].get(k)} -> {here.get(k)}" for k in ("torch", "transformers")
               if m["versions"].get(k) != here.get(k)]
    if changed:
        raise NotReproducible(f"the export's seeded random weights were drawn by other library versions "
                              f"({', '.join(changed)}), so --backend torch cannot redraw them; {other}")


def graph_runners(artifacts, device: str | None = None, **_) -> dict[str, Runner]:
    """A :class:`TorchGraphRunner` per graph, built from the manifest's preset, checkpoint and seed in the export's
    precision (refused by :func:`check_reproducible` when that cannot be the exported model)."""
    from vlmx.export.model_configs import ExportContext, family_for
    from vlmx.torch_ref import models

    m = artifacts.manifest
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_reproducible(artifacts, device)
    dtype = torch.float32 if m["precision"] == "fp32" else torch.float16
    if device.startswith("cuda") and dtype == torch.float16:
        from .torch_kernels import enable_vlmx_kernels

        enable_vlmx_kernels()
    spec = models.get_preset(m["model"])
    model = models.build_model(spec.name, checkpoint=m.get("checkpoint"), seed=int(m.get("seed", 0)))
    family = family_for(spec)
    family.prepare(model, "plugin")
    model.to(device=device, dtype=dtype).eval()
    ctx = ExportContext(model, spec, attention="plugin", dtype=dtype, seed=int(m.get("seed", 0)),
                        max_seq_len=m["model_info"].get("max_seq_len"))
    runners = {}
    for name in m["graphs"]:  # the LM graph's module directly: its export dummies hold S_max-long caches
        module = family.lm_module(ctx, inplace=True) if name == LM_GRAPH else getattr(family, f"{name}_graph")(ctx).module
        runners[name] = TorchGraphRunner(name, module.to(device), artifacts.input_names(name),
                                         artifacts.output_names(name), device, dtype)
    return runners

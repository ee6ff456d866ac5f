"""torch backend: the export's own graph modules run in PyTorch, on the GPU with the vlmx kernels.

The model is built on the meta device from the config the export records (``model_config.json``), prepared with the
exporter's family config for ``--attention plugin`` (every attention is ``vlmx::flash_attention``), allocated in the
export's precision (fp32, or fp16 on a GPU; not yet w8a8) and filled with the EXPORTED weights: the ONNX files'
initializers, by the manifest's weight map (:mod:`vlmx.export.weight_map`). Only the export directory is read, never
the checkpoint. Each graph is the same :mod:`vlmx.export.graphs` module that was exported, so the outputs line up
name for name with the ONNX files.
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
    array_api = "torch"  # torch tensors on every device (CPU tests too)

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


class NotRunnable(ValueError):
    """The torch backend cannot run this export (precision, device, or no weight map); says why and what to use."""


OTHER = "use --backend onnxruntime (or tensorrt), which runs the exported graphs themselves"


def check_runnable(artifacts, device: str) -> None:
    """Refuse, before anything is built, an export the torch backend cannot run on ``device``."""
    m = artifacts.manifest
    if m["precision"] == "w8a8":
        raise NotRunnable("--backend torch cannot run a --precision w8a8 export yet: its int8 weights live in "
                          f"W8A8Linear nodes the torch modules do not load; {OTHER}")
    if m["precision"] == "fp16" and not device.startswith("cuda"):
        raise NotRunnable(f"--backend torch runs float16 exports on a CUDA GPU only (none is visible here); {OTHER}")
    if not m.get("weights"):
        raise NotRunnable(f"{artifacts.root} records no map of its weights (exported by an older vlmx), so --backend "
                          f"torch cannot load them; re-export, or {OTHER}")


def _initializers(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers of one ONNX file (external data read one tensor at a time)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    return {i.name: numpy_helper.to_array(i, str(path.parent)) for i in proto.graph.initializer if i.name in names}


def load_exported_weights(model: torch.nn.Module, artifacts) -> None:
    """Fill ``model`` (allocated, uninitialised) with the export's own weights by the manifest's weight map; the
    tensors no graph reads are zeroed, derived buffers (rotary tables, position ids) recomputed."""
    from vlmx.export.weights import reset_derived_buffers

    rec = artifacts.manifest["weights"]
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    missing = sorted(set(state) - set(rec["tensors"]) - set(rec["unmapped"]))
    if missing:
        raise NotRunnable(f"{artifacts.root}: its weight map lacks {missing[:3]} (of {len(missing)}) of the model "
                          f"rebuilt from {rec['config']}; re-export, or {OTHER}")
    with torch.no_grad():
        for name in rec["unmapped"]:
            if name in state:
                state[name].zero_()
        reset_derived_buffers(model)
        by_graph: dict[str, dict[str, dict]] = {}
        for name, ref in rec["tensors"].items():
            by_graph.setdefault(ref["graph"], {})[name] = ref
        for graph, refs in by_graph.items():
            arrays = _initializers(artifacts.graph_path(graph), {r["initializer"] for r in refs.values()})
            for name, ref in refs.items():
                a = arrays[ref["initializer"]]
                if ref["columns"]:
                    a = a[..., ref["columns"][0]:ref["columns"][1]]
                a = a.T if ref["transpose"] else a
                t = state[name]
                t.copy_(torch.from_numpy(np.array(a)).reshape(t.shape))  # a writable copy; copy_ casts


def exported_model(artifacts, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The export's model, built on the meta device from its recorded config, prepared for ``--attention plugin``,
    allocated on ``device`` in ``dtype`` and filled with the exported weights (no checkpoint is read)."""
    import json

    from transformers import LlavaConfig

    from vlmx.export.model_configs import family_for
    from vlmx.torch_ref import models

    m = artifacts.manifest
    spec = models.get_preset(m["model"])
    config = LlavaConfig.from_dict(json.loads((artifacts.root / m["weights"]["config"]).read_text()))
    with torch.device("meta"):
        model = models.model_class(spec)(config).to(dtype)
        family_for(spec).prepare(model, "plugin")
    model.to_empty(device=device)
    load_exported_weights(model, artifacts)
    return model.eval()


def graph_runners(artifacts, device: str | None = None, **_) -> dict[str, Runner]:
    """A :class:`TorchGraphRunner` per graph: the export's model rebuilt from its config and weights (refused by
    :func:`check_runnable` when that cannot run here), each graph the module that was exported."""
    from vlmx.export.model_configs import ExportContext, family_for
    from vlmx.torch_ref import models

    m = artifacts.manifest
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_runnable(artifacts, device)
    dtype = torch.float32 if m["precision"] == "fp32" else torch.float16
    if device.startswith("cuda") and dtype == torch.float16:
        from .torch_kernels import enable_vlmx_kernels

        enable_vlmx_kernels()
    spec = models.get_preset(m["model"])
    family = family_for(spec)
    model = exported_model(artifacts, device, dtype)
    ctx = ExportContext(model, spec, attention="plugin", dtype=dtype, seed=int(m.get("seed", 0)),
                        max_seq_len=m["model_info"].get("max_seq_len"))
    runners = {}
    for name in m["graphs"]:  # the LM graph's module directly: its export dummies hold S_max-long caches
        module = family.lm_module(ctx, inplace=True) if name == LM_GRAPH else getattr(family, f"{name}_graph")(ctx).module
        runners[name] = TorchGraphRunner(name, module.to(device), artifacts.input_names(name),
                                         artifacts.output_names(name), device, dtype)
    return runners

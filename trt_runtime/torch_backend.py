"""torch backend: the export's own graph modules run in PyTorch, on the GPU with the vlmx kernels.

The model is built on the meta device from the config the export records (``model_config.json``), prepared with the
exporter's family config for ``--attention plugin`` (every attention is ``vlmx::flash_attention``), allocated in the
export's precision (fp32, fp16; w8a8: the W8A8Linear nodes' int8 weights and scales in torch_ref W8A8 modules that
call ``vlmx::quantize_per_token`` / ``vlmx::w8a8_linear``, our CUDA kernels on a GPU) and filled with the EXPORTED weights: the ONNX files'
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
    """Refuse, before anything is built, an export the torch backend cannot run."""
    m = artifacts.manifest
    if not m.get("weights"):
        raise NotRunnable(f"{artifacts.root} records no map of its weights (exported by an older vlmx), so --backend "
                          f"torch cannot load them; re-export, or {OTHER}")


def _initializers(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers of one ONNX file (external data read one tensor at a time)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    return {i.name: numpy_helper.to_array(i, str(path.parent)) for i in proto.graph.initializer if i.name in names}


def _select(arrays: dict, ref: dict) -> np.ndarray:
    """The tensor a weight-map entry points at: ``initializer[rows][..., columns]``, transposed when it says so."""
    a = arrays[ref["initializer"]]
    if ref.get("rows"):
        a = a[ref["rows"][0]:ref["rows"][1]]
    if ref.get("columns"):
        a = a[..., ref["columns"][0]:ref["columns"][1]]
    return np.array(a.T if ref["transpose"] else a)  # a writable copy


def load_exported_weights(model: torch.nn.Module, artifacts) -> dict[str, dict[str, torch.nn.Module]]:
    """Fill ``model`` (allocated, uninitialised) with the export's own weights by the manifest's weight map: float
    tensors in place (the ones no graph reads zeroed, derived buffers recomputed). Returns, per graph, the W8A8
    modules (``vlmx::w8a8_linear`` over the exported int8 weights and scales) that replace float linears there."""
    from vlmx.export.weights import reset_derived_buffers
    from vlmx.torch_ref.lm_w8a8 import W8A8Linear

    rec = artifacts.manifest["weights"]
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    mapped = {n for refs in rec["graphs"].values() for n in refs}
    missing = sorted(set(state) - mapped - set(rec["unmapped"]))
    if missing:
        raise NotRunnable(f"{artifacts.root}: its weight map lacks {missing[:3]} (of {len(missing)}) of the model "
                          f"rebuilt from {rec['config']}; re-export, or {OTHER}")
    quantized: dict[str, dict[str, torch.nn.Module]] = {}
    out_dtype = "float16" if artifacts.manifest["precision"] != "fp32" else "float32"
    with torch.no_grad():
        for t in state.values():
            t.zero_()
        reset_derived_buffers(model)
        for graph, refs in rec["graphs"].items():  # a float tensor in two graphs holds the same values in both
            names = {r["initializer"] for r in refs.values()} | {r["scale"]["initializer"] for r in refs.values()
                                                                 if r.get("scale")}
            arrays = _initializers(artifacts.graph_path(graph), names)
            for name, ref in refs.items():
                if not ref.get("scale"):
                    t = state[name]
                    t.copy_(torch.from_numpy(_select(arrays, ref)).reshape(t.shape))
            for name, ref in refs.items():
                if ref.get("scale"):  # after the floats: the W8A8 module takes the linear's (float) bias
                    path = name.removesuffix(".weight")
                    linear = model.get_submodule(path)
                    if not isinstance(linear, torch.nn.Linear):  # a tied embedding (MPT's wte = lm_head)
                        continue
                    dev = linear.weight.device
                    w = torch.from_numpy(_select(arrays, ref)).to(dev)
                    ws = torch.from_numpy(_select(arrays, {**ref["scale"], "transpose": False})).to(dev)
                    quantized.setdefault(graph, {})[path] = W8A8Linear.from_quantized(w, ws, linear.bias, out_dtype)
    return quantized


def exported_model(artifacts, device: str, dtype: torch.dtype):
    """The export's model, built on the meta device from its recorded config, prepared for ``--attention plugin``
    in the export's precision, allocated on ``device`` in ``dtype`` and filled with the exported weights (no
    checkpoint is read). Returns ``(model, {graph: {module path: W8A8 module}})``."""
    import json

    from transformers import LlavaConfig

    from vlmx.export.model_configs import family_for
    from vlmx.torch_ref import models

    m = artifacts.manifest
    spec = models.get_preset(m["model"])
    config = LlavaConfig.from_dict(json.loads((artifacts.root / m["weights"]["config"]).read_text()))
    with torch.device("meta"):
        model = models.model_class(spec)(config).to(dtype)
        family_for(spec).prepare(model, "plugin", m["precision"])
    model.to_empty(device=device)
    quantized = load_exported_weights(model, artifacts)
    return model.eval(), quantized


def _use(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    for path, mod in modules.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def graph_runners(artifacts, device: str | None = None, **_) -> dict[str, Runner]:
    """A :class:`TorchGraphRunner` per graph: the export's model rebuilt from its config and weights, each graph the
    module that was exported. A linear that one graph runs in int8 and another in float (LM layer 0's projections:
    ``lm`` and ``score``) is swapped in before that graph's module is built; graph modules hold their parts."""
    from vlmx.export.model_configs import ExportContext, family_for
    from vlmx.torch_ref import models

    m = artifacts.manifest
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_runnable(artifacts, device)
    dtype = torch.float32 if m["precision"] == "fp32" else torch.float16
    if device.startswith("cuda") and dtype == torch.float16:  # fp16 and w8a8 exports
        from .torch_kernels import enable_vlmx_kernels

        enable_vlmx_kernels()
    spec = models.get_preset(m["model"])
    family = family_for(spec)
    model, quantized = exported_model(artifacts, device, dtype)
    ctx = ExportContext(model, spec, attention="plugin", dtype=dtype, seed=int(m.get("seed", 0)),
                        max_seq_len=m["model_info"].get("max_seq_len"))
    int8 = {p: mod for q in quantized.values() for p, mod in q.items()}
    # graphs that run in float a linear another graph runs in int8 (score: LM layer 0's q/k) are built first, over
    # the float modules, which they hold; then every int8 module goes in for the others
    refs = m["weights"]["graphs"]
    keeps_float = {g: [p for p in int8 if f"{p}.weight" in refs.get(g, {}) and p not in quantized.get(g, {})]
                   for g in m["graphs"]}
    modules = {}
    for name in sorted(m["graphs"], key=lambda g: not keeps_float[g]):
        if not keeps_float[name] and int8:
            _use(model, int8)
            int8 = {}
        module = family.lm_module(ctx, inplace=True) if name == LM_GRAPH else getattr(family, f"{name}_graph")(ctx).module
        modules[name] = module
    for name, paths in keeps_float.items():
        held = {id(sub) for sub in modules[name].modules()}
        if any(id(model.get_submodule(p)) in held for p in paths):
            raise NotRunnable(f"--backend torch: the {name} graph reaches {paths[0]} through the model, so it cannot "
                              f"keep it in float while another graph runs it in int8; {OTHER}")
    return {name: TorchGraphRunner(name, modules[name].to(device), artifacts.input_names(name),
                                   artifacts.output_names(name), device, dtype) for name in m["graphs"]}

"""The generic export driver: preset → model → graphs → passes → reference → report → manifest.

It never branches on a model name: everything model-specific comes from the family config
(:mod:`vlmx.export.model_configs`). The output directory is written as ``<out>.tmp-<pid>`` and renamed into
place only when complete; on any error the temporary directory is removed.
"""
from __future__ import annotations

import copy
import gc
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import hf_attention
from .exporter import check_opset, export_graph
from .functions import strip_vlmx_functions
from .manifest import graph_entry, write_manifest
from .model_configs import ExportContext, family_for
from .passes import calibrate, fuse_qkv, insert_quant, run_passes, strip_functions
from .passes.cleanup import cleanup
from .passes.insert_quant import skip_nodes
from .passes.insert_quant_streamed import insert_quant_streamed
from .weights import LARGE_MODEL_BYTES, random_model, weight_bytes_estimate

PRECISIONS = ("fp16", "w8a8", "fp32")
PRUNE_METHODS = ("text", "cls")
#: Graphs that carry the model's linear layers (quantized under --precision w8a8).
QUANT_GRAPHS = ("vision", "prefill", "decode")
#: Sidecar with the language model's SmoothQuant plan (α per group, calibrated errors, skip list) under w8a8.
LM_W8A8_FILE = "lm_w8a8.json"
#: Graphs written to reference.npz / checked by the report.
REFERENCE_GRAPHS = ("vision", "embed", "score", "prune", "prefill", "decode")


@dataclass
class ExportOptions:
    """Everything ``vlm-export`` takes (validated by :func:`vlmx.export.cli.validate`)."""

    model: str
    out: Path
    checkpoint: str | None = None
    target: str = "trt-sm75"
    precision: str = "fp16"
    attention: str = "plugin"
    opset: int | None = None
    calib: int = 0
    keep: float = 1.0
    prune: str = "text"
    seed: int = 0
    plugins_only: bool = False
    overwrite: bool = False
    report: bool = True
    #: weight bytes above which a graph's weights go to external data and its passes stream (tests lower it)
    external_threshold: int | None = None
    #: w8a8: language-model linears (torch module names) kept float; None = chosen by calibration
    lm_skip: tuple[str, ...] | None = None

    def resolved_opset(self) -> int:
        """--opset, or the smallest one the options need (23 for native attention, 19 for static Q/DQ, else 18)."""
        if self.opset is not None:
            return check_opset(self.opset)
        if self.attention == "native":
            return hf_attention.NATIVE_ATTENTION_OPSET
        return 19 if self.calib else 18

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else torch.float16


class _NoProgress:
    def stage(self, name: str):
        return _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _graph_passes(opts: ExportOptions, name: str, spec_inputs: dict, applied: dict, vision_quantized: bool,
                 base_dir: Path | None = None, lm_skip=()):
    """The pass list of one graph for these options (the passes never see CLI flags, only their arguments).

    Weight-rewriting passes need the weights in memory; a graph whose weights were streamed to external data (over
    1.8 GB: the 7B language models) gets only the graph-level steps, plus under w8a8 the streamed W8A8 quantization
    (:func:`insert_quant_streamed`, one initializer at a time, in ``base_dir``). ``lm_skip``: torch module names of
    the language model's linears that stay float (SmoothQuant's skip list). ``applied[name]`` records what ran.
    """
    quantize = opts.precision == "w8a8" and name in QUANT_GRAPHS and not (name == "vision" and vision_quantized)

    def post(model, external=False):
        skip = skip_nodes(model, lm_skip) if quantize and name != "vision" else set()
        if external:
            names = []
            if quantize:
                model = insert_quant_streamed(model, base_dir, skip=skip)
                names.append("insert_quant(dynamic, streamed)")
            if opts.plugins_only:
                strip_vlmx_functions(model)
                names.append("strip_functions")
            applied[name] = names
            return model
        passes = [fuse_qkv]
        names = ["fuse_qkv"]
        if quantize:
            names.append("insert_quant(static)" if opts.calib else "insert_quant(dynamic)")
            if opts.calib:
                feeds = _calib_feeds(spec_inputs, opts.calib, opts.seed)
                amax = calibrate(run_passes(model, [fuse_qkv]), feeds)
                passes.append(lambda g: insert_quant(g, "static", amax, skip=skip))
            else:
                passes.append(lambda g: insert_quant(g, "dynamic", skip=skip))
        passes.append(cleanup)
        names.append("cleanup")
        if opts.plugins_only:
            passes.append(strip_functions)
            names.append("strip_functions")
        applied[name] = names
        return run_passes(model, passes, functions=not opts.plugins_only)

    return post


def _calib_feeds(inputs: dict, n: int, seed: int) -> list[dict]:
    """``n`` calibration feeds: the dummy inputs with float tensors re-drawn at the same scale."""
    rng = np.random.default_rng(seed + 12345)
    feeds = []
    for _ in range(n):
        feed = {}
        for k, v in inputs.items():
            a = _to_numpy(v)
            if np.issubdtype(a.dtype, np.floating) and a.ndim >= 2:
                std = float(np.std(a.astype(np.float32))) or 1.0
                a = (rng.standard_normal(a.shape) * std).astype(a.dtype)
            feed[k] = a
        feeds.append(feed)
    return feeds


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def reference_graphs(family, ctx: ExportContext, same_dtype: bool = False) -> dict:
    """The graphs of the torch reference: the exported model itself in float32, else a float32 copy with the
    same (upcast) weights, so float16 / w8a8 exports are judged against a higher-precision reference. Large models
    (``same_dtype``) are their own reference: a float32 copy of a 7B model would not fit next to it."""
    if ctx.dtype == torch.float32 or same_dtype:
        return {g.name: g for g in family.graphs(ctx)}
    ref_model = copy.deepcopy(ctx.model).to(torch.float32)
    ref_ctx = ExportContext(ref_model, ctx.spec, ctx.attention, torch.float32, ctx.seed, ctx.max_batch)
    return {g.name: g for g in family.graphs(ref_ctx)}


def export_model(opts: ExportOptions, progress=None) -> dict:
    """Run the whole export into ``opts.out``; returns the manifest. Options must already be validated."""
    from vlmx.torch_ref import models
    from vlmx.torch_ref.op_table import markdown_table
    from vlmx.torch_ref.targets import get_target

    from .domain import ops_used
    from .report import build_report

    progress = progress or _NoProgress()
    out = Path(opts.out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        spec = models.get_preset(opts.model)
        family = family_for(spec)
        large = weight_bytes_estimate(spec, opts.dtype) > LARGE_MODEL_BYTES
        with progress.stage("build model"):
            if large and opts.checkpoint is None:  # no float32 copy of a 7B model
                _, model, _ = random_model(spec, opts.seed, opts.dtype)
            else:
                model = models.build_model(spec, checkpoint=opts.checkpoint, seed=opts.seed, dtype=opts.dtype)
            # before prepare(): calibration runs the language model's layers with their own attention
            lm_plan = family.smooth_language_model(model, opts.precision, skip=opts.lm_skip)  # w8a8, else None
            family.prepare(model, opts.attention, opts.precision)
            ctx = ExportContext(model, spec, opts.attention, opts.dtype, opts.seed)
            ref_graphs = reference_graphs(family, ctx, same_dtype=large)
            ref_fp32 = opts.dtype == torch.float32 or not large
            info = family.model_info(ctx)
        opset = opts.resolved_opset()
        entries, references, used, vision_module, applied = {}, {}, set(), None, {}
        for g in family.graphs(ctx):
            with progress.stage(f"export {g.name}"):
                ref = ref_graphs[g.name]
                with torch.no_grad():
                    outs = ref.module(*(_upcast(v) if ref_fp32 else v for v in g.inputs.values()))
                outs = outs if isinstance(outs, tuple) else (outs,)
                references[g.name] = {"inputs": {k: _to_numpy(v) for k, v in g.inputs.items()},
                                      "outputs": {n: _to_numpy(o) for n, o in zip(g.outputs, outs)}}
                path = export_graph(g, tmp, opset, postprocess=_graph_passes(
                    opts, g.name, g.inputs, applied, family.quantizes_vision(opts.precision), tmp,
                    lm_plan.skip if lm_plan else ()), functions=not opts.plugins_only,
                    **({} if opts.external_threshold is None else {"external_threshold": opts.external_threshold}))
                import onnx

                used |= set(ops_used(onnx.load(str(path), load_external_data=False)))
                entries[g.name] = graph_entry(path, g.dynamic_axes, g.profile)
                entries[g.name]["passes"] = applied.get(g.name, [])
                if g.name == "vision":
                    vision_module = ref.module
        notes = [f"{g}: weights streamed to external data, so its linear layers stay float (insert_quant needs "
                 "them in memory)" for g in QUANT_GRAPHS if opts.precision == "w8a8" and g in entries
                 and not any(p.startswith("insert_quant") for p in entries[g]["passes"])
                 and not (g == "vision" and family.quantizes_vision(opts.precision))]
        if lm_plan is not None:
            import json

            (tmp / LM_W8A8_FILE).write_text(json.dumps(lm_plan.to_dict(), indent=1) + "\n")
            notes.append(f"language model: SmoothQuant on {lm_plan.tokens} calibration tokens; "
                         f"{len(lm_plan.skip)} linears kept float ({LM_W8A8_FILE})")
        del model, ctx, ref_graphs, g, ref  # the report's ONNX Runtime sessions need the memory
        gc.collect()
        with progress.stage("reference + report"):
            np.savez(tmp / "reference.npz", **{f"{g}.{k}": v for g, r in references.items()
                                              for part in ("inputs", "outputs") for k, v in r[part].items()})
            (tmp / "vlmx_ops.md").write_text(markdown_table() + "\n")
            report = None
            if opts.report and not opts.plugins_only:
                report = build_report(tmp, references, opts.precision, vision_module)
        with progress.stage("manifest"):
            target = get_target(opts.target)
            fields = {"model": spec.name, "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
                      "target": target.name, "sm": target.sm, "precision": opts.precision,
                      "attention": opts.attention, "opset": opset, "keep": opts.keep, "prune": opts.prune,
                      "seed": opts.seed, "plugins_only": opts.plugins_only, "ops_used": sorted(used),
                      "model_info": info, "graphs": entries, "reference": "reference.npz",
                      "report": {"passed": report["passed"], "file": "report.json"} if report else None,
                      "notes": notes}
            manifest = write_manifest(tmp, fields)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""The generic export driver: preset → model → graphs → passes → reference → report → manifest.

It never branches on a model name: everything model-specific comes from the family config
(:mod:`vlmx.export.model_configs`). The output directory is written through :func:`vlmx.torch_ref.outdir.atomic_output`
(``<out>.vlmx-tmp-<pid>``, one lock per ``--out``, renamed into place only when complete, removed on any error).
"""
from __future__ import annotations

import copy
import gc
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch

from vlmx.torch_ref.contract import (GRAPH_NAMES, MODEL_CONFIG, PRECISIONS, PRUNE_METHODS, QUANT_GRAPHS,
                                    checkpoint_table, graph_entry, is_export_dir, write_manifest)
from vlmx.torch_ref.outdir import atomic_output, check_out

from . import hf_attention
from .exporter import export_graph
from .functions import strip_vlmx_functions
from .model_configs import ExportContext, family_for
from .options import ExportOptions
from .passes import calibrate, fuse_qkv, insert_quant, run_passes, strip_functions
from .passes.cleanup import cleanup
from .passes.insert_quant import skip_nodes
from .passes.insert_quant_streamed import insert_quant_streamed
from .processor_files import write_processor_files
from .references import GraphReference, save_references
from .weight_map import WeightMap
from .weights import LARGE_MODEL_BYTES, random_model, weight_bytes_estimate

#: Sidecar with the language model's SmoothQuant plan (alpha per group, calibrated errors, skip list) under w8a8.
LM_W8A8_FILE = "lm_w8a8.json"

__all__ = ["ExportOptions", "export_model", "GRAPH_NAMES", "PRECISIONS", "PRUNE_METHODS", "QUANT_GRAPHS"]


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
    fuse = FUSE_ATTENTION.get(opts.attention)

    def post(model, external=False):
        skip = skip_nodes(model, lm_skip) if quantize and name != "vision" else set()
        fused = []
        if fuse is not None:
            model = _fuse_attention(model, fuse, fused, base_dir if external else None)
        if external:
            names = [_fusion_entry(fuse, fused)] if fuse is not None else []
            if quantize:
                model = insert_quant_streamed(model, base_dir, skip=skip)
                names.append("insert_quant(dynamic, streamed)")
            if opts.plugins_only:
                strip_vlmx_functions(model)
                names.append("strip_functions")
            applied[name] = names
            return model
        passes = [fuse_qkv]
        names = ([_fusion_entry(fuse, fused)] if fuse is not None else []) + ["fuse_qkv"]
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


#: ``fuse_attention`` target per ``--attention`` mode. The export swaps every attention it knows for the mode's
#: form, so on our presets the pass finds nothing; it fuses attention the swap missed (a checkpoint module that
#: transformers cannot switch, written as MatMul/Softmax). ``decomposed`` asks for MatMul/Softmax: not run.
FUSE_ATTENTION = {"plugin": "vlmx", "native": "onnx"}


def _fuse_attention(model, target: str, rows: list, base_dir: Path | None):
    """``fuse_attention`` on a weightless proto; ``base_dir``: where its external data lives (the streamed path:
    locations are made absolute for the pass, so the few constants it reads load, and relative again after)."""
    import os

    from .passes import fuse_attention

    ext = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL] if base_dir else []
    for t in ext:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = str(Path(base_dir, kv.value).resolve())
    model = run_passes(model, [lambda g: fuse_attention(g, target, report=rows)], functions=False)
    for t in model.graph.initializer if base_dir else []:
        for kv in t.external_data:
            if kv.key == "location" and os.path.isabs(kv.value):
                kv.value = os.path.relpath(kv.value, Path(base_dir).resolve())
    return model


def _fusion_entry(target: str, rows: list) -> str:
    """The manifest's record of one graph's attention fusion: counts and, for each Softmax left, why."""
    fused = sum(r["status"] == "fused" for r in rows)
    why = sorted({r["reason"] for r in rows if r["status"] != "fused"})
    return f"fuse_attention({target}): {fused} fused, {len(rows) - fused} not matched" + \
        (f" ({'; '.join(why)})" if why else "")


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
    ref_ctx = ExportContext(ref_model, ctx.spec, ctx.attention, torch.float32, ctx.seed, ctx.max_batch,
                            ctx.max_seq_len)
    return {g.name: g for g in family.graphs(ref_ctx)}


def export_model(opts: ExportOptions, progress=None) -> dict:
    """Run the whole export into ``opts.out``; returns the manifest. Options must already be validated."""
    progress = progress or _NoProgress()
    recheck = partial(check_out, opts.out, opts.overwrite, is_export_dir, "a vlmx export")
    with atomic_output(opts.out, recheck=recheck) as tmp:
        return _export_into(tmp, opts, progress)


def _export_into(tmp: Path, opts: ExportOptions, progress) -> dict:
    """The export itself, written into the temporary directory ``tmp``."""
    from vlmx.torch_ref import models
    from vlmx.torch_ref.op_table import markdown_table
    from vlmx.torch_ref.targets import get_target

    from .domain import ops_used
    from .report import build_report

    spec = models.get_preset(opts.model)
    family = family_for(spec)
    large = weight_bytes_estimate(spec, opts.dtype) > LARGE_MODEL_BYTES
    with progress.stage("build model"):
        if large and opts.checkpoint is None:  # no float32 copy of a 7B model
            _, model, _ = random_model(spec, opts.seed, opts.dtype)
        else:
            model = models.build_model(spec, checkpoint=opts.checkpoint, seed=opts.seed, dtype=opts.dtype)
        processor = write_processor_files(tmp, spec, opts.checkpoint)  # --calib DIR reads prompts through them
        # before prepare(): calibration runs the language model's layers with their own attention
        embeds = None
        if opts.calib_dir is not None and opts.precision == "w8a8":
            from .calib_data import lm_inputs_embeds, read_calib_dir

            embeds = lm_inputs_embeds(model, tmp, read_calib_dir(opts.calib_dir), spec.image_token_id)
        lm_plan = family.smooth_language_model(model, opts.precision, skip=opts.lm_skip,
                                               calib_embeds=embeds)  # w8a8, else None
        del embeds
        (tmp / MODEL_CONFIG).write_text(model.config.to_json_string())  # before prepare sets attention
        family.prepare(model, opts.attention, opts.precision)
        weight_map = WeightMap(model)
        ctx = ExportContext(model, spec, opts.attention, opts.dtype, opts.seed, max_seq_len=opts.max_seq_len)
        ref_graphs = reference_graphs(family, ctx, same_dtype=large)
        ref_fp32 = opts.dtype == torch.float32 or not large
        info = {**family.model_info(ctx), "max_seq_len": ctx.seq_len}
    opset = opts.resolved_opset()
    # Beside a large model's weights every graph streams its weights to external data: an in-memory proto of
    # the 0.6 GB CLIP-L tower cost 3.6 GB at the peak (LLaVA-7B peak RSS 1.31x -> under 1.3x of the fp16 weights).
    threshold = opts.external_threshold if opts.external_threshold is not None else (0 if large else None)
    entries, references, used, vision_module, applied = {}, {}, set(), None, {}
    for g in family.graphs(ctx):
        with progress.stage(f"export {g.name}"):
            ref = ref_graphs[g.name]
            with torch.no_grad():
                outs = ref.module(*(_upcast(v) if ref_fp32 else v for v in g.inputs.values()))
            outs = outs if isinstance(outs, tuple) else (outs,)
            references[g.name] = GraphReference({k: _to_numpy(v) for k, v in g.inputs.items()},
                                                {n: _to_numpy(o) for n, o in zip(g.outputs, outs)}, g.reference_pad)
            path = export_graph(g, tmp, max(opset, g.min_opset), postprocess=_graph_passes(
                opts, g.name, g.inputs, applied, family.quantizes_vision(opts.precision), tmp,
                lm_plan.skip if lm_plan else ()), functions=not opts.plugins_only,
                **({} if threshold is None else {"external_threshold": threshold}))
            used |= set(ops_used(onnx.load(str(path), load_external_data=False)))
            entries[g.name] = graph_entry(path, g.manifest_axes, g.profile, g.profiles)
            entries[g.name]["passes"] = applied.get(g.name, [])
            weight_map.add(g.name, g.module, path)
            if g.name == "vision":
                vision_module = ref.module
    notes = [f"{g}: weights streamed to external data, so its linear layers stay float (insert_quant needs "
             "them in memory)" for g in QUANT_GRAPHS if opts.precision == "w8a8" and g in entries
             and not any(p.startswith("insert_quant") for p in entries[g]["passes"])
             and not (g == "vision" and family.quantizes_vision(opts.precision))]
    if lm_plan is not None:
        import json

        source = f"--calib {opts.calib_dir}" if opts.calib_dir is not None else "the built-in text"
        (tmp / LM_W8A8_FILE).write_text(json.dumps({**lm_plan.to_dict(), "calibration": source}, indent=1) + "\n")
        notes.append(f"language model: SmoothQuant on {lm_plan.tokens} calibration tokens ({source}); "
                     f"{len(lm_plan.skip)} linears kept float ({LM_W8A8_FILE})")
    weights = weight_map.to_dict(MODEL_CONFIG)
    del model, ctx, ref_graphs, g, ref, weight_map  # the report's ONNX Runtime sessions need the memory
    gc.collect()
    with progress.stage("reference + report"):
        save_references(tmp / "reference.npz", references)
        (tmp / "vlmx_ops.md").write_text(markdown_table() + "\n")
        report = None
        if opts.report and not opts.plugins_only:
            about = {"model": spec.name, "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
                     "attention": opts.attention, "target": opts.target, "opset": opset}
            report = build_report(tmp, references, opts.precision, vision_module, about)
    with progress.stage("manifest"):
        target = get_target(opts.target)
        ckpt = Path(opts.checkpoint).resolve() if opts.checkpoint else None
        fields = {"model": spec.name, "checkpoint": str(ckpt) if ckpt else None,
                  "checkpoint_files": checkpoint_table(ckpt) if ckpt else None,
                  "target": target.name, "sm": target.sm, "precision": opts.precision,
                  "attention": opts.attention, "opset": opset, "keep": opts.keep, "prune": opts.prune,
                  "seed": opts.seed, "plugins_only": opts.plugins_only, "ops_used": sorted(used),
                  "model_info": info, "processor": processor, "graphs": entries, "reference": "reference.npz",
                  "weights": weights,
                  "report": {"passed": report["passed"], "file": "report.json"} if report else None,
                  "notes": notes}
        manifest = write_manifest(tmp, fields)
    return manifest

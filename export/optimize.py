"""Run vlmx's graph passes on any ONNX model (``vlm-optimize``): what each pass did, per layer, and a numeric check.

:func:`optimize` loads the graph without its weights (:mod:`.large_model`), applies the requested passes in a fixed
order (QKV fusion, attention fusion, quantization, strip function bodies), writes the result with external data
into a temporary directory next to the output, checks it against the input model with ONNX Runtime (polygraphy)
on fresh random inputs with the export contract's thresholds, and only then moves it into place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vlmx.torch_ref.contract import THRESHOLDS
from vlmx.torch_ref.op_table import DOMAIN

from . import large_model
from .functions import attach_functions
from .passes import calibrate, fuse_attention, fuse_qkv, insert_quant, strip_functions
from .passes.cleanup import infer_shapes
from .passes.fuse_attention import ONNX_ATTENTION_OPSET, TARGETS
from .passes.insert_quant import linears
from .report import compare_outputs, run_onnx

MIN_OPSET, MAX_OPSET = 17, 24
#: calibrate() runs on an in-memory copy of the model; protobuf cannot hold more.
CALIB_MAX_BYTES = 1_800_000_000


class OptimizeError(ValueError):
    """A bad input or option; the message says what was wrong and what to do."""


@dataclasses.dataclass
class Options:
    qkv: bool = False
    attention: str | None = None  # None, "vlmx" (FlashAttention) or "onnx" (opset-23 Attention)
    w8a8: bool = False
    static: bool = False  # static Q/DQ from calibration
    calib_feeds: list | None = None  # feeds for static Q/DQ (None: ``calib`` random feeds)
    calib: int = 8
    strip_functions: bool = False
    check: bool = True
    dims: dict = dataclasses.field(default_factory=dict)  # symbolic dim name -> size for the check
    seed: int | None = None  # None: fresh random inputs (the seed used is reported)

    def requested(self) -> list[str]:
        return [n for n, on in (("fuse_qkv", self.qkv), ("fuse_attention", self.attention is not None),
                                ("insert_quant(dynamic)", self.w8a8), ("insert_quant(static)", self.static),
                                ("strip_functions", self.strip_functions)) if on]


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def validate(model: onnx.ModelProto, opts: Options, src: Path) -> None:
    opset = default_opset(model)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptimizeError(f"{src} uses default-domain opset {opset}; vlm-optimize supports opsets "
                            f"{MIN_OPSET}..{MAX_OPSET} (re-export with opset_version in that range)")
    if opts.attention is not None and opts.attention not in TARGETS:
        raise OptimizeError(f"--attention {opts.attention} is not known; choose one of {', '.join(TARGETS)}")
    if opts.attention == "onnx" and opset < ONNX_ATTENTION_OPSET:
        raise OptimizeError(f"--attention onnx needs opset {ONNX_ATTENTION_OPSET} (the standard Attention op); "
                            f"{src} is opset {opset}: re-export with opset_version=23 or use --attention vlmx")
    if opts.w8a8 and opts.static:
        raise OptimizeError("--w8a8 and --static-qdq both quantize the same linears; choose one")
    if not opts.requested():
        raise OptimizeError("no pass requested; give at least one of --qkv, --attention, --w8a8, --static-qdq, "
                            "--strip-functions")


# ------------------------------------------------------------------------------------------------ inputs
def _dims(value_info, dims: dict, axis: int) -> int:
    d = value_info
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.dim_param in dims:
        return int(dims[d.dim_param])
    return 2 if axis == 0 else 6


def random_inputs(model: onnx.ModelProto, rng: np.random.Generator, dims: dict) -> dict:
    """Fresh random inputs for every graph input: floats ~ N(0, 1); ``*mask*`` integer inputs left-padded 0/1
    (every row keeps at least one token); ``*position*`` ranges; other integers below the vocabulary size of the
    Gather they index (2 when none)."""
    inits = {t.name for t in model.graph.initializer}
    vocab = {}
    init_dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in init_dims:
            vocab[n.input[1]] = init_dims[n.input[0]][0]
    feed = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [_dims(d, dims, a) for a, d in enumerate(tt.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        name = i.name.lower()
        if np.issubdtype(dtype, np.floating):
            a = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            a = rng.random(shape) < 0.5
        elif "mask" in name and len(shape) == 2:
            a = np.ones(shape, dtype)
            for r in range(1, shape[0]):  # row 0 unpadded, others left-padded at random
                a[r, : rng.integers(0, shape[1])] = 0
        elif "position" in name:
            a = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            a = rng.integers(0, max(int(vocab.get(i.name, 2)), 1), size=shape).astype(dtype)
        feed[i.name] = a
    return feed


def precision(model: onnx.ModelProto, opts: Options) -> str:
    if opts.w8a8 or opts.static:
        return "w8a8"
    floats = [t.data_type for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                              onnx.TensorProto.FLOAT16)]
    return "fp16" if floats and max(set(floats), key=floats.count) == onnx.TensorProto.FLOAT16 else "fp32"


def numeric_check(src: Path, out: Path, model: onnx.ModelProto, opts: Options) -> dict:
    """Output model vs input model under ONNX Runtime (polygraphy) on fresh random inputs."""
    if opts.strip_functions and any(n.domain == DOMAIN for n in onnx.load(str(out), load_external_data=False)
                                    .graph.node):
        return {"verdict": "not run", "reason": "bare vlmx nodes (function bodies stripped): ONNX Runtime cannot "
                "run them; run the check without --strip-functions"}
    seed = opts.seed if opts.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    feed = random_inputs(model, np.random.default_rng(seed), opts.dims)
    prec = precision(model, opts)
    head = {"precision": prec, "threshold": THRESHOLDS[prec], "seed": seed,
            "inputs": {k: list(v.shape) for k, v in feed.items()}}
    try:
        ref = run_onnx(str(src), feed)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        raise OptimizeError(f"ONNX Runtime cannot run the input model {src} on random inputs "
                            f"({_first_line(e)}); give symbolic sizes with --dim NAME=SIZE or skip with --no-check")
    try:
        got = run_onnx(str(out), feed)
    except Exception as e:  # noqa: BLE001
        return {"verdict": "FAIL", **head, "outputs": {}, "reason": f"ONNX Runtime cannot run the output "
                f"({_first_line(e)})"}
    rows = compare_outputs(got, ref, THRESHOLDS[prec], feed)
    ok = all(r["passed"] for r in rows.values())
    return {"verdict": "PASS" if ok else "FAIL", **head, "outputs": rows}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:200]


# ------------------------------------------------------------------------------------------------ passes
def _linear_rows(graph: gs.Graph, run, mode: str) -> list[dict]:
    before = [(n.name, n.inputs[0].name) for n in linears(graph)]
    run()
    left = {n.name for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)}
    rows = []
    for name, x in before:  # dynamic: the MatMul is gone; static: its weight now comes from DequantizeLinear
        if name in left:
            rows.append({"linear": name, "status": "not matched", "reason": f"input {x!r} was not calibrated"
                         if mode == "static" else "left in float", "at": f"MatMul {name!r}"})
        else:
            rows.append({"linear": name, "status": "fused", "detail": mode})
    return rows


def _calibrate(graph: gs.Graph, model: onnx.ModelProto, opts: Options, feed_model: onnx.ModelProto) -> dict:
    nbytes = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    if nbytes > CALIB_MAX_BYTES:
        raise OptimizeError("--static-qdq calibrates an in-memory copy of the model, which is limited to 1.8 GB; "
                            "use --w8a8 (dynamic) for this model")
    full = _export(graph, model, dataclasses.replace(opts, strip_functions=False))
    for t in full.graph.initializer:
        if large_model._external(t):
            t.CopyFrom(onnx.numpy_helper.from_array(large_model.FileValues(t).load(), t.name))
    if opts.calib_feeds is not None:
        feeds = opts.calib_feeds
    else:
        rng = np.random.default_rng(opts.seed if opts.seed is not None else 12345)
        feeds = [random_inputs(feed_model, rng, opts.dims) for _ in range(opts.calib)]
    return calibrate(full, feeds)


def run_passes(graph: gs.Graph, lazy: dict, store, model: onnx.ModelProto, opts: Options) -> dict:
    """Apply the requested passes; returns ``{pass: rows}``."""
    report = {}

    def step(name, fn):
        rows = []
        fn(rows)
        large_model.release(graph, lazy, store)
        report[name] = rows

    if opts.qkv:
        step("fuse_qkv", lambda rows: fuse_qkv(graph, report=rows))
    if opts.attention is not None:
        step("fuse_attention", lambda rows: fuse_attention(graph, target=opts.attention, report=rows))
    if opts.w8a8:
        step("insert_quant(dynamic)",
             lambda rows: rows.extend(_linear_rows(graph, lambda: insert_quant(graph, "dynamic"), "dynamic")))
    if opts.static:
        amax = _calibrate(graph, model, opts, model)
        step("insert_quant(static)", lambda rows: rows.extend(
            _linear_rows(graph, lambda: insert_quant(graph, "static", amax), "static")))
    if opts.strip_functions:
        bodies = sum(1 for f in graph.functions if f.domain == DOMAIN)
        bare = sum(1 for n in graph.nodes if n.domain == DOMAIN)
        step("strip_functions", lambda rows: (strip_functions(graph), rows.append(
            {"status": "fused" if bare else "not matched", "reason": "the model has no vlmx nodes",
             "at": "model graph", "detail": f"{bare} vlmx nodes left bare ({bodies} input function bodies "
             "removed, none attached)"})))
    graph.cleanup().toposort()
    return report


def _export(graph: gs.Graph, model: onnx.ModelProto, opts: Options) -> onnx.ModelProto:
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.metadata_props.extend(model.metadata_props)
    if any(n.domain == DOMAIN for n in out.graph.node):
        if not any(o.domain == DOMAIN for o in out.opset_import):
            out.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
        if not opts.strip_functions:
            attach_functions(out)
    return out


def optimize(src: Path, dst: Path, opts: Options) -> dict:
    """Optimize ``src`` into ``dst`` (+ ``dst.data``); returns the report. Nothing is written at ``dst`` unless the
    passes ran and the numeric check (when on) passed."""
    src, dst = Path(src), Path(dst)
    model = large_model.load(src)
    validate(model, opts, src)
    if not model.graph.value_info:
        model = infer_shapes(model)  # weightless proto: cheap at any size
    graph, lazy = large_model.import_graph(model)
    made = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    done = False
    try:
        store = large_model.Store(tmp / f"{dst.name}.data")
        passes = run_passes(graph, lazy, store, model, opts)
        out = _export(graph, model, opts)
        large_model.save(out, tmp / dst.name, store)
        report = {"input": str(src), "output": str(dst), "passes": passes,
                  "summary": {p: _count(rows) for p, rows in passes.items()}}
        report["check"] = numeric_check(src, tmp / dst.name, model, opts) if opts.check else \
            {"verdict": "not run", "reason": "--no-check"}
        report["written"] = report["check"]["verdict"] != "FAIL"
        if report["written"]:
            data = dst.with_name(f"{dst.name}.data")
            os.replace(tmp / data.name, data)
            os.replace(tmp / dst.name, dst)
            done = True
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made if not done else []:  # directories this call created, when nothing was written
            with contextlib.suppress(OSError):
                p.rmdir()


def _count(rows: list[dict]) -> dict:
    fused = sum(r["status"] == "fused" for r in rows)
    return {"fused": fused, "not matched": len(rows) - fused}


def format_report(report: dict) -> str:
    """The report as text: one line per layer per pass, a summary per pass, the numeric verdict."""
    lines = [f"vlm-optimize {report['input']} -> {report['output']}"]
    for name, rows in report["passes"].items():
        s = report["summary"][name]
        lines.append(f"{name}: {s['fused']} fused, {s['not matched']} not matched")
        if not rows:
            lines.append("  (no candidate in the graph: nothing for this pass to match)")
        for i, r in enumerate(rows):
            what = r.get("softmax") or r.get("input") or r.get("linear") or ""
            if r["status"] == "fused":
                lines.append(f"  [{i}] fused {what}: {r.get('detail', '')}")
            else:
                lines.append(f"  [{i}] not matched {what}: {r['reason']} (at {r['at']})")
    c = report["check"]
    if c["verdict"] == "not run" or not c.get("outputs"):
        lines.append(f"numeric check: {c['verdict']} ({c['reason']})")
    else:
        worst = max((r["relative"] for r in c["outputs"].values() if r["relative"] is not None), default=float("nan"))
        lines.append(f"numeric check (ONNX Runtime, seed {c['seed']}, {c['precision']} threshold {c['threshold']:g}): "
                     f"{c['verdict']}, worst relative error {worst:.2e}")
    if not report["written"]:
        lines.append(f"{report['output']} NOT written (numeric check failed)")
    return "\n".join(lines)


__all__ = ["Options", "OptimizeError", "format_report", "numeric_check", "optimize", "random_inputs"]

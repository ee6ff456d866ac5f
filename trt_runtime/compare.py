"""``vlm-compare``: polygraphy runs ONNX Runtime (and TensorRT where importable) against the saved torch reference.

The export directory's ``reference.npz`` holds, per graph, the inputs fed to the torch reference and the outputs it
produced (``<graph>.<tensor name>``). Each backend is run by polygraphy's Comparator on exactly those inputs; the
verdict per output is the relative error ‖out − ref‖ / ‖ref‖ against the precision's threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict

import numpy as np

from .artifacts import ArtifactError, load_artifacts

#: Relative-error thresholds per export precision (the accuracy contract of vlm-export).
THRESHOLDS = {"fp32": 1e-5, "fp16": 1e-3, "w8a8": 3e-2}
REFERENCE_RUNNER = "torch-reference"


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64 (0 when both are zero; inf on a shape mismatch or non-finite output)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape or not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(out - ref)
    return float(diff / denom) if denom > 0 else float(diff)


def load_reference(art) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{graph: {"inputs": {...}, "outputs": {...}}}`` from reference.npz, split by the manifest's I/O names."""
    path = art.reference_path
    if path is None or not path.is_file():
        raise ArtifactError(f"{art.root} has no torch reference (reference.npz); re-run vlm-export")
    data = np.load(path)
    refs = {}
    for graph in art.manifest["graphs"]:
        ins = {n: data[f"{graph}.{n}"] for n in art.input_names(graph) if f"{graph}.{n}" in data}
        outs = {n: data[f"{graph}.{n}"] for n in art.output_names(graph) if f"{graph}.{n}" in data}
        if outs and len(ins) == len(art.input_names(graph)):
            refs[graph] = {"inputs": ins, "outputs": outs}
    if not refs:
        raise ArtifactError(f"{path} holds no complete graph reference; re-run vlm-export")
    return refs


def _relative_compare(threshold: float, errors: dict):
    """A polygraphy compare_func judging each output by relative error; records the errors it computed."""

    def compare(run0, run1):
        verdict = OrderedDict()
        for name in run1.keys():
            if name not in run0:
                continue
            err = relative_error(run0[name], run1[name])
            errors[name] = err
            verdict[name] = err <= threshold
        return verdict

    return compare


def tensorrt_importable() -> bool:
    """Whether TensorRT (with polygraphy's TensorRT backend) can run here; says so once when it cannot."""
    try:
        import polygraphy.backend.trt  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        print("vlm-compare: TensorRT is not importable here; comparing ONNX Runtime only", file=sys.stderr)
        return False
    return True


def polygraphy_runners(art, graph: str, with_tensorrt: bool):
    """Polygraphy runners for one graph: ONNX Runtime always, TensorRT when asked and an engine exists."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners = [OnnxrtRunner(SessionFromOnnx(str(art.graph_path(graph)), providers=["CPUExecutionProvider"]),
                            name=f"onnxruntime:{graph}")]
    engine = art.root / "engines" / f"{graph}.plan"
    if with_tensorrt and engine.is_file():
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from .trt_backend import engine_plugin_library, load_plugin_library, read_engines_json
        from .trt_import import import_tensorrt

        lib = engine_plugin_library(engine)
        if lib:  # the vlmx creators must be registered before the plan deserializes
            trt = import_tensorrt((read_engines_json(engine) or {}).get("backend", "auto"))
            load_plugin_library(trt, trt.module.get_plugin_registry(), lib)
        runners.append(TrtRunner(EngineFromBytes(engine.read_bytes()), name=f"tensorrt:{graph}"))
    return runners


def compare(directory, backends=("onnxruntime", "tensorrt"), threshold: float | None = None) -> dict:
    """Run every referenced graph through polygraphy; returns ``{graph: {runner: {output: rel_err}}, passed}``."""
    from polygraphy.comparator import Comparator, IterationResult

    art = load_artifacts(directory)
    precision = art.manifest.get("precision", "fp16")
    thr = THRESHOLDS.get(precision, 1e-3) if threshold is None else threshold
    results, passed = {}, True
    with_tensorrt = "tensorrt" in backends and tensorrt_importable()
    for graph, ref in load_reference(art).items():
        run_results = Comparator.run(polygraphy_runners(art, graph, with_tensorrt), data_loader=[ref["inputs"]])
        run_results.append((REFERENCE_RUNNER, [IterationResult(ref["outputs"], runner_name=REFERENCE_RUNNER)]))
        results[graph] = {}
        ref_index = len(run_results) - 1
        for index, (runner_name, _) in enumerate(list(run_results)[:-1]):
            errors: dict = {}
            acc = Comparator.compare_accuracy(run_results, comparisons=[(index, ref_index)],
                                              compare_func=_relative_compare(thr, errors))
            results[graph][runner_name] = errors
            passed &= bool(acc) and bool(errors)
    return {"precision": precision, "threshold": thr, "graphs": results, "passed": passed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlm-compare", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, help="directory written by vlm-export --out")
    p.add_argument("--threshold", type=float, default=None, help="relative-error threshold (default by precision)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        res = compare(args.artifacts, threshold=args.threshold)
    except ArtifactError as e:
        print(f"vlm-compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for graph, runners in res["graphs"].items():
            for runner, errs in runners.items():
                for name, err in errs.items():
                    flag = "PASS" if err <= res["threshold"] else "FAIL"
                    print(f"{flag} {runner:28s} {name:24s} rel err {err:.3e} (threshold {res['threshold']:.0e})")
        print("vlm-compare:", "PASSED" if res["passed"] else "FAILED")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

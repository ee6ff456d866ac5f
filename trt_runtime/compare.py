"""``vlm-compare``: polygraphy runs ONNX Runtime (and TensorRT where importable) against the saved torch reference.

The export directory's ``reference.npz`` holds, per graph, the inputs fed to the torch reference and the outputs it
produced (``<graph>.<tensor name>``). Each backend is run by polygraphy's Comparator on exactly those inputs; the
verdict per output is the relative error ‖out − ref‖ / ‖ref‖ against the precision's threshold.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import OrderedDict

import numpy as np

from vlmx.torch_ref.contract import THRESHOLDS, relative_error
from vlmx.torch_ref.outdir import run_cli

from .artifacts import ArtifactError, load_artifacts

REFERENCE_RUNNER = "torch-reference"


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


def tensorrt_importable(quiet: bool = False) -> bool:
    """Whether TensorRT (with polygraphy's TensorRT backend) can run here; says so once when it cannot."""
    try:
        import polygraphy.backend.trt  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        if not quiet:
            print("vlm-compare: TensorRT is not importable here; comparing ONNX Runtime only", file=sys.stderr)
        return False
    return True


def check_threshold(value: float) -> float:
    """A relative-error threshold must be a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ArtifactError(f"--threshold {value} must be a finite relative error > 0, e.g. 1e-3")
    return value


@contextlib.contextmanager
def _quiet_polygraphy(verbose: bool):
    """polygraphy logs every runner and comparison (~125 lines); keep only errors unless ``verbose``, and never on
    stdout (``--json`` owns it)."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    if not verbose:
        G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


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


def compare(directory, backends=("onnxruntime", "tensorrt"), threshold: float | None = None, verify: bool = False,
            verbose: bool = False) -> dict:
    """Run every referenced graph through polygraphy; returns ``{graph: {runner: {output: rel_err}}, passed}``."""
    from .ort_backend import PLUGINS_ONLY_REFUSAL

    art = load_artifacts(directory, verify=verify)
    if art.manifest.get("plugins_only"):
        raise ArtifactError(f"{art.root} {PLUGINS_ONLY_REFUSAL}")
    precision = art.manifest["precision"]
    thr = THRESHOLDS[precision] if threshold is None else check_threshold(threshold)
    with _quiet_polygraphy(verbose):
        results, passed = _compare(art, load_reference(art), thr, "tensorrt" in backends and
                                   tensorrt_importable(quiet=not verbose))
    return {"precision": precision, "threshold": thr, "graphs": results, "passed": passed}


def _compare(art, references: dict, thr: float, with_tensorrt: bool):
    from polygraphy.comparator import Comparator, IterationResult

    results, passed = {}, True
    for graph, ref in references.items():
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
    return results, passed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, help="directory written by vlm-export --out")
    p.add_argument("--threshold", type=float, default=None,
                   help="relative-error threshold, a finite number > 0 (default: the export precision's: "
                        + ", ".join(f"{k} {v:g}" for k, v in THRESHOLDS.items()) + ")")
    p.add_argument("--json", action="store_true", help="print only the result as JSON on stdout")
    p.add_argument("--verify", action="store_true", help="re-hash every file of the export (default: size + mtime)")
    p.add_argument("--verbose", action="store_true", help="show polygraphy's log and library warnings")
    return p


def _main(args) -> int:
    try:
        res = compare(args.artifacts, threshold=args.threshold, verify=args.verify, verbose=args.verbose)
    except ArtifactError as e:
        print(f"vlm-compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_finite(res), indent=2, allow_nan=False))
    else:
        for graph, runners in res["graphs"].items():
            for runner, errs in runners.items():
                for name, err in errs.items():
                    flag = "PASS" if err <= res["threshold"] else "FAIL"
                    print(f"{flag} {runner:28s} {name:24s} rel err {err:.3e} (threshold {res['threshold']:.0e})")
        print("vlm-compare:", "PASSED" if res["passed"] else "FAILED")
    return 0 if res["passed"] else 1


def _finite(value):
    """JSON has no inf/nan: a non-finite error (shape mismatch, non-finite output) becomes null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("vlm-compare", lambda: _main(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

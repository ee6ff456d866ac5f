"""The accuracy report of an export: ONNX Runtime (through polygraphy's Python API) vs the torch reference.

Every graph is run by polygraphy's ``OnnxrtRunner`` on the CPU on exactly the inputs the torch reference saw
(``reference.npz``). Per output: max abs error, relative error ‖out − ref‖₂ / ‖ref‖₂, and pass/fail against the
precision's threshold (fp32 ≤ 1e-5, fp16 ≤ 1e-3, w8a8 ≤ 3e-2 relative); integer outputs must match exactly. The
vision tower additionally gets a per-layer error curve (``vision_layer_error.png``).

Float16 graphs run on ONNX Runtime's CPU provider as exported: the vlmx function bodies compute in float32 and the
standard ops the exporter emits for transformers models have CPU float16 kernels in ONNX Runtime ≥ 1.20.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from vlmx.torch_ref.contract import THRESHOLDS, real_tokens, relative_error

__all__ = ["THRESHOLDS", "relative_error", "real_tokens", "build_report", "summary"]


def _session(model_or_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    import onnxruntime

    # ONNX Runtime's C++ warnings (e.g. TensorScatter copying an unbound cache, expected for one-shot reference
    # runs without IOBinding) would print around every verdict; errors still show.
    onnxruntime.set_default_logger_severity(3)

    return OnnxrtRunner(SessionFromOnnx(model_or_path, providers=["CPUExecutionProvider"]))


def run_onnx(path_or_bytes, feed: dict) -> dict:
    """One polygraphy ONNX Runtime run; returns ``{output name: array}``."""
    with _session(path_or_bytes) as runner:
        return dict(runner.infer(feed))


def compare_outputs(outputs: dict, reference: dict, threshold: float, inputs: dict | None = None) -> dict:
    rows = {}
    for name, ref in reference.items():
        out = outputs.get(name)
        masked = False
        if out is not None:
            out, ref, masked = real_tokens(inputs or {}, out, ref)
        if out is None:
            rows[name] = {"max_abs": None, "relative": None, "passed": False, "note": "missing output"}
            continue
        exact = np.issubdtype(np.asarray(ref).dtype, np.integer)
        same_shape = np.shape(out) == np.shape(ref)
        max_abs = float(np.max(np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64)))) \
            if same_shape and np.size(ref) else (0.0 if same_shape else float("inf"))
        rel = relative_error(out, ref)
        passed = (max_abs == 0.0) if exact else rel <= threshold
        rows[name] = {"max_abs": max_abs, "relative": rel, "passed": bool(passed),
                      "criterion": ("exact" if exact else f"relative <= {threshold:g}")
                      + (" (real-token positions)" if masked else "")}
    return rows


def vision_layer_errors(vision_path: Path, vision_module, pixel_values: np.ndarray) -> list[dict]:
    """Relative error per vision encoder layer: ONNX Runtime intermediate vs the torch tower's hidden state."""
    import torch

    model = onnx.load(str(vision_path))
    tower = vision_module.tower
    encoder = getattr(tower, "vision_model", tower).encoder
    layers = getattr(encoder, "layers", None) or encoder.layer  # DINOv2 names its list ``layer``
    scope = next((n for n, m in vision_module.named_modules() if m is layers), None)
    if scope is None:
        return []
    from .exporter import LAYER_OUTPUTS_KEY

    recorded = json.loads(next((p.value for p in model.metadata_props if p.key == LAYER_OUTPUTS_KEY), "{}"))
    names = [recorded.get(f"{scope}.{i}") for i in range(len(layers))]
    present = [(i, n) for i, n in enumerate(names) if n is not None]
    if not present:
        return []
    known = {o.name for o in model.graph.output}
    for _, n in present:
        if n not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    outs = run_onnx(model.SerializeToString(), {"pixel_values": pixel_values})
    with torch.no_grad():
        px = torch.from_numpy(pixel_values).to(next(tower.parameters()).dtype)
        hidden = tower(px, output_hidden_states=True).hidden_states
    return [{"layer": i, "relative": relative_error(outs[n], hidden[i + 1].float().numpy())} for i, n in present]


def plot_layer_errors(rows: list[dict], threshold: float, path: Path, title: str) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    layers = [r["layer"] for r in rows]
    ax.semilogy(layers, [max(r["relative"], 1e-12) for r in rows], "o-", label="ORT vs torch")
    ax.axhline(threshold, color="r", ls="--", label=f"threshold {threshold:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)  # one layer still gets a readable axis
    ax.set_xlabel("vision encoder layer")
    ax.set_ylabel("relative error")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(root: Path, references: dict, precision: str, vision_module=None, about: dict | None = None) -> dict:
    """Compare every graph with a reference; write ``report.json``, ``report.md`` and the vision layer plot.

    ``about``: what was exported (model, attention, target, opset, ...), written at the top of both reports with
    the tool versions and the date."""
    from datetime import datetime, timezone

    from vlmx.torch_ref.contract import versions

    threshold = THRESHOLDS[precision]
    about = {**(about or {}), "precision": precision, "versions": versions(),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    graphs = {}
    for graph, ref in references.items():
        outs = run_onnx(str(root / f"{graph}.onnx"), ref["inputs"])
        graphs[graph] = compare_outputs(outs, ref["outputs"], threshold, ref["inputs"])
    report = {"about": about, "precision": precision, "threshold": threshold, "runtime": "onnxruntime (CPU) via polygraphy",
              "graphs": graphs, "passed": all(r["passed"] for g in graphs.values() for r in g.values())}
    if vision_module is not None and "vision" in references:
        rows = vision_layer_errors(root / "vision.onnx", vision_module, references["vision"]["inputs"]["pixel_values"])
        report["vision_layers"] = rows
        title = f"{about.get('model', 'vision tower')}: vision tower, {precision}, {about.get('attention', '')} attention"
        if plot_layer_errors(rows, threshold, root / "vision_layer_error.png", title.replace(", , ", ", ")):
            report["vision_layer_plot"] = "vision_layer_error.png"
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    about = report.get("about", {})
    model = about.get("model", "export")
    lines = [f"# Accuracy report: {model} ({report['precision']}, threshold {report['threshold']:g} relative)", ""]
    facts = [("model", about.get("model")), ("checkpoint", about.get("checkpoint") or "seeded random weights"),
             ("precision", report["precision"]), ("attention", about.get("attention")),
             ("target", about.get("target")), ("opset", about.get("opset")), ("date", about.get("date")),
             ("versions", ", ".join(f"{k} {v}" for k, v in about.get("versions", {}).items() if v))]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None] + [""]
    lines += [f"Runtime: {report['runtime']}; reference: torch on the same seeded inputs.", "",
             "| graph | output | max abs | relative | criterion | result |", "|---|---|---|---|---|---|"]
    for graph, rows in report["graphs"].items():
        for name, r in rows.items():
            fmt = (lambda v: "n/a" if v is None else f"{v:.3e}")
            lines.append(f"| {graph} | `{name}` | {fmt(r['max_abs'])} | {fmt(r['relative'])} | "
                         f"{r.get('criterion', '')} | {'PASS' if r['passed'] else 'FAIL'} |")
    if report.get("vision_layers"):
        lines += ["", "Vision tower, relative error per encoder layer (`vision_layer_error.png`):", "",
                  "| layer | relative |", "|---|---|"]
        lines += [f"| {r['layer']} | {r['relative']:.3e} |" for r in report["vision_layers"]]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    return "\n".join(lines)


def summary(report: dict) -> str:
    """One line per graph: worst relative error and verdict."""
    lines = []
    for graph, rows in report["graphs"].items():
        worst = max((r["relative"] for r in rows.values() if r["relative"] is not None), default=float("nan"))
        ok = all(r["passed"] for r in rows.values())
        lines.append(f"{'PASS' if ok else 'FAIL'} {graph:8s} worst relative error {worst:.2e} "
                     f"(threshold {report['threshold']:g})")
    lines.append("accuracy: " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)

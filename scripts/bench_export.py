"""Export benchmark: the full-size ``llava`` vision tower (CLIP ViT-L/14-336 + projector) and the Llama-7B-shaped
language model (the one LM graph, ``lm.onnx``: prefill and decode, weights written once) with random float16
weights; wall time, peak RSS and bytes on disk per part.

Each part runs in a fresh child process (peak RSS = the child's VmHWM). Weights are created on the meta device and
materialised directly in float16 (no float32 copy), filled in place, and the exporter streams them to ONNX external
data. ``--layers N`` exports an N-layer slice of the 32-layer LM (same shapes per layer) when the full one does not
fit the time budget; the table then says so and extrapolates linearly in the layer count.

    .venv/bin/python scripts/bench_export.py --parts vision lm --layers 32 --results bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024 ** 3


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def random_model(preset: str, part: str, layers: int | None, seed: int):
    """The preset's LLaVA model in float16, built on the meta device; only the exported part (vision tower +
    projector, or language model + head) is materialised, with random weights filled in place (no float32 copy)."""
    from vlmx.export.weights import random_model as build

    def parts(model):
        return ([model.model.vision_tower, model.model.multi_modal_projector] if part == "vision"
                else [model.model.language_model, model.lm_head])

    return build(preset, seed, parts=parts, text_layers=layers)


def child(part: str, preset: str, layers: int | None, out: Path, seed: int) -> dict:
    import torch

    from vlmx.export.exporter import export_graph, weight_bytes
    from vlmx.export.model_configs import ExportContext, family_for

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    spec, model, parts = random_model(preset, part, layers if part == "lm" else None, seed)
    family = family_for(spec)
    family.prepare(model, "plugin")
    ctx = ExportContext(model, spec, "plugin", torch.float16, seed)
    graph = family.vision_graph(ctx) if part == "vision" else family.lm_graph(ctx)
    exported_weights = sum(weight_bytes(m) for m in parts)
    t1 = time.perf_counter()
    rss_built = current_rss_bytes()
    out.mkdir(parents=True, exist_ok=True)
    path = export_graph(graph, out, max(18, graph.min_opset))
    t2 = time.perf_counter()
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    return {"part": part, "preset": preset, "layers": (spec.text_layers if part == "lm" else spec.vision_layers),
            "graph": graph.name, "file": path.name, "weight_bytes_fp16": exported_weights,
            "build_s": round(t1 - t0, 1), "export_s": round(t2 - t1, 1), "rss_after_build": rss_built,
            "peak_rss": peak_rss_bytes(), "peak_rss_over_weights": round(peak_rss_bytes() / exported_weights, 3),
            "files": files, "external_data": any(n.endswith(".data") for n in files),
            "disk_over_weights": round(sum(files.values()) / exported_weights, 3)}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Export benchmark (random float16 weights, CPU)", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores, Python {platform.python_version()}.", "",
             "| part | layers | fp16 weights | build | export | peak RSS | peak RSS / weights | external data |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} ({r['graph']}.onnx) | {r['layers']} | {r['weight_bytes_fp16'] / GIB:.2f} GiB | "
                     f"{r['build_s']:.1f} s | {r['export_s']:.1f} s | {r['peak_rss'] / GIB:.2f} GiB | "
                     f"{r['peak_rss_over_weights']:.2f}x | {'yes' if r['external_data'] else 'no'} |")
    for r in rows:
        if r.get("extrapolated"):
            e = r["extrapolated"]
            lines += ["", f"Extrapolated to {e['layers']} layers (linear in the layer count from this "
                          f"{r['layers']}-layer slice): fp16 weights {e['weight_bytes_fp16'] / GIB:.2f} GiB, "
                          f"export {e['export_s']:.0f} s, peak RSS {e['peak_rss'] / GIB:.2f} GiB "
                          f"({e['peak_rss_over_weights']:.2f}x)."]
    return "\n".join(lines) + "\n"


def extrapolate(row: dict, small: dict | None, full_layers: int) -> dict | None:
    """Linear fit in the layer count from two slices (or one slice and its per-layer share)."""
    if row["layers"] >= full_layers or small is None or small["layers"] == row["layers"]:
        return None
    dl = row["layers"] - small["layers"]
    per_layer = {k: (row[k] - small[k]) / dl for k in ("weight_bytes_fp16", "export_s", "peak_rss")}
    est = {k: row[k] + per_layer[k] * (full_layers - row["layers"]) for k in per_layer}
    est["layers"] = full_layers
    est["peak_rss_over_weights"] = round(est["peak_rss"] / est["weight_bytes_fp16"], 3)
    return est


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["vision", "lm"], choices=["vision", "lm"])
    p.add_argument("--preset", default="llava")
    p.add_argument("--layers", type=int, nargs="+", default=[32], help="LM layer counts to export (e.g. 4 8)")
    p.add_argument("--out", default="build/bench_export")
    p.add_argument("--results", default=None, help="write export_bench.json/.md here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        part, layers = args.child.split(":")
        row = child(part, args.preset, int(layers) or None, Path(args.out), args.seed)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    jobs = [("vision", 0)] if "vision" in args.parts else []
    jobs += [("lm", n) for n in args.layers] if "lm" in args.parts else []
    for part, layers in jobs:
        out = Path(args.out) / f"{part}-{layers}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child", f"{part}:{layers}", "--preset", args.preset, "--out", str(out),
               "--seed", str(args.seed)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            print(f"bench_export: {part} ({layers} layers) failed with status {proc.returncode}", file=sys.stderr)
            return 1
        row = json.loads(line[len("RESULT "):])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{part:6s} layers={row['layers']:3d} weights {row['weight_bytes_fp16'] / GIB:6.2f} GiB  export "
              f"{row['export_s']:6.1f} s  peak RSS {row['peak_rss'] / GIB:6.2f} GiB "
              f"({row['peak_rss_over_weights']:.2f}x)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    lm_rows = sorted((r for r in rows if r["part"] == "lm"), key=lambda r: r["layers"])
    if len(lm_rows) >= 2:
        from vlmx.torch_ref import models

        full = models.get_preset(args.preset).text_layers
        lm_rows[-1]["extrapolated"] = extrapolate(lm_rows[-1], lm_rows[0], full)
    command = "python scripts/bench_export.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.results:
        res = Path(args.results)
        res.mkdir(parents=True, exist_ok=True)
        (res / "export_bench.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        (res / "export_bench.md").write_text(markdown(rows, command))
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

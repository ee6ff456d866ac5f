"""GPU check of ``vlm-run --backend torch`` loading the EXPORTED weights (issue 17 item 3, issue 14 item 2; run on
the GPU machine; writes to $OUT).

Exports llava-tiny in fp32, fp16 and w8a8 (and llava-siglip-tiny / llava-mpt-tiny in w8a8), then per export: the
relative error of every graph output of the torch backend vs ONNX Runtime on the export's reference inputs, the
greedy tokens of both backends on one image and prompt, and which vlmx kernels the torch backend registered (fp16
and w8a8 on a GPU: our CUDA flash attention / W8A8 GEMM / Triton quantization kernels). On a CPU it is a dry run
(the reference kernels).

    python scripts/gpu_torch_backend_check.py            # results in $OUT/torch_backend_check.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlmx.export.cli import main as export_main
from vlmx.torch_ref.contract import relative_error, threshold_for
from vlmx.trt_runtime.artifacts import load_artifacts
from vlmx.trt_runtime.pipeline import VLMPipeline
from vlmx.trt_runtime.runner import graph_runners

OUT = Path(os.environ.get("OUT", "build/gpu_torch_backend_check"))
PROMPT = "What is shown in this picture?"
CASES = [("llava-tiny", "fp32"), ("llava-tiny", "fp16"), ("llava-tiny", "w8a8"), ("llava-siglip-tiny", "w8a8"),
         ("llava-mpt-tiny", "w8a8")]


def graph_errors(export: Path) -> dict:
    art = load_artifacts(export)
    ref = np.load(export / "reference.npz")
    torch_r, ort_r = graph_runners("torch", art), graph_runners("onnxruntime", art)
    errors = {}
    for g in art.manifest["graphs"]:
        feed = {n: ref[f"{g}.{n}"] for n in art.input_names(g)}
        a, b = torch_r[g].activate().infer(feed), ort_r[g].activate().infer(feed)
        for n in art.output_names(g):
            errors[f"{g}.{n}"] = relative_error(a[n].float().cpu().numpy(), np.asarray(b[n], np.float32))
    return errors


def main() -> int:
    from vlmx.trt_runtime import torch_kernels

    OUT.mkdir(parents=True, exist_ok=True)
    image = OUT / "image.png"
    Image.fromarray((np.random.default_rng(0).random((90, 70, 3)) * 255).astype(np.uint8)).save(image)
    results = {}
    for preset, precision in CASES:
        export = OUT / f"{preset}-{precision}"
        if not export.exists():
            assert export_main(["--model", preset, "--precision", precision, "--out", str(export),
                                "--quiet"]) in (0, 3)
        row = {"graph_errors": graph_errors(export), "threshold": threshold_for(precision)}
        row["within_threshold"] = max(row["graph_errors"].values()) <= row["threshold"]
        for backend in ("onnxruntime", "torch"):
            with VLMPipeline(export, backend=backend) as pipe:
                row[backend] = pipe.generate(image, PROMPT, keep=0.5, max_new_tokens=8).tokens
        row["tokens_agree"] = row["onnxruntime"] == row["torch"]
        row["kernels"] = {k: str(v) for k, v in torch_kernels._STATE.items()}
        results[f"{preset}-{precision}"] = row
        print(preset, precision, json.dumps({k: v for k, v in row.items() if k != "graph_errors"}),
              f"max graph error {max(row['graph_errors'].values()):.2e}")
    (OUT / "torch_backend_check.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU check of ``vlm-run --backend torch`` after issue 10 (run on the GPU machine; writes to $OUT).

The torch backend now runs the export in its own precision and refuses what it cannot reproduce. This exports
llava-tiny in fp16 and fp32, runs each with --backend torch and --backend onnxruntime on the same image and prompt,
and prints both token lists (they should agree; fp16 uses the vlmx CUDA kernels, fp32 the reference kernels on the
GPU). On a machine without a GPU the fp16 run must be refused with one clear line (dry run).

    python scripts/gpu_torch_backend_check.py            # results in $OUT/torch_backend_check.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlmx.export.cli import main as export_main
from vlmx.trt_runtime.pipeline import VLMPipeline
from vlmx.trt_runtime.torch_backend import NotReproducible

OUT = Path(os.environ.get("OUT", "build/gpu_torch_backend_check"))
PROMPT = "What is shown in this picture?"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    image = OUT / "image.png"
    Image.fromarray((np.random.default_rng(0).random((90, 70, 3)) * 255).astype(np.uint8)).save(image)
    results = {}
    for precision in ("fp32", "fp16"):
        export = OUT / f"llava-tiny-{precision}"
        if not export.exists():
            assert export_main(["--model", "llava-tiny", "--precision", precision, "--out", str(export),
                                "--quiet"]) in (0, 3)
        row = {}
        for backend in ("onnxruntime", "torch"):
            try:
                with VLMPipeline(export, backend=backend) as pipe:
                    row[backend] = pipe.generate(image, PROMPT, keep=0.5, max_new_tokens=8).tokens
            except NotReproducible as e:
                row[backend] = f"refused: {e}"
        row["agree"] = row["onnxruntime"] == row["torch"]
        results[precision] = row
        print(precision, json.dumps(row))
    (OUT / "torch_backend_check.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

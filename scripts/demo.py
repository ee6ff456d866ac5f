"""`make demo`: the main job on the tiny embedded default.

1. ``vlm-export --model llava-tiny --target trt-sm75 --out build/demo --overwrite`` (ONNX files, manifest, torch
   reference, accuracy report; its summary is printed);
2. ``vlm-run`` on a synthetic image with ONNX Runtime at keep 1.0 and 0.25 (text, kept tokens, timing breakdown).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vlmx.export.cli import main as export_main
from vlmx.trt_runtime.run_cli import main as run_main

OUT = Path("build/demo")


def synthetic_image(path: Path) -> Path:
    """A smooth colour gradient with a bright square: something for the vision tower to look at."""
    y, x = np.mgrid[0:224, 0:224] / 223.0
    img = np.stack([x, y, 1 - x * y], axis=-1)
    img[80:150, 60:130] = (1.0, 0.9, 0.1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


if __name__ == "__main__":
    rc = export_main(["--model", "llava-tiny", "--target", "trt-sm75", "--out", str(OUT), "--overwrite"])
    if rc:
        sys.exit(rc)
    image = synthetic_image(OUT.parent / "demo_image.png")
    for keep in ("1.0", "0.25"):
        print(f"\nvlm-run --artifacts {OUT} --image {image} --prompt 'What is in the picture?' --keep {keep}")
        rc = run_main(["--artifacts", str(OUT), "--image", str(image), "--prompt", "What is in the picture?",
                       "--keep", keep, "--max-new-tokens", "12"])
        if rc:
            sys.exit(rc)

#!/usr/bin/env python3
"""Run a vlmx command or script with preset BASE cut to N language-model layers, registered as ``BASE-Nl``.

For measurements whose device budget cannot hold a full 7B export (the 32-layer LLaVA-1.5-7B LM takes ~7 min to
export): same widths, heads, vocabulary and vision tower, fewer layers. Per-layer decode cost, the weight-read
floor ratio and the memory plan are measured the same way; every process that opens the export needs the
variant registered, so export and run both go through this wrapper:

    python scripts/depth_variant.py llava 8 vlmx.apps.export_cli --model llava-8l --precision fp16 --out DIR
    python scripts/depth_variant.py llava 8 scripts/bench_decode.py --artifacts DIR --backend torch --out OUT
"""
from __future__ import annotations

import dataclasses
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 4 or not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
        sys.exit("usage: depth_variant.py BASE_PRESET LAYERS MODULE_OR_SCRIPT [ARGS...]")
    from vlmx.torch_ref import models

    base, layers, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        spec = models.get_preset(base)
    except models.PresetError as e:
        sys.exit(f"depth_variant.py: {e}")
    name = f"{base}-{layers}l"
    models.PRESETS[name] = dataclasses.replace(spec, name=name, text_layers=layers)
    sys.argv = [target, *sys.argv[4:]]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

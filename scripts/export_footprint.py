#!/usr/bin/env python3
"""Disk and peak-RSS footprint of an export against the model's fp16 weight bytes (JSON on stdout).

    /usr/bin/time -v vlm-export --model llava --out DIR ... 2>TIME.txt
    python scripts/export_footprint.py DIR TIME.txt > footprint.json

The LM graph is written once: ``lm_disk_ratio`` ~1.0 for fp16 (~0.5 for W8A8); ``rss_ratio`` is peak RSS of the
export process over the whole model's fp16 bytes (goal ≤ 1.3).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def footprint(export_dir: Path, time_log: Path) -> dict:
    from vlmx.export.weights import meta_model

    m = json.loads((export_dir / "manifest.json").read_text())
    t = time_log.read_text()
    lm = sum(int(v["bytes"]) for k, v in m["files"].items() if k.startswith("lm.onnx"))
    total = sum(int(v["bytes"]) for v in m["files"].values())
    _, model = meta_model(m["model"])
    lm_fp16 = sum(p.numel() * 2 for n, p in model.named_parameters()
                  if "vision_tower" not in n and "multi_modal_projector" not in n)
    all_fp16 = sum(p.numel() * 2 for p in model.parameters())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
    return {"command": re.search(r'Command being timed: "(.*)"', t).group(1), "model": m["model"],
            "precision": m.get("precision"), "wall": wall, "peak_rss_bytes": rss, "model_fp16_bytes": all_fp16,
            "lm_fp16_bytes": lm_fp16, "lm_onnx_bytes": lm, "export_bytes": total,
            "lm_disk_ratio": round(lm / lm_fp16, 4), "disk_ratio": round(total / all_fp16, 4),
            "rss_ratio": round(rss / all_fp16, 4), "graphs": sorted(m["graphs"])}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: export_footprint.py EXPORT_DIR TIME_V_LOG")
    print(json.dumps(footprint(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))

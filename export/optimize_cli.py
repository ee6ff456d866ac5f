"""``vlm-optimize IN.onnx OUT.onnx``: run vlmx's graph passes on any ONNX model and say what each one changed.

Passes (any combination, applied in this order): ``--qkv`` (fuse Q/K/V projections), ``--attention vlmx|onnx``
(fuse attention into vlmx FlashAttention or the standard opset-23 Attention), ``--w8a8`` (dynamic W8A8 linears) or
``--static-qdq`` (Q/DQ from calibration: ``--calib N`` random feeds or ``--calib-data a.npz ...``),
``--strip-functions`` (bare vlmx nodes). The output gets its weights in ``OUT.onnx.data``; models of any size are
read one initializer at a time. Last step: ONNX Runtime runs both models on fresh random inputs and the verdict
uses the export contract's thresholds. Exit status: 0 ok; 1 numeric check failed (nothing written) or, with
``--strict``, a requested pass matched nothing; 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .large_model import ModelError
from .optimize import Options, OptimizeError, format_report, optimize
from .passes.fuse_attention import TARGETS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-optimize", description=__doc__.splitlines()[0])
    p.add_argument("input", help="input .onnx model (external data next to it is found)")
    p.add_argument("output", help="output .onnx model (weights go to OUTPUT.data)")
    p.add_argument("--qkv", action="store_true", help="fuse each tensor's >=3 projections into one MatMul + Split")
    p.add_argument("--attention", default=None, metavar="TARGET",
                   help=f"fuse attention cores: {' or '.join(TARGETS)} "
                        "(vlmx FlashAttention / ONNX Attention, opset>=23)")
    p.add_argument("--w8a8", action="store_true", help="quantize linears to vlmx W8A8Linear (dynamic per-token)")
    p.add_argument("--static-qdq", action="store_true", help="quantize linears to Q/DQ with calibrated scales")
    p.add_argument("--calib", type=int, default=8, help="--static-qdq: number of random calibration feeds")
    p.add_argument("--calib-data", nargs="+", default=None, metavar="NPZ",
                   help="--static-qdq: .npz files, one feed each (arrays keyed by input name)")
    p.add_argument("--strip-functions", action="store_true", help="remove the vlmx function bodies")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic input dim for the check (default: 2 for axis 0, 6 otherwise)")
    p.add_argument("--seed", type=int, default=None, help="seed of the check's random inputs (default: fresh)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime numeric check")
    p.add_argument("--strict", action="store_true", help="exit 1 when a requested pass matched nothing")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    return p


def _options(args) -> Options:
    dims = {}
    for d in args.dim:
        name, _, size = d.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise OptimizeError(f"--dim {d} is not NAME=SIZE with a positive SIZE (e.g. --dim seq=16)")
        dims[name] = int(size)
    if args.calib < 1:
        raise OptimizeError(f"--calib {args.calib} must be at least 1")
    feeds = None
    if args.calib_data:
        if not args.static_qdq:
            raise OptimizeError("--calib-data only applies with --static-qdq")
        import numpy as np

        feeds = []
        for f in args.calib_data:
            try:
                with np.load(f) as z:
                    feeds.append({k: z[k] for k in z.files})
            except (OSError, ValueError) as e:
                raise OptimizeError(f"--calib-data {f} is not a readable .npz file ({e})") from None
    return Options(qkv=args.qkv, attention=args.attention, w8a8=args.w8a8, static=args.static_qdq,
                   calib_feeds=feeds, calib=args.calib, strip_functions=args.strip_functions,
                   check=not args.no_check, dims=dims, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        opts = _options(args)
        src, dst = Path(args.input), Path(args.output)
        if dst.suffix != ".onnx":
            raise OptimizeError(f"output {dst} must end in .onnx (its weights go to {dst.name}.data)")
        if src.resolve() == dst.resolve():
            raise OptimizeError("output is the input; write to another path")
        if dst.exists() and not args.overwrite:
            raise OptimizeError(f"output {dst} exists; pass --overwrite to replace it")
        if args.report and Path(args.report).is_dir():
            raise OptimizeError(f"--report {args.report} is a directory; give a .json file path")
        report = optimize(src, dst, opts)
    except (OptimizeError, ModelError) as e:
        print(f"vlm-optimize: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"vlm-optimize: error: cannot write {args.output}: {e.strerror or e}; check the path, its "
              "permissions and free disk space", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
    status = 0 if report["written"] else 1
    empty = [p for p, s in report["summary"].items() if s["fused"] == 0]
    if empty:
        print(f"warning: {', '.join(empty)} matched nothing", file=sys.stderr)
        if args.strict:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

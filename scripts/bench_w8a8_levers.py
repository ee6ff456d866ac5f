"""Cheap levers on SmolLM2-135M W8A8 perplexity (CPU), on top of SmoothQuant: keep the last layers' down_proj float,
keep the N worst calibrated linears float, clip the weight scales (per output channel, the clip ratio with the
least weight MSE), and their combination. Same evaluation and calibration as scripts/bench_w8a8_real.py (whose
``smollm2`` rows these extend), perplexity only (no greedy continuations: the shared CPU is slow).

    .venv/bin/python scripts/bench_w8a8_levers.py --results bench/results     # writes w8a8_levers.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

from vlmx.torch_ref import lm_w8a8, real_weights

_spec = importlib.util.spec_from_file_location("bench_w8a8_real", Path(__file__).with_name("bench_w8a8_real.py"))
real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real)

CLIP_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8, 0.75, 0.7)


@torch.no_grad()
def clip_weights(model, include) -> int:
    """Clamp each included linear's rows to ``r · max|row|`` with the ratio r (of :data:`CLIP_RATIOS`) whose int8
    round trip has the least squared error; returns how many rows were clipped. Quantizing the clamped weight is
    exactly quantizing with the clipped scale."""
    clipped = 0
    for name, lin in model.named_modules():
        if not isinstance(lin, torch.nn.Linear) or not include(name):
            continue
        w = lin.weight.float()
        amax = w.abs().amax(1, keepdim=True).clamp_min(1e-8)
        best_err, best_r = None, None
        for r in CLIP_RATIOS:
            s = amax * r / 127
            q = (w / s).round().clamp(-127, 127) * s
            err = (q - w).pow(2).sum(1, keepdim=True)
            if best_err is None:
                best_err, best_r = err, torch.full_like(err, r)
            else:
                better = err < best_err
                best_err, best_r = torch.where(better, err, best_err), torch.where(better, r, best_r)
        clipped += int((best_r < 1).sum())
        lin.weight.copy_(torch.maximum(torch.minimum(w, amax * best_r), -amax * best_r).to(lin.weight.dtype))
    return clipped


@torch.no_grad()
def perplexity(model, ids) -> float:
    nll, count = 0.0, 0
    for row in ids:
        logits = model(row[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=2)
    p.add_argument("--calib-len", type=int, default=256)
    args = p.parse_args(argv)
    if why := real_weights.available("smollm2"):
        print(f"bench_w8a8_levers: {why}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    tok = real_weights.load_smollm2_tokenizer()
    fp32 = real_weights.load_smollm2(torch.float32)
    ids = real.eval_windows(tok, args.window, args.windows)
    calib = lm_w8a8.calibration_ids(tok, seq_len=args.calib_len, num_seqs=args.calib_seqs)
    t0 = time.time()
    fp16 = copy.deepcopy(fp32)
    real.to_fp16_weights(fp16)
    rows = {"fp16": {"perplexity": perplexity(fp16, ids), "seconds": time.time() - t0}}
    del fp16
    print("fp16", rows["fp16"], flush=True)
    t0 = time.time()
    smoothed = copy.deepcopy(fp32)
    plan = lm_w8a8.calibrate(smoothed, calib)
    real.to_fp16_weights(smoothed)
    calib_s = time.time() - t0
    print(f"calibrated in {calib_s:.0f} s", flush=True)
    layers = len(lm_w8a8.decoder_parts(smoothed)[1])
    worst = [k for k, _ in sorted(plan.errors.items(), key=lambda kv: kv[1], reverse=True)]
    in_layers = lambda n: n.startswith("model.layers.")  # noqa: E731
    variants = {
        "w8a8 smoothquant": ([], False),
        "+ down_proj of the last 3 layers float": ([f"model.layers.{i}.mlp.down_proj"
                                                     for i in range(layers - 3, layers)], False),
        "+ down_proj of the last 6 layers float": ([f"model.layers.{i}.mlp.down_proj"
                                                     for i in range(layers - 6, layers)], False),
        "+ 6 worst calibrated linears float": (worst[:6], False),
        "+ weight clipping (per-row MSE ratio)": ([], True),
        "+ weight clipping + down_proj of the last 3 layers float": ([f"model.layers.{i}.mlp.down_proj"
                                                                      for i in range(layers - 3, layers)], True),
    }
    for name, (skip, clip) in variants.items():
        t0 = time.time()
        model = copy.deepcopy(smoothed)
        clipped = clip_weights(model, lambda n: in_layers(n) and n not in skip) if clip else 0
        swapped = lm_w8a8.quantize_linears(model, skip, include=in_layers)
        rows[name] = {"perplexity": perplexity(model, ids), "skip": skip, "quantized": len(swapped),
                      "rows_clipped": clipped, "seconds": time.time() - t0}
        print(name, rows[name]["perplexity"], flush=True)
        del model
    base = rows["fp16"]["perplexity"]
    for r in rows.values():
        r["ppl_vs_fp16"] = r["perplexity"] / base - 1
    cmd = "python scripts/bench_w8a8_levers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": cmd, "torch": torch.__version__, "eval": {"windows": args.windows, "window": args.window},
           "calibration": {"seqs": args.calib_seqs, "len": args.calib_len, "seconds": calib_s}, "rows": rows}
    lines = ["# SmolLM2-135M W8A8: levers on top of SmoothQuant (CPU, perplexity only)", "", f"Command: `{cmd}`", "",
             f"{args.windows} × {args.window} evaluation tokens, calibration {args.calib_seqs} × {args.calib_len} "
             "(as w8a8_real.md); lm_head float in every W8A8 row (the export's default).", "",
             "| variant | perplexity | vs fp16 | float linears | clipped rows |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['perplexity']:.4f} | {100 * r['ppl_vs_fp16']:+.2f}% | "
                     f"{len(r.get('skip', []))} | {r.get('rows_clipped', '-')} |")
    print("\n".join(lines))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "w8a8_levers.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.results / "w8a8_levers.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

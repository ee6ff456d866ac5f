#!/usr/bin/env python3
"""Accuracy of visual-token pruning on the synthetic VQA test split, through exported graphs (ONNX Runtime).

For each test question: the vision graph once per image, then for every method and keep ratio the prune graph
keeps ``k`` of the 144 visual tokens and the ``lm`` graph (one prefill over the pipeline's KV-cache binding, one
batch row per method) gives the first reply token's logits; the prediction is the best of the question kind's
answer words by their first token's logit (closed-set, so chance is 1/|answers| per kind). Prompts, images and
answer tokens go through the export's own processor (chat template, image processor, tokenizer), as in vlm-run.

Methods: ``text`` (the score graph: LM layer-0 text queries vs visual keys, ``--prune text``), ``cls`` (the vision
tower's [CLS] attention, ``--prune cls``), ``random`` (seeded random drop) and ``uniform`` (a spatially uniform
lattice of ``k`` tokens). All four feed their scores to the same prune graph (GatherTopK), so only the scores differ.
Several exports (``--export fp32=DIR --export w8a8=DIR``) are compared side by side.

    python scripts/eval_pruning.py --export fp32=build/micro-fp32 --test-images 40
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vlmx.torch_ref.keep_rule import keep_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_vqa  # noqa: E402

KEEPS = (1.0, 0.5, 0.33, 0.25, 0.11)
METHODS = ("text", "cls", "random", "uniform")
#: The bar of the issue: text and cls keep >= 95 % of full accuracy at 25 % of the tokens, and beat random drop.
BAR_KEEP, BAR_SHARE = 0.25, 0.95


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def uniform_scores(side: int, k: int) -> np.ndarray:
    """Scores [side*side] that are 1 on a spatially uniform lattice of exactly ``k`` tokens, 0 elsewhere."""
    g = int(np.ceil(np.sqrt(k)))
    rows = np.floor((np.arange(g) + 0.5) * side / g).astype(int)
    pts = sorted({r * side + c for r in rows for c in rows})
    chosen = np.asarray(pts)[np.round(np.linspace(0, len(pts) - 1, k)).astype(int)] if len(pts) > k else pts
    s = np.zeros(side * side, dtype=np.float32)
    s[np.asarray(chosen)] = 1.0
    if int(s.sum()) < k:  # tiny lattices: fill with evenly spaced extra tokens
        rest = np.flatnonzero(s == 0)
        s[rest[np.round(np.linspace(0, len(rest) - 1, k - int(s.sum()))).astype(int)]] = 1.0
    return s


class Evaluator:
    """One export's graphs, run through :class:`~vlmx.trt_runtime.pipeline.VLMPipeline`'s runners, image processor
    and chat template; the LM step is the pipeline's one ``lm`` graph (prefill over a fresh KV cache)."""

    def __init__(self, export: Path, backend: str):
        from vlmx.trt_runtime.pipeline import VLMPipeline

        self.pipe = VLMPipeline(export, backend=backend, prune="text")
        self.runners = self.pipe.runners
        self.preset = self.pipe.preset
        self.has_cls = "cls_attention" in self.pipe.artifacts.output_names("vision")
        tok = self.pipe.processor.tokenizer
        # the reply starts right after the chat template's generation prompt: no leading space
        self.first_token = {w: int(tok.encode(w, add_special_tokens=False)[0])
                            for ws in make_vqa.ANSWERS.values() for w in ws}
        self._batch = 0

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.pipe._embed(ids))

    def vision(self, image: np.ndarray) -> dict:
        out = self.runners["vision"].infer({"pixel_values": self.pipe.preprocess(image)})
        return {k: np.asarray(v) for k, v in out.items()}

    def scores(self, method: str, vis: dict, text: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        n = vis["image_features"].shape[1]
        if method == "text":
            out = self.runners["score"].infer({"text_embeds": text, "image_features": vis["image_features"]})
            return np.asarray(out["scores"])
        if method == "cls":
            return vis["cls_attention"]
        if method == "random":
            return rng.random((1, n)).astype(np.float32)
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise ValueError(f"uniform needs a square token grid, got {n} tokens")
        return uniform_scores(side, k)[None]

    def prefill_logits(self, embeds: np.ndarray) -> np.ndarray:
        """Last-position logits [B, vocab] of a prefill of ``embeds`` [B, n, C] (the pipeline's KV-cache binding,
        for B rows of one length)."""
        b, n = embeds.shape[:2]
        if self._batch != b or not self.pipe.lm.bound:
            self.pipe.lm.unbind()
            self._mask = self.pipe._bind_lm(batch=b)["mask"]
            self._batch = b
        out = self.pipe.lm.infer({"inputs_embeds": embeds, "attention_mask": self._mask[:, :n]})
        return np.asarray(out["logits"])[:, -1]

    def answer_logits(self, vis, prefix_emb, suffix_emb, scores: list[np.ndarray], k: int):
        """Last-position logits ``[len(scores), vocab]`` and kept indices, one prefill batch for all score rows
        (equal lengths: every row keeps ``k`` tokens)."""
        rows, kept = [], []
        for sc in scores:
            pr = self.runners["prune"].infer({"image_features": vis["image_features"],
                                             "scores": np.asarray(sc, np.float32), "keep": np.asarray([k], np.int64)})
            feats = np.asarray(pr["kept_features"]).astype(prefix_emb.dtype)
            rows.append(np.concatenate([prefix_emb, feats, suffix_emb], 1))
            kept.append(np.asarray(pr["kept_index"]))
        return self.prefill_logits(np.concatenate(rows, axis=0)), kept

    def predict(self, logits: np.ndarray, kind: str) -> str:
        words = make_vqa.ANSWERS[kind]
        return words[int(np.argmax([logits[self.first_token[w]] for w in words]))]


def evaluate(ev: Evaluator, images, questions, keeps, methods, seed: int, check: bool) -> dict:
    hits = {(m, kp): [] for m in methods for kp in keeps}
    kinds = []
    vis_cache: dict[int, dict] = {}
    t0 = time.time()
    for qi, q in enumerate(questions):
        if q.image not in vis_cache:
            vis_cache.clear()
            vis_cache[q.image] = ev.vision(images[q.image])
        vis = vis_cache[q.image]
        prefix, suffix = ev.pipe.prompt_ids(q.question)
        pe, se = ev.embed(prefix), ev.embed(suffix)
        text = np.concatenate([pe, se], axis=1)
        n = vis["image_features"].shape[1]
        kinds.append(q.kind)
        for kp in keeps:
            k = keep_count(n, kp)
            todo = methods[:1] if k == n else methods  # keeping every token: all methods are the same prefill
            rng = np.random.default_rng([seed, qi, k])
            logits, _ = ev.answer_logits(vis, pe, se, [ev.scores(m, vis, text, k, rng) for m in todo], k)
            oks = [ev.predict(row, q.kind) == q.answer for row in logits]
            for i, m in enumerate(methods):
                hits[(m, kp)].append(oks[i if k < n else 0])
        if check and qi == 0:
            _check_against_pipeline(ev, images[q.image], q.question, keeps, methods, vis, text)
        if (qi + 1) % 20 == 0:
            print(f"  {qi + 1}/{len(questions)} questions ({time.time() - t0:.0f} s)", flush=True)
    table = {}
    for (m, kp), v in hits.items():
        per = {k: float(np.mean([x for x, kk in zip(v, kinds) if kk == k])) for k in make_vqa.KINDS if k in kinds}
        table[f"{m}@{kp}"] = {"method": m, "keep": kp, "tokens": keep_count(n, kp), "accuracy": float(np.mean(v)),
                              "per_kind": per}
    return table


def _check_against_pipeline(ev: Evaluator, image, prompt, keeps, methods, vis, text):
    """``text`` and ``cls`` keep the tokens ``VLMPipeline.generate`` keeps, and the best token of these logits is
    the token it generates first (same graphs, same prompt, same cache binding)."""
    from vlmx.trt_runtime.pipeline import VLMPipeline

    n = vis["image_features"].shape[1]
    split = ev.pipe.prompt_ids(prompt)[0].shape[0]
    for m in ("text", "cls"):
        if m not in methods or (m == "cls" and not ev.has_cls):
            continue
        kp = min(keeps)
        pipe = ev.pipe if m == "text" else VLMPipeline(ev.pipe.artifacts, backend=ev.pipe.backend, prune="cls")
        got = pipe.generate(image, prompt, keep=kp, max_new_tokens=1)
        k = keep_count(n, kp)
        logits, mine = ev.answer_logits(vis, text[:, :split], text[:, split:], [ev.scores(m, vis, text, k, None)], k)
        if not np.array_equal(np.asarray(got.kept_index).ravel(), mine[0].ravel()):
            raise AssertionError(f"{m}: kept tokens differ from VLMPipeline.generate")
        if int(np.argmax(logits[0])) != got.tokens[0]:
            raise AssertionError(f"{m}: first token {int(np.argmax(logits[0]))} differs from VLMPipeline.generate's "
                                 f"{got.tokens[0]}")
        if pipe is not ev.pipe:
            pipe.close()
    print(f"  check: kept tokens and first token equal VLMPipeline.generate's (keep {min(keeps)})", flush=True)


def write_results(out: Path, results: dict, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    chance = ", ".join(f"{k} {v:.2f}" for k, v in meta["chance"].items() if k != "all")
    lines = [f"# Visual-token pruning accuracy: {meta['preset']} on the synthetic VQA test split", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['questions']} questions on {meta['images']} images (seed {meta['vqa_seed']}); closed-set "
             f"accuracy, chance {meta['chance']['all']:.3f} ({chance}); backend {meta['backend']}; "
             f"{meta['elapsed_s']:.0f} s.", ""]
    bars = []
    for name, table in results.items():
        keeps = sorted({r["keep"] for r in table.values()}, reverse=True)
        methods = list(dict.fromkeys(r["method"] for r in table.values()))
        toks = {kp: next(r["tokens"] for r in table.values() if r["keep"] == kp) for kp in keeps}
        lines += [f"## {name}", "", "| method | " + " | ".join(f"{kp:g} ({toks[kp]} tok)" for kp in keeps) + " |",
                  "|---|" + "---|" * len(keeps)]
        for m in methods:
            full = table[f"{m}@{keeps[0]}"]["accuracy"]
            cells = [f"{table[f'{m}@{kp}']['accuracy']:.3f}" + (f" ({table[f'{m}@{kp}']['accuracy'] / full:.0%})"
                                                                 if full and kp != keeps[0] else "") for kp in keeps]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        for m in ("text", "cls"):
            if f"{m}@{BAR_KEEP}" not in table or f"random@{BAR_KEEP}" not in table:
                continue
            full = table[f"{m}@{keeps[0]}"]["accuracy"]
            share = table[f"{m}@{BAR_KEEP}"]["accuracy"] / full if full else 0.0
            lose = [kp for kp in keeps[1:] if table[f"{m}@{kp}"]["accuracy"] <= table[f"random@{kp}"]["accuracy"]]
            bars.append(f"- {name} {m}: {share:.1%} of full accuracy at keep {BAR_KEEP} "
                        f"({'meets' if share >= BAR_SHARE else 'MISSES'} the {BAR_SHARE:.0%} bar); "
                        + ("beats random drop at every budget" if not lose else
                           f"does NOT beat random drop at keep {', '.join(f'{k:g}' for k in lose)}"))
        lines += ["Per kind (accuracy at each keep):", "",
                  "| method@keep | " + " | ".join(make_vqa.KINDS) + " |", "|---|" + "---|" * len(make_vqa.KINDS)]
        for key, r in table.items():
            cells = " | ".join(f"{r['per_kind'].get(k, float('nan')):.2f}" for k in make_vqa.KINDS)
            lines.append(f"| {key} | {cells} |")
        lines.append("")
    lines += ["## Against the bar", ""] + bars + [""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot written")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, table in results.items():
        for m in dict.fromkeys(r["method"] for r in table.values()):
            rows = sorted((r for r in table.values() if r["method"] == m), key=lambda r: r["tokens"])
            ax.plot([r["tokens"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                    label=f"{m}" + (f" ({name})" if len(results) > 1 else ""))
    ax.axhline(meta["chance"]["all"], color="grey", ls=":", label="chance")
    ax.set_xlabel("visual tokens kept (of 144)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{meta['preset']}: accuracy vs kept visual tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", action="append", required=True, metavar="NAME=DIR",
                   help="an export directory (vlm-export --model llava-micro); repeat to compare (fp32=..., w8a8=...)")
    p.add_argument("--test-images", type=int, default=60, help="test images (about 3.7 questions each)")
    p.add_argument("--vqa-seed", type=int, default=0)
    p.add_argument("--keeps", default=",".join(map(str, KEEPS)), help="keep ratios, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--seed", type=int, default=0, help="random-drop seed")
    p.add_argument("--out", default="bench/results/pruning_llava_micro", help="writes OUT.md, OUT.json, OUT.png")
    a = p.parse_args(argv)
    exports = {}
    for e in a.export:
        name, _, d = e.rpartition("=")
        name = name or Path(d).name
        if not (Path(d) / "manifest.json").is_file():
            return fail(f"--export {e}: {d} is not an export directory (no manifest.json); run "
                        "`vlm-export --model llava-micro --precision fp32 --out DIR` first")
        exports[name] = Path(d)
    try:
        keeps = tuple(sorted({float(k) for k in a.keeps.split(",")}, reverse=True))
    except ValueError:
        return fail(f"--keeps {a.keeps!r} must be comma-separated ratios such as 1.0,0.5,0.25")
    if any(not 0 < k <= 1 for k in keeps):
        return fail(f"--keeps {a.keeps}: every ratio must lie in (0, 1]")
    if keeps[0] != 1.0:
        keeps = (1.0, *keeps)
    methods = tuple(m.strip() for m in a.methods.split(","))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        return fail(f"--methods {','.join(bad)} not known; choose from {','.join(METHODS)}")
    if a.test_images < 1:
        return fail("--test-images must be >= 1")
    t0 = time.time()
    results, preset = {}, None
    for name, d in exports.items():
        ev = Evaluator(d, a.backend)
        if "cls" in methods and not ev.has_cls:
            return fail(f"--methods cls: the export {d} has no cls_attention output")
        preset = ev.preset
        from vlmx.torch_ref import models

        images, questions = make_vqa.make_split("test", a.test_images, a.vqa_seed, models.get_preset(preset).image_size)
        print(f"{name}: {len(questions)} questions, methods {methods}, keeps {keeps}", flush=True)
        results[name] = evaluate(ev, images, questions, keeps, methods, a.seed, check=True)
        ev.pipe.close()
    meta = {"preset": preset, "command": " ".join(["python", "scripts/eval_pruning.py", *(argv or sys.argv[1:])]),
            "images": a.test_images, "questions": len(questions), "vqa_seed": a.vqa_seed, "backend": a.backend,
            "chance": make_vqa.chance(questions), "elapsed_s": time.time() - t0,
            "exports": {k: str(v) for k, v in exports.items()}}
    write_results(Path(a.out), results, meta)
    print(Path(a.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

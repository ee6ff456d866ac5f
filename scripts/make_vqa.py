#!/usr/bin/env python3
"""A synthetic visual question set (shapes on backgrounds) whose answers need particular image regions.

Each image is a 2 × 2 grid of cells; a cell holds one big shape (circle, square or triangle) in one of six colours,
or nothing. A small black dot may lie somewhere on the background. Questions (one short answer word each):

| kind | question | answers (chance) |
|---|---|---|
| ``colour`` | What colour is the shape in the top left? | red green blue yellow purple orange (1/6) |
| ``count`` | How many circles are there? | zero one two three four (1/5) |
| ``side`` | Is the red square on the left or the right? | left right (1/2) |
| ``dot`` | Is there a small black dot? | yes no (1/2) |

Everything comes from fixed seeds (``--seed``; the test split uses ``seed + 1``): the same command makes the same
set, so the data is regenerated, never committed. Other scripts import :func:`make_split`; the CLI writes PNGs and
``questions.jsonl`` into ``--out/<split>/``.

    python scripts/make_vqa.py --out build/vqa --train 2000 --test 300
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "purple": (140, 40, 190), "orange": (250, 130, 20)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
#: The answer candidates of each question kind (closed-set scoring picks the best one of its kind).
ANSWERS = {"colour": tuple(COLOURS), "count": NUMBERS, "side": ("left", "right"), "dot": ("yes", "no")}
KINDS = tuple(ANSWERS)
DEFAULT_SIZE = 168
SPLIT_SEED_OFFSET = {"train": 0, "test": 1}


@dataclass
class Question:
    image: int          # index of the image in its split
    kind: str           # one of KINDS
    question: str
    answer: str         # one of ANSWERS[kind]


def _draw(rng: np.random.Generator, size: int):
    """One scene as an HxWx3 uint8 array plus its objects [(cell, shape, colour)] and whether a dot was drawn."""
    from PIL import Image, ImageDraw

    base = rng.integers(70, 200)
    tint = rng.integers(-20, 21, size=3)
    grad = np.linspace(-25, 25, size)[None, :, None] * rng.choice([-1, 1])
    bg = np.clip(base + tint[None, None, :] + grad + rng.normal(0, 4, (size, size, 3)), 0, 255)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    half = size // 2
    objects = []
    for c, cell in enumerate(CELLS):
        if rng.random() < 0.2:
            continue
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        r = int(rng.integers(size // 9, size // 5))
        cx = (c % 2) * half + int(rng.integers(r + 3, half - r - 3))
        cy = (c // 2) * half + int(rng.integers(r + 3, half - r - 3))
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        objects.append((cell, shape, colour))
    dot = bool(rng.random() < 0.5)
    if dot:  # on the background: sample until it misses every shape's bounding square
        arr = np.asarray(img)
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(6, size - 6, 2))
            patch = arr[y - 5:y + 6, x - 5:x + 6].astype(int)
            if np.abs(patch - bg[y - 5:y + 6, x - 5:x + 6]).max() < 20:
                break
        rd = max(3, size // 40)
        draw.ellipse([x - rd, y - rd, x + rd, y + rd], fill=(10, 10, 10))
    return np.asarray(img), objects, dot


def _questions(rng: np.random.Generator, index: int, objects, dot: bool) -> list[Question]:
    qs = []
    if objects:
        cell, _, colour = objects[rng.integers(len(objects))]
        qs.append(Question(index, "colour", f"What colour is the shape in the {cell}?", colour))
    shape = SHAPES[rng.integers(len(SHAPES))]
    n = sum(s == shape for _, s, _ in objects)
    qs.append(Question(index, "count", f"How many {shape}s are there?", NUMBERS[n]))
    unique = [(cell, s, c) for cell, s, c in objects if sum((s, c) == (s2, c2) for _, s2, c2 in objects) == 1]
    if unique:
        cell, s, c = unique[rng.integers(len(unique))]
        qs.append(Question(index, "side", f"Is the {c} {s} on the left or the right?", cell.split()[1]))
    qs.append(Question(index, "dot", "Is there a small black dot?", "yes" if dot else "no"))
    return qs


def make_split(split: str, num_images: int, seed: int = 0, size: int = DEFAULT_SIZE):
    """``(images [N, size, size, 3] uint8, questions)`` of one split, deterministic in (split, seed, size)."""
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"split {split!r} is not known; choose one of {', '.join(SPLIT_SEED_OFFSET)}")
    rng = np.random.default_rng([seed, SPLIT_SEED_OFFSET[split], size])
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    questions: list[Question] = []
    for i in range(num_images):
        images[i], objects, dot = _draw(rng, size)
        questions += _questions(rng, i, objects, dot)
    return images, questions


def all_questions() -> list[str]:
    """Every question text the generator can ask (for tokenizing once)."""
    qs = [f"What colour is the shape in the {cell}?" for cell in CELLS]
    qs += [f"How many {shape}s are there?" for shape in SHAPES]
    qs += [f"Is the {c} {s} on the left or the right?" for c in COLOURS for s in SHAPES]
    return qs + ["Is there a small black dot?"]


def chance(questions) -> dict[str, float]:
    """Accuracy of guessing uniformly among each kind's candidates, per kind and overall."""
    per = {k: 1.0 / len(v) for k, v in ANSWERS.items()}
    out = {k: per[k] for k in KINDS if any(q.kind == k for q in questions)}
    out["all"] = float(np.mean([per[q.kind] for q in questions])) if questions else 0.0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write <split>/img_NNNNN.png and questions.jsonl")
    p.add_argument("--train", type=int, default=2000, help="train images (default 2000)")
    p.add_argument("--test", type=int, default=300, help="test images (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})")
    a = p.parse_args(argv)
    if a.train < 0 or a.test < 0 or a.train + a.test == 0:
        print("error: --train and --test must be >= 0 and not both 0", file=sys.stderr)
        return 2
    if a.size < 56:
        print(f"error: --size {a.size} is too small to draw shapes; use >= 56", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a directory", file=sys.stderr)
        return 2
    from PIL import Image

    for split, n in (("train", a.train), ("test", a.test)):
        if n == 0:
            continue
        images, questions = make_split(split, n, a.seed, a.size)
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(d / f"img_{i:05d}.png")
        with open(d / "questions.jsonl", "w") as f:
            for q in questions:
                f.write(json.dumps(asdict(q)) + "\n")
        print(f"{split}: {n} images, {len(questions)} questions, chance {chance(questions)['all']:.3f} -> {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

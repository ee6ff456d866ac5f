"""Build the random presets' tokenizer once: a Llama-style BPE (byte fallback, ``▁`` word marker) trained with the
``tokenizers`` library on Python's own ``pydoc_data/topics.py``; writes ``torch_ref/data/tiny_bpe_tokenizer.json``.

Layout as LLaVA-1.5's Llama tokenizer, scaled down: ``<unk>=0, <s>=1, </s>=2``, the 256 byte-fallback tokens
``<0x00>..<0xFF>`` at 3..258, then the learned pieces up to :data:`VOCAB` ids. The image and pad tokens are not in
this file: the export adds ``<image>`` (and ``<pad>``) at the preset's ``image_token_id``. The committed file is the
output of this script under CPython 3.11.7 and tokenizers 0.23.3 (topics.py differs between Python versions).

    python scripts/build_tiny_tokenizer.py [--out PATH]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB = 1000
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
OUT = Path(__file__).resolve().parents[1] / "torch_ref" / "data" / "tiny_bpe_tokenizer.json"


def corpus() -> list[str]:
    import pydoc_data.topics as topics

    return [line for text in topics.topics.values() for line in text.splitlines() if line.strip()]


def build() -> "tokenizers.Tokenizer":  # noqa: F821
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def pipeline(tok):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        return tok

    # 1. learn pieces (alphabet limited to the frequent characters; everything else falls back to bytes)
    learner = pipeline(Tokenizer(models.BPE(unk_token="<unk>")))
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIALS) - len(BYTES), limit_alphabet=96,
                                  show_progress=False)
    learner.train_from_iterator(corpus(), trainer)
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    # 2. the final model: specials + bytes first (Llama's ids), learned pieces after them, same merges
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTES + pieces)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                        fuse_unk=True)))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    tok = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out), pretty=False)
    sample = "Hello wörld: def f(x): return x ** 2  # 🎉"
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, vocab {tok.get_vocab_size()}); "
          f"{sample!r} -> {tok.encode(sample).tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

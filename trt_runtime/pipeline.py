"""The VLM pipeline: image → vision tower + projector → visual-token scoring → keep top-k → LLM prefill → greedy decode.

Every stage is a graph of the export run by one backend's runners (:mod:`vlmx.trt_runtime.runner`), so the same
pipeline drives ONNX Runtime, TensorRT engines and the torch reference with our kernels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmx.torch_ref import models
from vlmx.torch_ref.contract import KV_PAST, KV_PRESENT, PRUNE_METHODS, kv_names
from vlmx.torch_ref.pruning import keep_count

from .artifacts import Artifacts, load_artifacts
from .runner import DEFAULT_BACKEND, graph_runners

#: Largest image vlm-run decodes (the vision tower resizes to a few hundred pixels anyway).
MAX_IMAGE_PIXELS = 50_000_000
#: LLaVA-1.5 conversation template around the image and the user's prompt.
PROMPT_PREFIX = "USER: "
PROMPT_SUFFIX = "\n{prompt} ASSISTANT:"


class PipelineError(ValueError):
    """A bad input to the pipeline (image, keep, prune method); the message says what to do."""


@dataclass
class Timings:
    """Milliseconds per stage of one generation, plus decode throughput."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prune_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [("preprocess", f"{self.preprocess_ms:.2f} ms"), ("vision", f"{self.vision_ms:.2f} ms"),
                ("prune", f"{self.prune_ms:.2f} ms"), ("prefill", f"{self.prefill_ms:.2f} ms"),
                ("time to first token", f"{self.ttft_ms:.2f} ms"),
                ("decode", f"{self.decode_ms:.2f} ms for {self.decode_tokens} tokens "
                           f"({self.tokens_per_s:.1f} tokens/s)")]


@dataclass
class GenerationResult:
    """Generated token ids and text, which visual tokens were kept, and the timing breakdown."""

    tokens: list[int]
    text: str
    kept_index: np.ndarray
    num_visual_tokens: int
    timings: Timings = field(default_factory=Timings)

    @property
    def kept(self) -> int:
        return int(self.kept_index.shape[-1])


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """Open an image path (or pass a PIL image / HxWx3 uint8 array through) as RGB, with one clear error."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise PipelineError(f"image array must be HxWx3, got shape {image.shape}")
        return Image.fromarray(image.astype(np.uint8), "RGB")
    path = Path(image)
    if not path.is_file():
        raise PipelineError(f"--image {path} does not exist; pass a PNG/JPEG file")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise PipelineError(f"--image {path} is {im.width}x{im.height} pixels, more than vlmx reads "
                                        f"({MAX_IMAGE_PIXELS // 10**6} megapixels); resize it first")
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PipelineError(f"--image {path} is too large to decode safely (PIL's decompression-bomb limit); resize "
                            "it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise PipelineError(f"--image {path} is not a readable image ({e.__class__.__name__}); pass a PNG/JPEG "
                            "file") from None


class VLMPipeline:
    """Runs an export directory end to end on one backend (``onnxruntime``, ``tensorrt`` or ``torch``)."""

    def __init__(self, artifacts: Artifacts | str | Path, backend: str = DEFAULT_BACKEND, prune: str | None = None,
                 **backend_options):
        self.artifacts = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
        prune = self.artifacts.manifest.get("prune", "text") if prune is None else prune
        if prune not in PRUNE_METHODS:
            raise PipelineError(f"--prune {prune} is not known; choose one of {', '.join(PRUNE_METHODS)}")
        info = self.artifacts.info
        if prune == "cls" and "cls_attention" not in self.artifacts.output_names("vision"):
            raise PipelineError(f"--prune cls needs a [CLS] token, but the {info.get('vision')} vision tower of "
                                f"{self.artifacts.model} has none; use --prune text")
        self.prune = prune
        self.backend = backend
        self.preset = self.artifacts.model
        self.processor = models.make_processor(self.preset)
        self.runners = graph_runners(backend, self.artifacts, **backend_options)
        for r in self.runners.values():
            r.activate()
        self.has_position_ids = "position_ids" in self.artifacts.input_names("prefill")
        self.num_layers = int(info["num_layers"])
        self.max_seq_len = int(info.get("max_seq_len") or
                               self.artifacts.graph("decode")["profile"]["attention_mask"]["max"][1])

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------ stages
    def preprocess(self, image) -> np.ndarray:
        """Image → ``pixel_values`` [1, 3, H, W] float32 with the model's transformers image processor."""
        pil = load_image(image)
        return np.asarray(self.processor(images=pil, return_tensors="np")["pixel_values"], dtype=np.float32)

    def prompt_ids(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids before and after the image: LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:``."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PipelineError("--prompt must be a non-empty string")
        prefix = np.asarray(models.encode_prompt(self.preset, PROMPT_PREFIX), dtype=np.int64)
        suffix = np.asarray(models.encode_prompt(self.preset, PROMPT_SUFFIX.format(prompt=prompt),
                                                 add_bos=False), dtype=np.int64)
        return prefix, suffix

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.runners["embed"].infer({"input_ids": ids.reshape(1, -1)})["inputs_embeds"]

    def _lm_feed(self, embeds: np.ndarray, past_len: int) -> dict:
        n = embeds.shape[1]
        feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, past_len + n), dtype=np.int64)}
        if self.has_position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64).reshape(1, n)
        return feed

    def generate(self, image, prompt: str, keep: float | int | None = None, max_new_tokens: int = 32,
                 ) -> GenerationResult:
        """Greedy generation for one image and prompt, keeping ``keep`` (ratio or token budget) visual tokens."""
        if max_new_tokens < 1:
            raise PipelineError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        flag = "--keep" if keep is not None else "the export's keep"
        keep = self.artifacts.manifest.get("keep", 1.0) if keep is None else keep
        t = Timings()
        t0 = time.perf_counter()
        pixel_values = self.preprocess(image)
        prefix, suffix = self.prompt_ids(prompt)
        try:
            k = keep_count(int(self.artifacts.info["num_image_tokens"]), keep)
        except ValueError as e:
            raise PipelineError(f"{flag} {keep}: {e}") from None
        length = len(prefix) + k + len(suffix) + max_new_tokens
        if length > self.max_seq_len:
            raise PipelineError(f"the prompt ({len(prefix) + len(suffix)} tokens) + {k} visual tokens + "
                                f"--max-new-tokens {max_new_tokens} need {length} positions, more than the model's "
                                f"context of {self.max_seq_len}; shorten the prompt or lower --max-new-tokens")
        t1 = time.perf_counter()
        vis = self.runners["vision"].infer({"pixel_values": pixel_values})
        feats = vis["image_features"]
        n_vis = feats.shape[1]
        t2 = time.perf_counter()
        prefix_emb, suffix_emb = self._embed(prefix), self._embed(suffix)
        if self.prune == "cls":
            scores = vis["cls_attention"].astype(np.float32)
        else:
            text = np.concatenate([prefix_emb, suffix_emb], axis=1)
            scores = self.runners["score"].infer({"text_embeds": text, "image_features": feats})["scores"]
        pr = self.runners["prune"].infer({"image_features": feats, "scores": scores.astype(np.float32),
                                         "keep": np.asarray([k], dtype=np.int64)})
        kept, kept_index = pr["kept_features"], pr["kept_index"]
        t3 = time.perf_counter()
        embeds = np.concatenate([prefix_emb, kept.astype(prefix_emb.dtype), suffix_emb], axis=1)
        out = self.runners["prefill"].infer(self._lm_feed(embeds, 0))
        tokens = [int(np.argmax(out["logits"][0, -1]))]
        t4 = time.perf_counter()
        past_names, present_names = kv_names(KV_PAST, self.num_layers), kv_names(KV_PRESENT, self.num_layers)
        past = {p: out[q] for p, q in zip(past_names, present_names)}
        past_len = embeds.shape[1]
        eos = self.artifacts.info.get("eos_token_id")
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            step = self._embed(np.asarray([tokens[-1]], dtype=np.int64))
            out = self.runners["decode"].infer({**self._lm_feed(step, past_len), **past})
            past = {p: out[q] for p, q in zip(past_names, present_names)}
            past_len += 1
            tokens.append(int(np.argmax(out["logits"][0, -1])))
        t5 = time.perf_counter()
        t.preprocess_ms, t.vision_ms = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        t.prune_ms, t.prefill_ms = 1e3 * (t3 - t2), 1e3 * (t4 - t3)
        t.ttft_ms, t.decode_ms, t.decode_tokens = 1e3 * (t4 - t0), 1e3 * (t5 - t4), len(tokens) - 1
        return GenerationResult(tokens, models.decode_tokens(self.preset, tokens), kept_index, n_vis, t)

"""The VLM pipeline: image → vision tower + projector → visual-token scoring → keep top-k → one LM graph (prefill,
then decode steps) over a fixed-size KV cache, streaming tokens.

Every stage is a graph of the export run by one backend's runners (:mod:`vlmx.trt_runtime.runner`). Stages hand
each other the backend's own arrays (:mod:`vlmx.trt_runtime.arrays`: numpy on the CPU, where torch is never
imported; device tensors on GPU backends, never through numpy); the host sees token ids only. Per
generation the LM's KV cache ([1, H_kv, S_max, D] per layer), its logits and the decode-step embedding buffers are
allocated once and bound (cache as both ``past.*`` and ``present.*``); a decode step then feeds one token id and the
length of a view of a preallocated attention mask. Text goes through one seam: the export's own processor
(:mod:`vlmx.trt_runtime.processor`: tokenizer, chat template, image processor, streaming detokenization).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vlmx.torch_ref.contract import KV_PAST, KV_PRESENT, LM_GRAPH, PRUNE_METHODS, kv_names
from vlmx.torch_ref.keep_rule import keep_count

from .arrays import array_ops
from .artifacts import Artifacts, load_artifacts
from .processor import Processor
from .runner import DEFAULT_BACKEND, graph_runners
from .sampling import Sampling


class PipelineError(ValueError):
    """A bad input to the pipeline (image, keep, prune method, lengths); the message says what to do."""


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
    #: milliseconds of each decode step (context length grows by one per step)
    step_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [("preprocess", f"{self.preprocess_ms:.2f} ms"), ("vision", f"{self.vision_ms:.2f} ms"),
                ("prune", f"{self.prune_ms:.2f} ms"), ("prefill", f"{self.prefill_ms:.2f} ms"),
                ("time to first token", f"{self.ttft_ms:.2f} ms"),
                ("decode", f"{self.decode_ms:.2f} ms for {self.decode_tokens} tokens "
                           f"({self.tokens_per_s:.1f} tokens/s)")]

    def as_dict(self) -> dict:
        d = {k: round(v, 3) for k, v in vars(self).items() if isinstance(v, float)}
        return {**d, "decode_tokens": self.decode_tokens, "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class GenerationResult:
    """Generated token ids and text, why generation stopped, which visual tokens were kept, and timings."""

    tokens: list[int]
    text: str
    kept_index: np.ndarray
    num_visual_tokens: int
    timings: Timings = field(default_factory=Timings)
    finish_reason: str = "length"   # "eos" | "stop" | "length"
    prompt_tokens: int = 0

    @property
    def kept(self) -> int:
        return int(self.kept_index.shape[-1])

    def as_dict(self) -> dict:
        """The ``--json`` record."""
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "visual_tokens_kept": self.kept,
                "visual_tokens": self.num_visual_tokens, "kept_index": self.kept_index[0].tolist(),
                "timings": self.timings.as_dict()}


@dataclass
class Token:
    """One streamed token: its id, the text it adds (may be empty while a stop string could still match)."""

    id: int
    text: str
    index: int


class Generation:
    """An iterator of :class:`Token` s; ``result`` holds the :class:`GenerationResult` once it is exhausted."""

    def __init__(self, gen: Iterator):
        self._gen, self.result = gen, None

    def __iter__(self):
        self.result = yield from self._gen
        return self.result


class VLMPipeline:
    """Runs an export directory end to end on one backend (``onnxruntime``, ``tensorrt`` or ``torch``).

    ``processor``: the text/image seam (default: the export's own :class:`Processor`); ``cuda_graph``: capture the
    decode step where the LM runner offers ``capture_decode`` (the torch backend on a GPU)."""

    def __init__(self, artifacts: Artifacts | str | Path, backend: str = DEFAULT_BACKEND, prune: str | None = None,
                 processor: Processor | None = None, cuda_graph: bool = True, **backend_options):
        self.artifacts = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
        prune = self.artifacts.manifest.get("prune", "text") if prune is None else prune
        if prune not in PRUNE_METHODS:
            raise PipelineError(f"--prune {prune} is not known; choose one of {', '.join(PRUNE_METHODS)}")
        info = self.artifacts.info
        if prune == "cls" and "cls_attention" not in self.artifacts.output_names("vision"):
            raise PipelineError(f"--prune cls needs a [CLS] token, but the {info.get('vision')} vision tower of "
                                f"{self.artifacts.model} has none; use --prune text")
        self.prune, self.backend, self.preset = prune, backend, self.artifacts.model
        self.processor = processor or Processor.from_dir(self.artifacts.root)
        self.num_layers = int(info["num_layers"])
        self.max_seq_len = int(info["max_seq_len"])
        self.kv_shape = (int(info["num_kv_heads"]), self.max_seq_len, int(info["head_dim"]))
        self.runners = graph_runners(backend, self.artifacts, **{"return_torch": True, **backend_options})
        for r in self.runners.values():
            r.activate()
        self.lm = self.runners[LM_GRAPH]
        self.arrays = array_ops(self.lm)
        self.cuda_graph = cuda_graph
        self.kv_dtype = next(i["dtype"] for i in self.artifacts.graph(LM_GRAPH)["inputs"]
                             if i["name"] == kv_names(KV_PAST, 1)[0])

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------ stages
    def preprocess(self, image) -> np.ndarray:
        """Image → ``pixel_values`` [1, 3, H, W] float32 with the export's image processor."""
        return self.processor.image_processor(image)

    def prompt_ids(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids before and after the image: the export's chat template around one image and ``prompt``."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PipelineError("--prompt must be a non-empty string")
        return self.processor.prompt_ids(prompt)

    def _embed(self, ids):
        return self.runners["embed"].infer({"input_ids": self.arrays.tokens(ids)})["inputs_embeds"]

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, before any work, a generation that cannot fit the KV cache (S_max)."""
        if max_new_tokens < 1:
            raise PipelineError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            room = self.max_seq_len - prompt_tokens
            raise PipelineError(
                f"the prompt is {prompt_tokens} tokens (text + kept image tokens) and --max-new-tokens is "
                f"{max_new_tokens}: {prompt_tokens + max_new_tokens} > the export's KV-cache length "
                f"{self.max_seq_len}; " + (f"pass --max-new-tokens {room} or less, a shorter prompt or a lower --keep"
                                           if room > 0 else "shorten the prompt or lower --keep")
                + ", or re-export with a larger --max-seq-len")

    def _bind_lm(self, batch: int = 1) -> dict:
        """Allocate and bind this generation's LM buffers once: caches (past = present), logits, mask (``batch``
        rows: scripts that score several prompts of one length in one prefill)."""
        bufs = {}
        for past, present in zip(kv_names(KV_PAST, self.num_layers), kv_names(KV_PRESENT, self.num_layers)):
            buf = self.lm.alloc(past, (batch, *self.kv_shape), self.kv_dtype)
            bufs[past] = bufs[present] = buf
        vocab = int(self.artifacts.info["vocab_size"])
        bufs["logits"] = self.lm.alloc("logits", (batch, 1, vocab), "float32")
        self.lm.bind(bufs)
        mask = self.lm.alloc("attention_mask", (batch, self.max_seq_len), "int64")
        mask[...] = 1
        return {"cache": bufs, "mask": mask}

    # ------------------------------------------------------------------------------------------------ generation
    def stream(self, image, prompt: str, keep: float | int | None = None, max_new_tokens: int = 32,
               sampling: Sampling | None = None, stop: tuple[str, ...] | list[str] = ()) -> Generation:
        """Stream tokens for one image and prompt (a :class:`Generation`; its ``result`` once exhausted).

        ``keep``: visual tokens to keep (ratio or budget); ``sampling``: greedy by default; ``stop``: strings that
        end generation (not included in the text). Every check happens before any graph runs."""
        sampling = (sampling or Sampling())
        try:
            sampling.check()
        except ValueError as e:
            raise PipelineError(str(e)) from None
        if any(not isinstance(s, str) or not s for s in stop):
            raise PipelineError("--stop strings must be non-empty")
        flag = "--keep" if keep is not None else "the export's keep"
        keep = self.artifacts.manifest.get("keep", 1.0) if keep is None else keep
        n_vis = int(self.artifacts.info["num_image_tokens"])
        try:
            k = keep_count(n_vis, keep)
        except ValueError as e:
            raise PipelineError(f"{flag} {keep}: {e}") from None
        prefix, suffix = self.prompt_ids(prompt)
        self.check_length(len(prefix) + k + len(suffix), max_new_tokens)
        return Generation(self._generate(image, prefix, suffix, k, max_new_tokens, sampling, tuple(stop)))

    def generate(self, image, prompt: str, keep: float | int | None = None, max_new_tokens: int = 32,
                 sampling: Sampling | None = None, stop=()) -> GenerationResult:
        """The whole generation at once (the same steps as :meth:`stream`)."""
        gen = self.stream(image, prompt, keep, max_new_tokens, sampling, stop)
        for _ in gen:
            pass
        return gen.result

    def _visual(self, pixel_values, prefix, suffix, k):
        """Vision → scores → kept features; returns (kept [1, k, C], kept_index, prefix/suffix embeddings)."""
        vis = self.runners["vision"].infer({"pixel_values": pixel_values})
        self._vision_done = time.perf_counter()
        feats = vis["image_features"]
        prefix_emb, suffix_emb = self._embed(prefix), self._embed(suffix)
        a = self.arrays
        if self.prune == "cls":
            scores = vis["cls_attention"]
        else:
            text = a.concat([prefix_emb, suffix_emb], axis=1)
            scores = self.runners["score"].infer({"text_embeds": text, "image_features": feats})["scores"]
        pr = self.runners["prune"].infer({"image_features": feats, "scores": a.float32(scores),
                                         "keep": a.index([k])})
        return pr["kept_features"], pr["kept_index"], prefix_emb, suffix_emb

    def _generate(self, image, prefix, suffix, k, max_new_tokens, sampling, stop):
        t = Timings()
        t0 = time.perf_counter()
        pixel_values = self.preprocess(image)
        t1 = time.perf_counter()
        kept, kept_index, prefix_emb, suffix_emb = self._visual(pixel_values, prefix, suffix, k)
        n_vis = int(self.artifacts.info["num_image_tokens"])
        t2 = time.perf_counter()
        embeds = self.arrays.concat([prefix_emb, kept, suffix_emb], axis=1)
        self.runners["embed"].unbind()
        self.lm.unbind()
        bufs = self._bind_lm()
        mask, length = bufs["mask"], embeds.shape[1]
        sampler = self.arrays.sampler(sampling)
        out = self.lm.infer({"inputs_embeds": embeds, "attention_mask": mask[:, :length]})
        token = sampler(out["logits"][:, -1])
        t3 = time.perf_counter()
        decode = self._decode_fn(embeds.shape[-1])
        tokens, text, emitted, reason = [], "", 0, "length"
        stream = self.processor.stream()
        holdback = max((len(s) for s in stop), default=1) - 1
        step_start = t3
        while True:
            tid = int(token[0])  # the only device-to-host transfer per token
            tokens.append(tid)
            if len(tokens) > 1:
                t.step_ms.append(1e3 * (time.perf_counter() - step_start))
            if tid in self.processor.eos_token_ids:
                text, reason = text + stream.flush(), "eos"
                break
            text += stream.push(tid)  # never ends inside a multi-byte character
            hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop"
                break
            last = len(tokens) >= max_new_tokens
            text += stream.flush() if last else ""
            safe = len(text) if last else max(emitted, len(text) - holdback)
            yield Token(tid, text[emitted:safe], len(tokens) - 1)
            emitted = safe
            if last:
                break
            step_start = time.perf_counter()
            length += 1
            logits = decode(token, length, mask)
            token = sampler(logits[:, -1])
        if reason != "length":  # the EOS / stop token itself, with any text held back for stop matching
            yield Token(tokens[-1], text[emitted:], len(tokens) - 1)
        t4 = time.perf_counter()
        self.lm.unbind()
        self.runners["embed"].unbind()
        t.preprocess_ms, t.vision_ms = 1e3 * (t1 - t0), 1e3 * (self._vision_done - t1)
        t.prune_ms = 1e3 * (t2 - self._vision_done)  # text embeddings, scoring and top-k
        t.prefill_ms, t.ttft_ms = 1e3 * (t3 - t2), 1e3 * (t3 - t0)
        t.decode_ms, t.decode_tokens = 1e3 * (t4 - t3), len(tokens) - 1
        return GenerationResult(tokens, text, self.arrays.host(kept_index), n_vis, t, reason,
                                prompt_tokens=int(embeds.shape[1]))

    def _decode_fn(self, hidden: int):
        """One decode step ``(token [1], new length, mask) -> logits``: a captured CUDA graph where the LM runner
        offers one, else the LM graph with the embedding written into a bound buffer."""
        embed = self.runners["embed"]
        capture = getattr(self.lm, "capture_decode", None)
        if self.cuda_graph and capture is not None and self.lm.device_io:
            graph = capture(batch=1, hidden=hidden, s_max=self.max_seq_len, num_layers=self.num_layers)

            def step_graph(token, length, mask):
                return graph(embed.infer({"input_ids": token.view(1, 1)})["inputs_embeds"], length)

            return step_graph
        step_emb = self.lm.alloc("inputs_embeds", (1, 1, hidden), self.kv_dtype)
        embed.bind({"inputs_embeds": step_emb})
        self.lm.bind({"inputs_embeds": step_emb})

        def step(token, length, mask):
            embed.infer({"input_ids": token.reshape(1, 1)})
            return self.lm.infer({"attention_mask": mask[:, :length]})["logits"]

        return step

"""GPU memory plan of a generation: weights + KV cache at S_max + activations + workspace, against a card.

``vlm-run`` checks the plan against the GPU's free memory before loading anything; ``vlm-build`` against the target
card (:data:`CARDS`). When it does not fit, :class:`MemoryPlanError` says by how much and what to change
(``--max-seq-len`` with the largest S_max that fits, precision, batch). Activation sizes are upper estimates of one
layer's working set (engines and ONNX Runtime reuse activation memory across layers), so a plan that fits is a
plan that leaves headroom, not a byte-exact prediction; the benchmark (``scripts/bench_decode.py``) records the
measured peak next to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024 ** 3
MIB = 1024 ** 2
#: CUDA context, cuBLAS/cuDNN handles, allocator slack: never available to the model.
CONTEXT_RESERVE = 512 * MIB
#: TensorRT / ONNX Runtime scratch (attention and GEMM workspaces).
WORKSPACE = 256 * MIB
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class Card:
    name: str
    memory: int  # bytes the driver reports as total


#: Turing cards vlmx targets (``vlm-build --card``).
CARDS = {"t4": Card("Tesla T4 16 GB", 15360 * MIB), "rtx2080": Card("GeForce RTX 2080 8 GB", 8192 * MIB),
         "rtx2060": Card("GeForce RTX 2060 6 GB", 6144 * MIB)}
DEFAULT_CARD = {75: "t4"}


class MemoryPlanError(ValueError):
    """The model does not fit the card; the message says what to change."""


@dataclass
class MemoryPlan:
    """Bytes per part; ``budget``: what the card offers (free memory, or the card's total minus the context)."""

    weights: int
    kv_cache: int
    activations: int
    workspace: int
    budget: int
    where: str
    max_seq_len: int
    batch: int = 1
    kv_per_token: int = 0
    notes: list[str] = field(default_factory=list)
    #: the model_info and attention mode the LM sizes came from (to re-plan at another S_max)
    info: dict = field(default_factory=dict, repr=False)
    attention: str = "plugin"

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.workspace

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def rows(self) -> list[tuple[str, str]]:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        return [("weights", g(self.weights)),
                (f"KV cache (S_max {self.max_seq_len}, batch {self.batch})", g(self.kv_cache)),
                ("activations (estimate)", g(self.activations)), ("workspace", g(self.workspace)),
                ("total", g(self.total)), (f"available on {self.where}", g(self.budget))]

    def text(self) -> str:
        return "memory plan: " + ", ".join(f"{k} {v}" for k, v in self.rows()) + \
            (" -> fits" if self.fits else " -> does NOT fit")

    def at(self, max_seq_len: int) -> "MemoryPlan":
        """The same plan at another S_max."""
        kv, per_token, act = lm_sizes(self.info, max_seq_len, self.batch, self.attention)
        return MemoryPlan(self.weights, kv, act, self.workspace, self.budget, self.where, max_seq_len, self.batch,
                          per_token, list(self.notes), self.info, self.attention)

    def largest_seq_len(self) -> int:
        """The largest S_max (a multiple of 64, at most this plan's) that fits (0: none)."""
        if not self.info:
            return 0
        return next((s for s in range(self.max_seq_len // 64 * 64, 0, -64) if self.at(s).fits), 0)

    def check(self) -> "MemoryPlan":
        if self.fits:
            return self
        over = (self.total - self.budget) / GIB
        s = self.largest_seq_len()
        hint = (f"re-export with --max-seq-len {s} or less (KV cache {self.kv_per_token * self.batch * s / GIB:.2f} "
                "GiB)" if s >= 64 else "the weights alone do not fit: use a card with more memory")
        raise MemoryPlanError(f"the model does not fit on {self.where}: needs {self.total / GIB:.2f} GiB "
                              f"({', '.join(f'{k} {v}' for k, v in self.rows()[:4])}), {over:.2f} GiB more than "
                              f"the {self.budget / GIB:.2f} GiB available; {hint}; with batch > 1, use batch 1")


def lm_sizes(info: dict, max_seq_len: int, batch: int = 1, attention: str = "plugin") -> tuple[int, int, int]:
    """(KV cache bytes, KV bytes per token, activation bytes) of the LM from ``model_info``."""
    item = _ITEMSIZE.get(info.get("dtype", "float16"), 2)
    layers, hkv, d = int(info["num_layers"]), int(info["num_kv_heads"]), int(info["head_dim"])
    per_token = 2 * layers * hkv * d * item
    c, h, v = int(info["lm_hidden"]), int(info["num_heads"]), int(info["vocab_size"])
    # one layer at prefill over S_max tokens: hidden states, qkv, MLP (≈ 4 C wide, gated), logits of one position
    act = batch * max_seq_len * (8 * c + 3 * 4 * c) * item + batch * v * 4
    if attention != "plugin":  # materialised fp32 scores [B, H, S, S] (flash attention never holds them)
        act += batch * h * max_seq_len * max_seq_len * 4
    return per_token * batch * max_seq_len, per_token, act


def plan(manifest: dict, weights: int, budget: int, where: str, batch: int = 1,
         max_seq_len: int | None = None) -> MemoryPlan:
    """The plan of an export (``manifest``) whose graphs hold ``weights`` bytes, against ``budget`` bytes."""
    info = manifest.get("model_info", {})
    need = ("num_layers", "num_kv_heads", "head_dim", "lm_hidden", "num_heads", "vocab_size")
    s = int(max_seq_len or info.get("max_seq_len") or 0)
    if s and all(k in info for k in need):
        kv, per_token, act = lm_sizes(info, s, batch, manifest.get("attention", "plugin"))
        return MemoryPlan(weights, kv, act, WORKSPACE, budget, where, s, batch, per_token, [], info,
                          manifest.get("attention", "plugin"))
    return MemoryPlan(weights, 0, 0, WORKSPACE, budget, where, s, batch,
                      notes=["model_info lacks the LM shape: KV cache and activations not planned"])


def export_weight_bytes(manifest: dict) -> int:
    """Bytes of the export's graph files (ONNX initializers and external data ≈ engine weights)."""
    return sum(int(meta.get("bytes", 0)) for rel, meta in manifest.get("files", {}).items()
               if rel.endswith(".onnx") or rel.endswith(".onnx.data"))


def card_budget(card: str) -> tuple[int, str]:
    try:
        c = CARDS[card]
    except KeyError:
        raise MemoryPlanError(f"--card {card} is not known; choose one of {', '.join(CARDS)}") from None
    return c.memory - CONTEXT_RESERVE, c.name


def check_build_memory(manifest: dict, card: str | None, sm: int, verbose: bool = True) -> MemoryPlan | None:
    """``vlm-build``: the plan against the target card (``card``, else the default card of ``sm``)."""
    card = card or DEFAULT_CARD.get(int(sm))
    if card is None:
        return None
    budget, name = card_budget(card)
    p = plan(manifest, export_weight_bytes(manifest), budget, name)
    if verbose:
        print(p.text())
    return p.check()


def check_runtime_memory(artifacts_dir, backend: str, verbose: bool = True) -> MemoryPlan | None:
    """``vlm-run``: before loading anything, the plan against the free memory of the GPU (None without one)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available() or backend == "onnxruntime" and not _ort_cuda():
        return None
    import json
    from pathlib import Path

    manifest = json.loads((Path(artifacts_dir) / "manifest.json").read_text())
    free, _ = torch.cuda.mem_get_info()
    p = plan(manifest, export_weight_bytes(manifest), free - CONTEXT_RESERVE // 2,
             f"{torch.cuda.get_device_name()} (free memory)")
    if verbose:
        print(p.text())
    return p.check()


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def preset_plan(preset: str, card: str = "t4", max_seq_len: int | None = None, precision: str = "fp16",
                attention: str = "plugin") -> MemoryPlan:
    """The plan of a preset before any export (README table): weights from the preset's parameter count."""
    import torch

    from vlmx.export.weights import weight_bytes_estimate
    from vlmx.torch_ref import models

    spec = models.get_preset(preset)
    dtype = torch.float32 if precision == "fp32" else torch.float16
    weights = weight_bytes_estimate(spec, dtype)
    if precision == "w8a8":  # the linear layers at one byte per weight (embeddings / norms stay fp16)
        weights = weights // 2 + spec.vocab_size * spec.text_hidden * 2
    info = {"num_layers": spec.text_layers, "num_kv_heads": spec.text_heads, "head_dim": spec.text_head_dim,
            "lm_hidden": spec.text_hidden, "num_heads": spec.text_heads, "vocab_size": spec.vocab_size,
            "max_seq_len": max_seq_len or spec.max_seq_len, "dtype": "float32" if precision == "fp32" else "float16"}
    budget, name = card_budget(card)
    return plan({"model_info": info, "attention": attention}, weights, budget, name)

"""The sampler of torch-array backends (the torch backend; GPU backends' device tensors): the filters of
:func:`vlmx.trt_runtime.sampling.allowed` in torch, on the logits' device, from a seeded ``torch.Generator``."""
from __future__ import annotations

import torch

from .sampling import Sampling


class TorchSampler:
    """Picks one token per row from float logits [B, V] (a torch tensor on any device)."""

    def __init__(self, params: Sampling, device="cpu"):
        self.params = params.check()
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(params.seed))

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """Tempered logits with the top-k / top-p rejects at -inf (same rule as the numpy ``allowed``)."""
        p = self.params
        logits = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(dim=-1) - probs > p.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.params.greedy:
            return logits.float().argmax(dim=-1)
        probs = torch.softmax(self.allowed(logits), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

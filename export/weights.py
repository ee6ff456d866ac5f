"""Large models without a second copy: built on the meta device and materialised directly in the export dtype.

``models.build_model`` initialises in float32 (transformers' init) and casts; for a 7B language model that is a
27 GB float32 copy before the 13.5 GB float16 one. :func:`random_model` instead creates the module tree on the meta
device, allocates only the requested parts in the target dtype and fills them in place (seeded normal(0, 0.02)
weights, unit norm scales, zero biases), so peak memory stays at the weights themselves.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

#: Above this many weight bytes (in the export dtype) the driver builds random models this way.
LARGE_MODEL_BYTES = 1_800_000_000


def _fill(p: torch.Tensor, gen: torch.Generator, rows: int = 4096) -> None:
    """normal(0, 0.02) a slice of rows at a time, so the float32 scratch stays small."""
    flat = p.view(p.shape[0], -1)
    for i in range(0, flat.shape[0], rows):
        chunk = flat[i:i + rows]
        chunk.copy_(torch.empty(chunk.shape, dtype=torch.float32).normal_(0, 0.02, generator=gen).to(p.dtype))


def meta_model(spec, dtype: torch.dtype = torch.float16, text_layers: int | None = None):
    """The preset's model on the meta device (no memory), in ``dtype``; returns (spec, model)."""
    from vlmx.torch_ref import models

    spec = models.get_preset(spec)
    if text_layers:
        spec = dataclasses.replace(spec, text_layers=text_layers)
    with torch.device("meta"):
        model = models.model_class(spec)(models.make_config(spec))
    return spec, model.to(dtype).eval()


def weight_bytes_estimate(spec, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of the preset's parameters in ``dtype`` (from a meta-device model: nothing is allocated)."""
    _, model = meta_model(spec, dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def materialize(parts: list[nn.Module], seed: int) -> None:
    """Allocate ``parts`` on the CPU and fill them in place; recompute the non-persistent buffers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in parts:
            sub.to_empty(device="cpu")
            for name, p in sub.named_parameters():
                if p.ndim == 1 and ("norm" in name or "layrnorm" in name):
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    _fill(p, gen)
            reset_derived_buffers(sub)


def reset_derived_buffers(module: nn.Module) -> None:
    """Recompute the buffers a module derives from its config (rotary ``inv_freq`` tables, ``position_ids``):
    after ``to_empty`` they hold garbage. Each stays on its own device."""
    for mod in module.modules():
        if hasattr(mod, "inv_freq"):
            dev = mod.inv_freq.device
            fresh = type(mod)(mod.config)
            mod.inv_freq = fresh.inv_freq.to(dev)
            mod.original_inv_freq = fresh.original_inv_freq.to(dev)
        if isinstance(getattr(mod, "position_ids", None), torch.Tensor):
            ids = mod.position_ids
            mod.position_ids = torch.arange(ids.shape[-1], device=ids.device).expand((1, -1))


def random_model(spec, seed: int = 0, dtype: torch.dtype = torch.float16, parts=None, text_layers=None):
    """A random-weight model built without a float32 copy. ``parts(model) -> [modules]`` limits what is
    allocated (the rest stays on the meta device); default: everything. Returns (spec, model, parts)."""
    spec, model = meta_model(spec, dtype, text_layers)
    chosen = parts(model) if parts else [model]
    materialize(chosen, seed)
    return spec, model, chosen

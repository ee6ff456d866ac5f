"""Stock transformers models (tiny configs, random NON-ZERO biases and norm scales) exported by plain
``torch.onnx.export`` in every form users bring: dynamo or legacy exporter, eager or sdpa attention, static or
dynamic shapes. No vlmx code takes part in the export."""
from __future__ import annotations

import onnx
import torch

FAMILIES = ("clip", "siglip", "llama-mha", "llama-gqa", "llama-mqa", "mpt")
EXPORTERS = ("dynamo", "legacy")
ATTENTIONS = ("eager", "sdpa")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every 1-D parameter: biases ~ N(0, 0.3), norm scales ~ U(0.5, 1.5) (default init has zero biases
    and unit scales, under which a misordered bias or a dropped scale goes unnoticed), and Linear weights
    ~ N(0, 1/fan_in) (at the default std 0.02 the blocks barely change the residual stream, so a broken layer
    would hide below a w8a8 threshold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
        for name, p in model.named_parameters():
            if p.ndim != 1:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


class _LM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, inputs_embeds, attention_mask):
        return self.m(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state


class _MPT(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def build(family: str, attention: str, layers: int = 2):
    """``(module, example inputs {name: tensor}, dynamic axes {name: {axis: name}}, number of attention layers)``."""
    torch.manual_seed(0)
    if family in ("clip", "siglip"):
        if family == "clip":
            from transformers import CLIPVisionConfig as C, CLIPVisionModel as M
        else:
            from transformers import SiglipVisionConfig as C, SiglipVisionModel as M
        cfg = C(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=28,
                patch_size=14, attn_implementation=attention)
        model = randomize(M(cfg).eval())

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, pixel_values):
                return self.m(pixel_values=pixel_values).last_hidden_state

        return Vision(), {"pixel_values": torch.randn(2, 3, 28, 28)}, {"pixel_values": {0: "batch"}}, layers
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0  # left padding
    dyn = {"attention_mask": {0: "batch", 1: "seq"}}
    if family.startswith("llama"):
        from transformers import LlamaConfig, LlamaModel

        kv = {"llama-mha": 4, "llama-gqa": 2, "llama-mqa": 1}[family]
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=kv, vocab_size=64, attention_bias=True, mlp_bias=True,
                          attn_implementation=attention)
        model = randomize(LlamaModel(cfg).eval())
        return _LM(model), {"inputs_embeds": torch.randn(2, 6, 32), "attention_mask": mask}, \
            {"inputs_embeds": {0: "batch", 1: "seq"}, **dyn}, layers
    if family == "mpt":
        from transformers import MptConfig, MptModel

        cfg = MptConfig(d_model=32, n_heads=4, n_layers=layers, expansion_ratio=2, max_seq_len=16, vocab_size=64,
                        no_bias=False, attn_config={"alibi": True}, attn_implementation=attention)
        model = randomize(MptModel(cfg).eval())
        return _MPT(model), {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": mask}, \
            {"input_ids": {0: "batch", 1: "seq"}, **dyn}, layers
    raise ValueError(family)


def export(family: str, exporter: str, attention: str, dynamic: bool, path, opset: int = 18, layers: int = 2,
           dtype=torch.float32):
    """Export one form to ``path``; returns ``(onnx model, feed {name: array}, attention layers)``."""
    from vlmx.export.exporter import _quiet

    module, inputs, axes, n = build(family, attention, layers)
    module = module.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    names = list(inputs)
    args = tuple(inputs.values())
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            shapes = None
            if dynamic:
                shapes = {k: {a: torch.export.Dim.AUTO for a in v} for k, v in axes.items()}
                shapes.update({k: None for k in names if k not in shapes})
            prog = torch.onnx.export(module, args, input_names=names, dynamo=True, opset_version=opset,
                                     dynamic_shapes=shapes)
            prog.save(str(path))
        else:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"], dynamo=False,
                              opset_version=opset, dynamic_axes=axes if dynamic else None)
    return onnx.load(str(path)), {k: v.numpy() for k, v in inputs.items()}, n

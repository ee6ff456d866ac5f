"""W8A8 SigLIP vision encoder (tinychat's ``fused_siglipdecoder``) on the vlmx ops.

Every linear layer is int8 × int8 with exact int32 accumulation (``vlmx::w8a8_linear``): int8 weights with
per-output-channel symmetric scales (``max|w| / 127``), activations quantized per token at run time. The residual
stream and every W8A8 output are float16. One layer::

    x ─ NormQuant(ln1) ─ W8A8Linear(qkv) ─ attention ─ QuantizePerToken ─ W8A8Linear(out) ─ + x ─┐
    ┌───────────────────────────────────────────────────────────────────────────────────────────┘
    h ─ NormQuant(ln2) ─ W8A8Linear(fc1) ─ GeluQuant ─ W8A8Linear(fc2) ─ + h

Choices, documented:

- Norms. SigLIP uses LayerNorm, which tinychat fuses with quantization in a module named ``RMSNormGeneral``.
  :class:`RMSNormGeneral` keeps that name and interface and takes ``mode``: ``"rmsnorm"`` (default, what the name
  says) or ``"layernorm"`` (mean-centred; what :class:`QuantSiglipEncoderLayer` uses).
- Activation clipping. tinychat defines ``CLIP_RANGE = 5`` and had the clamp of the two norm outputs before
  quantization commented out. Here it is the ``clip_range`` of the two ``NormQuant`` ops: ``0`` (no clip, tinychat's
  effective behaviour) by default, ``CLIP_RANGE`` to clip.
- Buffers. :class:`ActivationBuffer` pre-allocates tinychat's int8/scale/fp16 activation buffers (grown when
  batch × sequence grows, reused otherwise). The vlmx ops are functional (they return new tensors), so in eager mode
  results are *also written* into the buffers (tinychat's in-place interface: callers may read them there); while
  ``torch.compiler.is_compiling()`` (torch.export, torch.compile) no buffer is touched and no shape decision is made,
  so export with dynamic batch/sequence traces a purely functional graph. ``QuantSiglipEncoder.use_buffer = False``
  gives the functional path in eager mode too (bit-identical results). With these reference ops each buffer write
  is one extra copy and saves no allocation; the buffers pay off once a backend writes into them in place (tinychat's
  kernels do; the vlmx op table has no out-variants).
- Attention goes through :func:`vlmx.torch_ref.attention.attend` with ``impl=self.attn_impl`` (default ``"eager"``).
- dtypes. Each layer computes in fp16 (residual stream included) and hands back the dtype it was given, so the
  encoder is a drop-in for fp16 and fp32 models (in an fp32 model the fp16 stream is widened between layers,
  losslessly). The layer and attention classes subclass transformers' ``SiglipEncoderLayer``/``SiglipAttention``
  *only* so that transformers' output recorder (it finds modules by class) still collects ``output_hidden_states``
  (LLaVA's feature layer) and ``output_attentions`` from a ``SiglipVisionModel``; they run neither base ``__init__``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.siglip import modeling_siglip as hf_siglip

from . import ops  # noqa: F401  (defines torch.ops.vlmx.*)
from .attention import attend, check_impl
from .clip import additive_mask
from .op_table import CLIP_RANGE, NORM_MODES, QMAX

__all__ = ["CLIP_RANGE", "ActivationBuffer", "QuantSiglipEncoder", "QuantSiglipEncoderLayer",
           "QuantSiglipFlashAttention2", "QuantSiglipMLP", "RMSNormGeneral", "W8A8OF16LinearDynamicInputScale",
           "quantize_weight_per_channel"]

_GELU_APPROX = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _eager() -> bool:
    """True outside torch.export / torch.compile tracing (only then are buffers written)."""
    return not torch.compiler.is_compiling()


def _store(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Write ``value`` into ``buffer`` in eager mode and return the buffer; otherwise return ``value``."""
    if buffer is None or not _eager():
        return value
    if buffer.shape != value.shape or buffer.dtype != value.dtype:
        raise ValueError(f"buffer of shape {tuple(buffer.shape)} {buffer.dtype} cannot hold a result of shape "
                         f"{tuple(value.shape)} {value.dtype}; bind the ActivationBuffer to this batch × sequence "
                         "(ActivationBuffer.bind) and keep it float16, or pass no buffer")
    return buffer.copy_(value)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``scale[n] = max|w[n]| / 127`` (fp32), ``q = round(w / scale)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class ActivationBuffer:
    """Pre-allocated activation buffers of a W8A8 SigLIP encoder, viewed for the current ``tokens = batch × seq``.

    fp16: ``qkv_proj_act_buffer [T, 3C]``, ``in_out_fc2_act_buffer [T, C]`` and ``fc1_buffer [T, I]`` share one
    allocation (each is consumed before the next overwrites it, as in tinychat); int8:
    ``quantized_hidden_states_buffer [T, C]`` and ``quantized_mlp_act_buffer [T, I]`` share one; fp32
    ``quantized_scale_buffer [T, 1]`` and ``quantized_sum_buffer [T, 1]``. :meth:`bind` re-allocates only when
    ``tokens`` exceeds the capacity (``allocations`` counts allocations).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype: torch.dtype = torch.float16):
        self.hidden_size, self.intermediate_size = int(hidden_size), int(intermediate_size)
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.capacity = 0
        self.tokens = 0
        self.allocations = 0

    @classmethod
    def for_encoder(cls, module: nn.Module) -> "ActivationBuffer":
        """Sized from a transformers ``SiglipEncoder`` (config + weight device)."""
        device = next(module.parameters()).device
        return cls(module.config.hidden_size, module.config.intermediate_size, device)

    def allocate_activation_buffer(self, tokens: int) -> None:
        """Allocate for ``tokens`` rows (tinychat's name) and bind the views."""
        c, i, t = self.hidden_size, self.intermediate_size, int(tokens)
        if t <= 0:
            raise ValueError(f"cannot allocate activation buffers for {t} tokens; batch × sequence must be positive")
        self._act = torch.empty(t * max(3 * c, i), dtype=self.dtype, device=self.device)
        self._q = torch.empty(t * max(c, i), dtype=torch.int8, device=self.device)
        self._scale = torch.empty(t, 1, dtype=torch.float32, device=self.device)
        self._sum = torch.empty(t, 1, dtype=torch.float32, device=self.device)
        self.capacity = t
        self.allocations += 1
        self._views(t)

    def bind(self, tokens: int, device: torch.device | str | None = None) -> "ActivationBuffer":
        """Views for ``tokens`` rows; (re-)allocates first when the allocation is too small or on another device
        than ``device`` (the activations' device). Returns ``self``."""
        if device is not None and torch.device(device) != self.device:
            self.device = torch.device(device)
            self.allocate_activation_buffer(max(tokens, self.capacity))
        elif tokens > self.capacity:
            self.allocate_activation_buffer(tokens)
        elif tokens != self.tokens:
            self._views(tokens)
        return self

    def _views(self, t: int) -> None:
        c, i = self.hidden_size, self.intermediate_size
        self.tokens = t
        self.qkv_proj_act_buffer = self._act[: t * 3 * c].view(t, 3 * c)
        self.in_out_fc2_act_buffer = self._act[: t * c].view(t, c)
        self.fc1_buffer = self._act[: t * i].view(t, i)
        self.quantized_hidden_states_buffer = self._q[: t * c].view(t, c)
        self.quantized_mlp_act_buffer = self._q[: t * i].view(t, i)
        self.quantized_scale_buffer = self._scale[:t]
        self.quantized_sum_buffer = self._sum[:t]


class W8A8OF16LinearDynamicInputScale(nn.Module):
    """int8 weight × per-token int8 activation linear: exact int32 accumulation, fp16 (``out_dtype``) output.

    ``forward(x_int8 [..., K], x_scale fp32 [..., 1], output_buffer=None) -> y [..., N]`` with
    ``y = acc * x_scale * w_scale + bias`` (``vlmx::w8a8_linear``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, out_dtype: str = "float16",
                 device=None):
        super().__init__()
        if out_dtype not in ("float16", "float32"):
            raise ValueError(f"out_dtype={out_dtype!r} is not supported; choose 'float16' or 'float32'")
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=getattr(torch, out_dtype), device=device)
                             if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: str = "float16"):
        """Quantize a float weight ``[N, K]`` per output channel; the bias is kept in ``out_dtype``."""
        n, k = weight.shape
        mod = cls(k, n, bias is not None, out_dtype, device=weight.device)
        mod.weight, mod.w_scale = quantize_weight_per_channel(weight)
        if bias is not None:
            mod.bias = bias.detach().to(getattr(torch, out_dtype)).clone()
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: str = "float16"):
        return cls.from_weight(linear.weight, linear.bias, out_dtype)

    @classmethod
    def from_qkv(cls, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_dtype: str = "float16"):
        """One linear with output rows ``[q | k | v]`` (per-channel scales make this the same as three)."""
        projs = (q_proj, k_proj, v_proj)
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features, device=p.weight.device)
                  for p in projs]
        has_bias = any(p.bias is not None for p in projs)
        return cls.from_weight(torch.cat([p.weight.detach().float() for p in projs]),
                               torch.cat([b.detach().float() for b in biases]) if has_bias else None, out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, out_dtype={self.out_dtype}"

    def forward(self, x: torch.Tensor, x_scale: torch.Tensor, output_buffer: torch.Tensor | None = None):
        if x.dtype != torch.int8 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected int8 activations [..., {self.in_features}], got {x.dtype} "
                             f"{tuple(x.shape)}; quantize them per token first (vlmx::quantize_per_token)")
        # module.to(dtype) casts floating buffers too; the op wants fp32 w_scale and a bias in the output dtype
        out = getattr(torch, self.out_dtype)
        w_scale = self.w_scale if self.w_scale.dtype == torch.float32 else self.w_scale.float()
        bias = self.bias if self.bias is None or self.bias.dtype == out else self.bias.to(out)
        y = torch.ops.vlmx.w8a8_linear(x, x_scale, self.weight, w_scale, bias, out_dtype=self.out_dtype)
        return _store(output_buffer, y)


class RMSNormGeneral(nn.Module):
    """RMSNorm or LayerNorm (fp32 statistics) fused with int8 quantization (``vlmx::norm_quant``).

    ``mode``: ``"rmsnorm"`` (default) or ``"layernorm"`` (SigLIP). ``use_per_token_quant``: dynamic per-token scale,
    else the per-tensor ``static_scale``. ``forward(x, quantized_hidden_states_buffer, quantized_scale_buffer,
    quantized_sum_buffer=None)`` returns ``(q int8, scale fp32 [..., 1], sum fp32 [..., 1])``; given buffers (may be
    None) receive the results in eager mode and are what is returned.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-6,
                 use_per_token_quant: bool = True, *, mode: str = "rmsnorm", static_scale: float = 1.0,
                 clip_range: float = 0.0):
        super().__init__()
        if mode not in NORM_MODES:
            raise ValueError(f"norm mode {mode!r} is not known; choose one of {list(NORM_MODES)}")
        if not use_per_token_quant and not static_scale > 0:
            raise ValueError(f"per-tensor quantization needs static_scale > 0, got {static_scale}; pass the "
                             "calibrated per-tensor scale or use_per_token_quant=True")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.variance_epsilon, self.use_per_token_quant = float(eps), bool(use_per_token_quant)
        self.mode, self.static_scale, self.clip_range = mode, float(static_scale), float(clip_range)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, mode={self.mode}, eps={self.variance_epsilon}, "
                f"per_token={self.use_per_token_quant}, clip_range={self.clip_range}")

    def forward(self, x: torch.Tensor, quantized_hidden_states_buffer: torch.Tensor | None = None,
                quantized_scale_buffer: torch.Tensor | None = None, quantized_sum_buffer: torch.Tensor | None = None):
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        q, scale, total = torch.ops.vlmx.norm_quant(
            x, w, b, mode=self.mode,
            eps=self.variance_epsilon, per_token=int(self.use_per_token_quant), static_scale=self.static_scale,
            clip_range=self.clip_range)
        return (_store(quantized_hidden_states_buffer, q), _store(quantized_scale_buffer, scale),
                _store(quantized_sum_buffer, total))


class QuantSiglipFlashAttention2(hf_siglip.SiglipAttention):
    """SigLIP self-attention: W8A8 fused ``qkv_proj``, attention via :func:`attend`, per-token quant, W8A8 out."""

    def __init__(self, module: nn.Module):
        nn.Module.__init__(self)  # not SiglipAttention.__init__: no float q/k/v/out projections
        self.embed_dim, self.num_heads = module.embed_dim, module.num_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = float(getattr(module, "scale", self.head_dim ** -0.5))
        self.qkv_proj = W8A8OF16LinearDynamicInputScale.from_qkv(module.q_proj, module.k_proj, module.v_proj)
        self.out_proj = W8A8OF16LinearDynamicInputScale.from_linear(module.out_proj)
        self.attn_impl = "eager"

    def forward(self, q_in: torch.Tensor, scale_in: torch.Tensor, bsz: int, seqlen: int,
                attention_mask: torch.Tensor | None = None, buffer: ActivationBuffer | None = None,
                output_attentions: bool = False):
        """int8 ``q_in [T, C]`` (T = bsz·seqlen) → fp16 ``[T, C]`` and the attention weights (or None)."""
        qkv = self.qkv_proj(q_in, scale_in, buffer and buffer.qkv_proj_act_buffer)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(bsz, seqlen, 3, self.num_heads, self.head_dim).unbind(2))
        o, weights = attend(q, k, v, scale=self.scale, bias=additive_mask(attention_mask, q.dtype),
                            impl=check_impl(self.attn_impl), need_weights=output_attentions)
        o = o.transpose(1, 2).reshape(-1, self.embed_dim)
        oq, oscale = torch.ops.vlmx.quantize_per_token(o)
        oq = _store(buffer and buffer.quantized_hidden_states_buffer, oq)
        oscale = _store(buffer and buffer.quantized_scale_buffer, oscale)
        return self.out_proj(oq, oscale, buffer and buffer.in_out_fc2_act_buffer), weights


class QuantSiglipMLP(nn.Module):
    """fc1 (W8A8) → gelu_and_quant (``vlmx::gelu_quant``) → fc2 (W8A8); int8 in, fp16 out."""

    def __init__(self, module: nn.Module):
        super().__init__()
        act = getattr(module.config, "hidden_act", "gelu_pytorch_tanh")
        if act not in _GELU_APPROX:
            raise ValueError(f"hidden_act={act!r} has no fused GeluQuant; supported: {sorted(_GELU_APPROX)}")
        self.approximate = _GELU_APPROX[act]
        self.fc1 = W8A8OF16LinearDynamicInputScale.from_linear(module.fc1)
        self.fc2 = W8A8OF16LinearDynamicInputScale.from_linear(module.fc2)

    def forward(self, q_in: torch.Tensor, scale_in: torch.Tensor, buffer: ActivationBuffer | None = None):
        h = self.fc1(q_in, scale_in, buffer and buffer.fc1_buffer)
        hq, hscale = torch.ops.vlmx.gelu_quant(h, approximate=self.approximate)
        hq = _store(buffer and buffer.quantized_mlp_act_buffer, hq)
        hscale = _store(buffer and buffer.quantized_scale_buffer, hscale)
        return self.fc2(hq, hscale, buffer and buffer.in_out_fc2_act_buffer)


class QuantSiglipEncoderLayer(hf_siglip.SiglipEncoderLayer):
    """One W8A8 SigLIP layer on ``[B, S, C]``: computes in fp16, returns ``(hidden in the input dtype, weights)``."""

    def __init__(self, module: nn.Module, clip_range: float = 0.0):
        nn.Module.__init__(self)  # not SiglipEncoderLayer.__init__: no float layers
        self.embed_dim = module.embed_dim

        def norm(ln: nn.LayerNorm) -> RMSNormGeneral:
            return RMSNormGeneral(ln.weight.detach().half(), ln.bias.detach().half() if ln.bias is not None else None,
                                  ln.eps, True, mode="layernorm", clip_range=clip_range)

        self.layer_norm1 = norm(module.layer_norm1)
        self.self_attn = QuantSiglipFlashAttention2(module.self_attn)
        self.layer_norm2 = norm(module.layer_norm2)
        self.mlp = QuantSiglipMLP(module.mlp)
        # keep transformers' output recorders if they were installed on the float modules already
        self._forward_hooks.update(module._forward_hooks)
        self.self_attn._forward_hooks.update(module.self_attn._forward_hooks)

    def forward(self, hidden_states: torch.Tensor, buffer: ActivationBuffer | None = None,
                attention_mask: torch.Tensor | None = None, output_attentions: bool = False):
        b, s, c = hidden_states.shape
        x = hidden_states.reshape(-1, c).to(torch.float16)
        bufs = (None, None, None) if buffer is None else (buffer.quantized_hidden_states_buffer,
                                                         buffer.quantized_scale_buffer, buffer.quantized_sum_buffer)
        q, scale, _ = self.layer_norm1(x, *bufs)
        attn, weights = self.self_attn(q, scale, b, s, attention_mask, buffer, output_attentions)
        x = x + attn
        q, scale, _ = self.layer_norm2(x, *bufs)
        x = x + self.mlp(q, scale, buffer)
        return x.view(b, s, c).to(hidden_states.dtype), weights


class QuantSiglipEncoder(nn.Module):
    """W8A8 replacement of a transformers ``SiglipEncoder``: same forward signature, returns ``BaseModelOutput``.

    Quantizes the encoder's Linear weights (per-output-channel symmetric int8) and casts norms to fp16. Computes in
    fp16 and returns ``last_hidden_state`` (and ``hidden_states``) in the dtype of ``inputs_embeds``. ``bsz`` ×
    ``seqlen`` sizes the initial :class:`ActivationBuffer`.
    """

    def __init__(self, module: nn.Module, bsz: int = 64, seqlen: int = 1024, clip_range: float = 0.0):
        super().__init__()
        if not hasattr(module, "layers") or not hasattr(module, "config"):
            raise TypeError(f"QuantSiglipEncoder wraps a transformers SiglipEncoder (with .layers and .config), got "
                            f"{type(module).__name__}; pass model.encoder of a SiglipVisionModel")
        self.config = module.config
        self.layers = nn.ModuleList(QuantSiglipEncoderLayer(layer, clip_range) for layer in module.layers)
        self.buffer = ActivationBuffer.for_encoder(module)
        self.bsz, self.seqlen = int(bsz), int(seqlen)
        self.buffer.allocate_activation_buffer(self.bsz * self.seqlen)
        self.use_buffer = True

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got "
                             f"{tuple(inputs_embeds.shape)}")
        bsz, seqlen, _ = inputs_embeds.shape
        buffer = None
        if self.use_buffer and _eager():
            buffer = self.buffer.bind(bsz * seqlen, inputs_embeds.device)
            self.bsz, self.seqlen = bsz, seqlen
        want_hidden = bool(output_hidden_states if output_hidden_states is not None
                           else getattr(self.config, "output_hidden_states", False))
        want_attn = bool(output_attentions if output_attentions is not None
                         else getattr(self.config, "output_attentions", False))
        h = inputs_embeds
        states, attentions = [], []
        for layer in self.layers:
            if want_hidden:
                states.append(h)
            h, weights = layer(h, buffer, attention_mask, want_attn)
            if want_attn:
                attentions.append(weights)
        if want_hidden:
            states.append(h)
        out = BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) if want_hidden else None,
                              attentions=tuple(attentions) if want_attn else None)
        if return_dict is False:
            return out.to_tuple()
        return out

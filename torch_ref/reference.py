"""Reference kernels for the vlmx ops, in plain torch (fp32 math, exact integer GEMM).

These define the semantics every other implementation (ONNX function bodies, CUDA, Triton, TensorRT plugins) is
tested against. Signatures mirror :mod:`vlmx.torch_ref.op_table`: tensor inputs first, then attributes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .alibi import alibi_bias, gen_slopes
from .op_table import QMAX, QUANT_EPS


# ----------------------------------------------------------------------------------------------- quantization
def quantize_rows(x: torch.Tensor, clip_range: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: ``scale = max(max|x|, QUANT_EPS)/127``, ``q = rint(x/scale)`` in [-127, 127]."""
    xf = x.float()
    if clip_range > 0:
        xf = xf.clamp(-clip_range, clip_range)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(QUANT_EPS) / QMAX
    q = torch.round(xf / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor, clip_range: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """vlmx::quantize_per_token."""
    return quantize_rows(x, clip_range)


def gelu_quant(x: torch.Tensor, approximate: str = "tanh", clip_range: float = 0.0):
    """vlmx::gelu_quant: GELU in fp32, then per-token int8."""
    return quantize_rows(F.gelu(x.float(), approximate=approximate), clip_range)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, eps: float) -> torch.Tensor:
    """LayerNorm (mean-centred) or RMSNorm with fp32 statistics; bias added in both modes when given."""
    xf = x.float()
    if mode == "layernorm":
        xf = xf - xf.mean(dim=-1, keepdim=True)
    elif mode != "rmsnorm":
        raise ValueError(f"norm mode {mode!r} is not one of 'layernorm', 'rmsnorm'")
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def norm_quant(x, weight, bias=None, mode="layernorm", eps=1e-6, per_token=1, static_scale=1.0, clip_range=0.0):
    """vlmx::norm_quant: returns (q int8, scale [...,1] fp32, sum [...,1] fp32 of q*scale)."""
    y = norm(x, weight, bias, mode, eps)
    if per_token:
        q, scale = quantize_rows(y, clip_range)
    else:
        if clip_range > 0:
            y = y.clamp(-clip_range, clip_range)
        if not static_scale > 0:
            raise ValueError(f"norm_quant: static_scale must be > 0 for per-tensor quantization, got {static_scale}")
        q = torch.round(y / static_scale).clamp_(-QMAX, QMAX).to(torch.int8)
        scale = torch.full((*y.shape[:-1], 1), float(static_scale), dtype=torch.float32, device=x.device)
    total = (q.float() * scale).sum(dim=-1, keepdim=True)
    return q, scale, total


# ----------------------------------------------------------------------------------------------- int8 GEMM
def int8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``x[..., K] @ w[N, K]^T`` in int32 (torch._int_mm where its shape rules allow, else int64 math)."""
    if x.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"int8_matmul wants int8 operands, got {x.dtype} and {w.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[0]
    if m > 16 and k % 8 == 0 and n % 8 == 0 and k >= 16:
        try:
            return torch._int_mm(x2.contiguous(), w.t().contiguous()).reshape(*lead, n)
        except RuntimeError:
            pass
    # int64 accumulation is exact for any K below 2^49 / 127^2; the result always fits int32 for K < 133,000.
    return (x2.to(torch.int64) @ w.to(torch.int64).t()).to(torch.int32).reshape(*lead, n)


def w8a8_linear(x, x_scale, w, w_scale, bias=None, out_dtype="float16"):
    """vlmx::w8a8_linear: int32 accumulation, then ``acc * x_scale * w_scale + bias`` in fp32, cast to T."""
    acc = int8_matmul(x, w)
    y = acc.float() * x_scale.float() * w_scale.float()
    dtype = bias.dtype if bias is not None else getattr(torch, out_dtype)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# ----------------------------------------------------------------------------------------------- attention
def split_heads(q, k, v, num_heads: int, num_kv_heads: int, head_dim: int, layout: str):
    """Bring q/k/v of any vlmx layout to ``[B, H, S, D]`` / ``[B, Hkv, S, D]`` views."""
    if layout == "packed":
        b, s, c = q.shape
        if c != (num_heads + 2 * num_kv_heads) * head_dim:
            raise ValueError(f"packed qkv has {c} features; expected (H + 2*Hkv) * D = "
                             f"({num_heads} + 2*{num_kv_heads}) * {head_dim}")
        qkv = q.view(b, s, num_heads + 2 * num_kv_heads, head_dim)
        qh, kh, vh = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=2)
        return qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    if k is None or v is None:
        raise ValueError(f"layout {layout!r} needs k and v inputs")
    if layout == "bsd":
        b, sq, _ = q.shape
        return (q.view(b, sq, num_heads, head_dim).transpose(1, 2),
                k.view(b, k.shape[1], num_kv_heads, head_dim).transpose(1, 2),
                v.view(b, v.shape[1], num_kv_heads, head_dim).transpose(1, 2))
    if layout == "bhsd":
        return q, k, v
    raise ValueError(f"unknown attention layout {layout!r}")


def attention_mask(sq: int, sk: int, causal: bool, window: int, device=None, kv_len=None) -> torch.Tensor | None:
    """Boolean [Sq, Sk] (or [B, 1, Sq, Sk] with ``kv_len``) of allowed positions, bottom-right aligned to the valid
    length L (``kv_len[b]``, else Sk); None when everything is allowed."""
    if kv_len is None and not causal and window < 0:
        return None
    j = torch.arange(sk, device=device).view(1, -1)
    if kv_len is None:
        i = torch.arange(sq, device=device).view(-1, 1) + (sk - sq)
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    else:
        length = kv_len.to(device=device, dtype=torch.int64).view(-1, 1, 1, 1)
        i = torch.arange(sq, device=device).view(1, 1, -1, 1) + (length - sq)
        allowed = j.view(1, 1, 1, -1) < length
    if causal:
        allowed = allowed & (j <= i)
    if window >= 0:
        allowed = allowed & (j > i - window)
    return allowed


def flash_attention(q, k=None, v=None, bias=None, kv_len=None, num_heads=1, num_kv_heads=0, head_dim=64, scale=0.0,
                    causal=0, window=-1, alibi=0, alibi_bias_max=8, layout="bsd"):
    """vlmx::flash_attention reference (fp32 math). Fully masked rows give zeros, never NaN. ``kv_len`` [B]: only
    the first kv_len[b] keys of a fixed-size cache count; causal/ALiBi align to kv_len[b]."""
    hkv = num_kv_heads or num_heads
    if num_heads % hkv:
        raise ValueError(f"num_kv_heads={hkv} must divide num_heads={num_heads}")
    if kv_len is not None and layout == "packed":
        raise ValueError("kv_len needs separate k/v (a KV cache); the packed layout has none")
    qh, kh, vh = split_heads(q, k, v, num_heads, hkv, head_dim, layout)
    b, _, sq, _ = qh.shape
    sk = kh.shape[2]
    rep = num_heads // hkv
    kf = kh.float().repeat_interleave(rep, dim=1)
    vf = vh.float().repeat_interleave(rep, dim=1)
    s = torch.matmul(qh.float(), kf.transpose(-1, -2)) * (scale or head_dim ** -0.5)
    if alibi:
        if kv_len is None:
            s = s + alibi_bias(num_heads, sk, alibi_bias_max, device=q.device)
        else:  # slope_h * (j - (L_b - 1)), per row
            j = torch.arange(sk, dtype=torch.float32, device=q.device).view(1, 1, 1, sk)
            last = kv_len.to(device=q.device, dtype=torch.float32).view(-1, 1, 1, 1) - 1
            s = s + (j - last) * gen_slopes(num_heads, alibi_bias_max, device=q.device)
    if bias is not None:
        s = s + bias.float()
    allowed = attention_mask(sq, sk, bool(causal), window, device=q.device, kv_len=kv_len)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = o.to(q.dtype)
    if layout == "bhsd":
        return o
    return o.transpose(1, 2).reshape(b, sq, num_heads * head_dim)


# ----------------------------------------------------------------------------------------------- pruning
def token_importance(q_text, k_vis, num_heads=1, num_kv_heads=0, head_dim=64, scale=0.0):
    """vlmx::token_importance: ``mean_{h,t} softmax_n(scale * q_text k_vis^T)`` -> [B, N] float32."""
    hkv = num_kv_heads or num_heads
    b, t, _ = q_text.shape
    n = k_vis.shape[1]
    qh = q_text.float().view(b, t, num_heads, head_dim).transpose(1, 2)
    kh = k_vis.float().view(b, n, hkv, head_dim).transpose(1, 2).repeat_interleave(num_heads // hkv, dim=1)
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * (scale or head_dim ** -0.5), dim=-1)
    return p.mean(dim=(1, 2))


def topk_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending indices of the ``keep`` highest scores per row (ties: lower index first)."""
    n = scores.shape[-1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}] tokens, got {keep}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def gather_topk(x, scores, keep):
    """vlmx::gather_topk: (x_kept [B, keep, C] in original order, idx [B, keep] int64)."""
    k = int(keep.reshape(-1)[0]) if isinstance(keep, torch.Tensor) else int(keep)
    idx = topk_indices(scores, k)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), idx

"""MPT attention: float64 references, transformers' MPT parity (logits and KV-cache decoding), error paths."""
import copy
import math

import pytest
import torch
from transformers import DynamicCache, MptConfig, MptForCausalLM

from vlmx.torch_ref import alibi as alibi_mod
from vlmx.torch_ref import mpt_attention as mpt
from vlmx.torch_ref.hf_compat import cache_kwargs, output_cache

TOL_FP32 = 2e-6      # fp32 attention vs float64 reference
TOL_MODEL = 1e-5     # whole-model logits after swapping attention
TOL_FP16 = 2e-3      # fp16 inputs vs float64 reference
TOL_ALIBI = 1e-7     # ALiBi is computed in float32, like the seed


def check_close(out, ref, tol, name=""):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def ref_attention(q, k, v, n_heads, kvh, scale=None, bias=None, kpm=None, causal=False, alibi=False):
    """Plain float64 attention on flat [B, S, H*D] tensors."""
    b, sq, _ = q.shape
    sk = k.shape[1]
    d = q.shape[-1] // n_heads
    qh = q.double().view(b, sq, n_heads, d)
    kh = k.double().view(b, sk, kvh, d).repeat_interleave(n_heads // kvh, dim=2)
    vh = v.double().view(b, sk, kvh, d).repeat_interleave(n_heads // kvh, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qh, kh) * (scale if scale is not None else 1 / math.sqrt(d))
    if alibi:
        slopes = alibi_mod.gen_slopes(n_heads, return_1d=True).double()
        s = s + slopes.view(1, -1, 1, 1) * (torch.arange(sk, dtype=torch.float64) - (sk - 1))
    if bias is not None:
        s = s + bias.double()[:, :, -sq:, -sk:]
    if kpm is not None:
        s = s.masked_fill(~kpm.view(b, 1, 1, sk), -1e300)
    if causal:
        i = torch.arange(sq).view(-1, 1) + (sk - sq)
        s = s.masked_fill(torch.arange(sk).view(1, -1) > i, -1e300)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vh).reshape(b, sq, -1), p


SHAPES = [  # (batch, s_q, s_k, heads, kv_heads, head_dim)
    (2, 7, 7, 4, 4, 16),     # prefill MHA
    (1, 1, 9, 6, 6, 8),      # decode step, non-power-of-two heads (interleaved ALiBi slopes)
    (2, 5, 12, 8, 1, 32),    # MQA with a cached prefix
    (1, 13, 13, 8, 2, 16),   # GQA, odd length
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "sdpa", "vlmx"])
def test_functional_attention_matches_float64(shape, impl):
    b, sq, sk, h, hkv, d = shape
    torch.manual_seed(1)
    q = torch.randn(b, sq, h * d)
    k, v = torch.randn(b, sk, hkv * d), torch.randn(b, sk, hkv * d)
    bias = torch.randn(1, 1, sk + 3, sk + 3)  # longer than needed: the seed slices the last (sq, sk)
    kpm = torch.ones(b, sk, dtype=torch.bool)
    kpm[0, 1] = False  # a padded key that is never the only visible one (fully masked rows are ill-defined)
    past = (k[:, : sk - sq].view(b, -1, hkv, d).transpose(1, 2), v[:, : sk - sq].view(b, -1, hkv, d).transpose(1, 2))
    out, w, present = mpt.scaled_multihead_dot_product_attention(
        q, k[:, sk - sq:], v[:, sk - sq:], h, past_key_value=past, softmax_scale=0.3, attn_bias=bias,
        key_padding_mask=kpm, is_causal=True, kv_n_heads=hkv, alibi=True, impl=impl)
    ref, _ = ref_attention(q, k, v, h, hkv, 0.3, bias, kpm, causal=True, alibi=True)
    check_close(out, ref, TOL_FP32, f"{impl} {shape}")
    assert w is None and present[0].shape == (b, hkv, sk, d)
    check_close(present[1].transpose(1, 2).reshape(b, sk, -1), v, 0.0, "cached values")


def test_needs_weights_multiquery_flag_and_dropout():
    torch.manual_seed(2)
    b, s, h, d = 2, 6, 4, 8
    q, k, v = torch.randn(b, s, h * d), torch.randn(b, s, d), torch.randn(b, s, d)
    out, w, present = mpt.scaled_multihead_dot_product_attention(q, k, v, h, is_causal=True, needs_weights=True,
                                                                 multiquery=True)
    ref, p = ref_attention(q, k, v, h, 1, causal=True)
    check_close(out, ref, TOL_FP32, "multiquery")
    check_close(w, p, TOL_FP32, "weights")
    assert present is None
    assert torch.allclose(w.sum(-1), torch.ones(b, h, s))
    # dropout only in training: eval output is the reference; training zeroes weights and rescales the rest by 2
    out_eval, _, _ = mpt.scaled_multihead_dot_product_attention(q, k, v, h, is_causal=True, multiquery=True,
                                                                dropout_p=0.5, training=False)
    check_close(out_eval, ref, TOL_FP32, "dropout in eval")
    out_tr, w_tr, _ = mpt.scaled_multihead_dot_product_attention(q, k, v, h, is_causal=True, multiquery=True,
                                                                 dropout_p=0.5, training=True, needs_weights=True)
    dropped = w_tr == 0
    assert dropped.any() and (~dropped).any()
    check_close(w_tr[~dropped], 2 * p.float()[~dropped], TOL_FP32, "kept weights x 1/(1-p)")
    vh = v.view(b, s, 1, d).transpose(1, 2)
    check_close(out_tr, (w_tr @ vh).transpose(1, 2).reshape(b, s, -1), TOL_FP32, "dropout output")


def test_fp16_inputs_match_float64():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 9, 4 * 16).half() for _ in range(3))
    out, _, _ = mpt.scaled_multihead_dot_product_attention(q, k, v, 4, is_causal=True, alibi=True)
    assert out.dtype == torch.float16
    check_close(out, ref_attention(q, k, v, 4, 4, causal=True, alibi=True)[0], TOL_FP16, "fp16")


@pytest.mark.parametrize("n_heads", [1, 4, 6, 12, 32])
def test_alibi_biases(n_heads):
    assert mpt.gen_slopes is alibi_mod.gen_slopes
    s = 10
    slopes = mpt.gen_slopes(n_heads).view(n_heads, 1, 1).double()
    j = torch.arange(s, dtype=torch.float64)
    causal = mpt.build_alibi_bias(n_heads, s, dtype=torch.float64)
    assert causal.shape == (1, n_heads, 1, s)
    check_close(causal[0], slopes * (j - (s - 1)).view(1, 1, s), TOL_ALIBI, "causal alibi")
    full = mpt.build_alibi_bias(n_heads, s, full=True, dtype=torch.float64)
    assert full.shape == (1, n_heads, s, s)
    check_close(full[0], -slopes * (j.view(-1, 1) - j.view(1, -1)).abs(), TOL_ALIBI, "full alibi")
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor  # the parity target's alibi
    check_close(causal[0].float(), build_mpt_alibi_tensor(n_heads, s), 0.0, "vs transformers")


def test_attn_bias_shape_and_build():
    assert mpt.attn_bias_shape("torch", 8, 16, alibi=True, prefix_lm=False, causal=True, use_sequence_id=False) \
        == (1, 8, 1, 16)
    assert mpt.attn_bias_shape("torch", 8, 16, True, False, False, False) == (1, 8, 16, 16)
    assert mpt.attn_bias_shape("torch", 8, 16, False, True, True, False) == (1, 1, 16, 16)
    assert mpt.attn_bias_shape("vlmx", 8, 16, False, False, True, False) is None
    base = torch.zeros(1, 8, 1, 16)
    check_close(mpt.build_attn_bias("torch", base, 8, 16, causal=True, alibi=True),
                mpt.build_alibi_bias(8, 16), 0.0, "build_attn_bias")
    assert mpt.build_attn_bias("torch", None, 8, 16, alibi=True) is None
    with pytest.raises(ValueError, match="attn_impl='cuda' is not known"):
        mpt.attn_bias_shape("cuda", 8, 16, True, False, True, False)


def ref_module(mod, x, kpm=None):
    """The module's math in float64 from its own weights (plain reference for MQA/GQA, which HF MPT lacks)."""
    qkv = x.double() @ mod.Wqkv.weight.double().t() + mod.Wqkv.bias.double()
    if mod.clip_qkv:
        qkv = qkv.clamp(-mod.clip_qkv, mod.clip_qkv)
    kvd = mod.kv_n_heads * mod.head_dim
    q, k, v = qkv.split([mod.d_model, kvd, kvd], dim=-1)
    if mod.qk_ln:
        q = torch.nn.functional.layer_norm(q, (mod.d_model,), mod.q_ln.weight.double(), mod.q_ln.bias.double())
        k = torch.nn.functional.layer_norm(k, (kvd,), mod.k_ln.weight.double(), mod.k_ln.bias.double())
    o, _ = ref_attention(q, k, v, mod.n_heads, mod.kv_n_heads, mod.softmax_scale, kpm=kpm, causal=True,
                         alibi=mod.alibi)
    return o @ mod.out_proj.weight.double().t() + mod.out_proj.bias.double()


@pytest.mark.parametrize("cls_name", ["multiquery_attention", "multihead_attention"])
@pytest.mark.parametrize("impl", ["torch", "vlmx"])
def test_module_prefill_and_cached_decode(cls_name, impl):
    torch.manual_seed(4)
    mod = mpt.ATTN_CLASS_REGISTRY[cls_name](64, 8, attn_impl=impl, clip_qkv=1.5, qk_ln=True, alibi=True).eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial LayerNorm affine too
    assert mod.kv_n_heads == (1 if cls_name == "multiquery_attention" else 8)
    x = torch.randn(2, 10, 64)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, :2] = False
    with torch.no_grad():
        full, w, past = mod(x, attention_mask=kpm)
        ref = ref_module(mod, x, kpm)  # queries that see only padded keys are ill-defined: compare the real ones
        check_close(full[0], ref[0], TOL_FP32, f"{cls_name} prefill")
        check_close(full[1, 2:], ref[1, 2:], TOL_FP32, f"{cls_name} prefill (padded row)")
        assert past is None and w is None
        past, steps = (), []
        for t in range(10):
            y, _, past = mod(x[:, t:t + 1], past_key_value=past, attention_mask=kpm[:, : t + 1])
            steps.append(y)
    steps = torch.cat(steps, 1)  # padded queries see no key at all (ill-defined): compare the real tokens
    check_close(steps[0], full[0], TOL_FP32, f"{cls_name} token-by-token")
    check_close(steps[1, 2:], full[1, 2:], TOL_FP32, f"{cls_name} token-by-token (padded row)")
    assert past[0].shape == (2, mod.kv_n_heads, 10, 8)



@pytest.mark.parametrize("cls_name,kv_heads", [("multiquery_attention", 1), ("multihead_attention", 4)])
def test_vlmx_impl_exports_one_flash_attention_node_with_alibi(cls_name, kv_heads):
    mod = mpt.ATTN_CLASS_REGISTRY[cls_name](64, 4, attn_impl="vlmx", alibi=True).eval()
    ep = torch.export.export(mod, (torch.randn(1, 8, 64),))
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.vlmx.flash_attention.default]
    assert len(calls) == 1
    kw = calls[0].kwargs
    assert (kw["alibi"], kw["causal"], kw["num_heads"], kw["head_dim"]) == (1, 1, 4, 16)
    assert kw.get("num_kv_heads", 4) == kv_heads

def test_low_precision_layernorm_under_autocast():
    ln = mpt.LPLayerNorm(32)
    x = torch.randn(3, 32)
    check_close(ln(x), torch.nn.functional.layer_norm(x, (32,)), 0.0, "no autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    check_close(y, torch.nn.functional.layer_norm(x.bfloat16(), (32,)), 0.0, "bf16")


def test_kernel_impls_need_the_cuda_kernel(monkeypatch):
    x = torch.randn(1, 4, 32)
    for fn in (mpt.flash_attn_fn, mpt.triton_flash_attn_fn):
        with pytest.raises(RuntimeError, match="attn_impl='torch'"):
            fn(x, x, x, 4, is_causal=True)
    mod = mpt.MultiheadAttention(32, 4, attn_impl="flash")
    with pytest.raises(RuntimeError, match="attn_impl='torch'"):
        mod(x)
    # with the kernel "registered", the call routes through the vlmx op with the same semantics as torch
    monkeypatch.setattr(mpt, "vlmx_cuda_kernel_available", lambda: True)
    with pytest.raises(RuntimeError, match="float16 CUDA"):
        mpt.flash_attn_fn(x, x, x, 4)
    monkeypatch.setattr(mpt, "_require_kernel", lambda *a: None)
    out, _, _ = mpt.triton_flash_attn_fn(x, x, x, 4, is_causal=True, alibi=True)
    check_close(out, ref_attention(x, x, x, 4, 4, causal=True, alibi=True)[0], TOL_FP32, "kernel route")
    with pytest.raises(NotImplementedError, match="attention weights"):
        mpt.flash_attn_fn(x, x, x, 4, needs_weights=True)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="choose one of"):
        mpt.MultiheadAttention(32, 4, attn_impl="xformers")
    with pytest.raises(ValueError, match="divide n_heads"):
        mpt.GroupedQueryAttention(32, 4, 3)
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="does not broadcast"):
        mpt.scaled_multihead_dot_product_attention(x, x, x, 4, attn_bias=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mpt.scaled_multihead_dot_product_attention(x, x, x, 4, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no transformers MptAttention"):
        mpt.swap_mpt_attention(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ transformers MPT parity
@pytest.fixture(scope="module")
def hf_mpt():
    torch.manual_seed(5)
    cfg = MptConfig(d_model=96, n_heads=6, n_layers=2, vocab_size=300, max_seq_len=64,
                    attn_config={"alibi": True, "clip_qkv": 2.0})
    return MptForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["torch", "sdpa", "vlmx"])
def test_swapped_mpt_matches_transformers_logits(hf_mpt, impl):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: compare the real tokens
    swapped = mpt.swap_mpt_attention(copy.deepcopy(hf_mpt), impl)
    assert sum(isinstance(m, mpt.MptAttentionAdapter) for m in swapped.modules()) == 2
    with torch.no_grad():
        ref = hf_mpt(ids, attention_mask=mask).logits
        out = swapped(ids, attention_mask=mask).logits
    check_close(out[0], ref[0], TOL_MODEL, f"{impl} logits")
    check_close(out[1, 3:], ref[1, 3:], TOL_MODEL, f"{impl} logits (padded row)")


@pytest.mark.parametrize("impl", ["torch", "vlmx"])
def test_swapped_mpt_cached_decode_equals_full_forward(hf_mpt, impl):
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(7))
    swapped = mpt.swap_mpt_attention(copy.deepcopy(hf_mpt), impl, respect_attention_mask=False)
    with torch.no_grad():
        full = hf_mpt(ids).logits
        out = swapped(ids[:, :4], use_cache=True)  # prefill 4 tokens, then one at a time
        cache, steps = output_cache(out), [out.logits]
        assert isinstance(cache, DynamicCache)
        for t in range(4, 10):
            out = swapped(ids[:, t:t + 1], use_cache=True, **cache_kwargs(swapped, cache))
            assert output_cache(out) is cache
            steps.append(out.logits)
    assert cache.get_seq_length() == 10
    check_close(torch.cat(steps, 1), full, TOL_MODEL, f"{impl} cached decode vs transformers full forward")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the vlmx FlashAttention kernel")
@pytest.mark.parametrize("cls_name", ["multihead_attention", "multiquery_attention"])
def test_flash_impl_runs_the_vlmx_cuda_kernel(cls_name):
    from vlmx.plugins import cuda_ops

    cuda_ops.register()
    assert mpt.vlmx_cuda_kernel_available()
    torch.manual_seed(8)
    mod = mpt.ATTN_CLASS_REGISTRY[cls_name](512, 8, attn_impl="flash", clip_qkv=4.0, alibi=True).eval()
    mod, x = mod.half(), torch.randn(2, 37, 512).half()
    ref = ref_module(mod, x)  # float64 from the same fp16 weights and inputs
    mod, xg = mod.cuda(), x.cuda()
    with torch.no_grad():
        full, _, _ = mod(xg)
        past, steps = (), []
        for t in range(37):
            y, _, past = mod(xg[:, t:t + 1], past_key_value=past)
            steps.append(y)
    check_close(full.cpu(), ref, TOL_FP16, f"{cls_name} flash prefill")
    check_close(torch.cat(steps, 1).cpu(), ref, TOL_FP16, f"{cls_name} flash cached decode")

"""Fused CLIP attention: transformers parity before/after make_fused_vision_attn (vision, text with causal + padding
masks, CLIPModel, LLaVA), attention weights, tinychat's old call signature vs a float64 reference, torch.export."""
import copy

import pytest
import torch
from torch.export import Dim
from transformers import CLIPModel, CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip import modeling_clip as hf_clip

from vlmx.torch_ref.clip import (CLIPAttentionFused, CLIPEncoderLayer, additive_mask, fuse_clip_attention,
                                 make_fused_vision_attn)
from vlmx.torch_ref.models import build_model

TOL_FP32 = 1e-5      # the bound: fused model vs transformers, fp32
TOL_F64_REF = 2e-6   # fp32 module vs a float64 reference
IMPLS = ("eager", "sdpa", "vlmx")


def check_close(out, ref, tol, name=""):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def randomize_(model, seed):
    """Fresh non-zero random parameters (transformers initialises biases to 0 and LayerNorm to 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def set_impl(model, impl):
    n = 0
    for m in model.modules():
        if isinstance(m, CLIPAttentionFused):
            m.attn_impl = impl
            n += 1
    return n


def count(model):
    fused = sum(isinstance(m, CLIPAttentionFused) for m in model.modules())
    unfused = sum(isinstance(m, hf_clip.CLIPAttention) and not isinstance(m, CLIPAttentionFused)
                  for m in model.modules())
    return fused, unfused


def vision_config(hf_impl, hidden=64, heads=4):
    c = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, image_size=42, patch_size=14, hidden_act="quick_gelu")
    c._attn_implementation = hf_impl
    return c


def text_config(hf_impl):
    c = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    c._attn_implementation = hf_impl
    return c


def text_inputs(seed, padded):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    if padded:  # right padding, as CLIP tokenizers pad
        mask[1, 8:] = 0
        mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("hf_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("hidden,heads", [(64, 4), (96, 2)])
def test_vision_model_parity(hf_impl, hidden, heads):
    torch.manual_seed(10 + hidden)
    model = randomize_(CLIPVisionModel(vision_config(hf_impl, hidden, heads)).eval(), 1)
    px = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        ref = model(pixel_values=px)
        assert make_fused_vision_attn(model, "cpu") is model
        assert count(model) == (2, 0)
        for impl in IMPLS:
            set_impl(model, impl)
            out = model(pixel_values=px)
            check_close(out.last_hidden_state, ref.last_hidden_state, TOL_FP32, f"vision {hf_impl}->{impl}")
            check_close(out.pooler_output, ref.pooler_output, TOL_FP32, f"pooled {hf_impl}->{impl}")


@pytest.mark.parametrize("hooks_before", [True, False], ids=["recorder-installed-before", "installed-after"])
def test_vision_output_attentions(hooks_before):
    torch.manual_seed(3)
    model = randomize_(CLIPVisionModel(vision_config("eager")).eval(), 2)
    px = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        if hooks_before:  # transformers installs its recorder hooks on the unfused modules; they must carry over
            ref_attn = model(pixel_values=px, output_attentions=True).attentions
        else:
            ref_attn = copy.deepcopy(model)(pixel_values=px, output_attentions=True).attentions
            assert not getattr(model, "_output_capturing_hooks_installed", False)
        make_fused_vision_attn(model)
        for impl in IMPLS:  # asking for weights forces the eager path whatever attn_impl says
            set_impl(model, impl)
            out = model(pixel_values=px, output_attentions=True)
            assert len(out.attentions) == len(ref_attn) == 2
            for i, (a, r) in enumerate(zip(out.attentions, ref_attn)):
                assert a.shape == (2, 4, 10, 10)
                check_close(a, r, TOL_FP32, f"attention weights layer {i} ({impl})")


@pytest.mark.parametrize("hf_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_text_model_parity(hf_impl, padded):
    torch.manual_seed(20)
    model = randomize_(CLIPTextModel(text_config(hf_impl)).eval(), 5)
    ids, mask = text_inputs(7, padded)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        make_fused_vision_attn(model)
        assert count(model) == (2, 0)
        for impl in IMPLS:
            set_impl(model, impl)
            out = model(input_ids=ids, attention_mask=mask)
            check_close(out.last_hidden_state, ref.last_hidden_state, TOL_FP32, f"text {hf_impl}->{impl}")
            check_close(out.pooler_output, ref.pooler_output, TOL_FP32, f"text pooled {hf_impl}->{impl}")


def test_text_model_attention_weights_are_causal_and_padded():
    torch.manual_seed(21)
    model = randomize_(CLIPTextModel(text_config("eager")).eval(), 6)
    ids, mask = text_inputs(8, True)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        make_fused_vision_attn(model)
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for i, (a, r) in enumerate(zip(out, ref)):
        check_close(a, r, TOL_FP32, f"text attention weights layer {i}")
    upper = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert out[0][:, :, upper].abs().max() == 0, "future tokens received attention weight"
    assert out[0][2, :, :, 5:].abs().max() == 0, "padding tokens received attention weight"


def test_clip_model_and_idempotence():
    torch.manual_seed(30)
    cfg = CLIPConfig(text_config=text_config("sdpa").to_dict(), vision_config=vision_config("sdpa").to_dict(),
                     projection_dim=32)
    model = randomize_(CLIPModel(cfg).eval(), 9)
    ids, mask = text_inputs(9, True)
    px = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px)
        make_fused_vision_attn(model)
        assert count(model) == (4, 0)
        modules = [m for m in model.modules() if isinstance(m, CLIPAttentionFused)]
        make_fused_vision_attn(model)
        assert [m for m in model.modules() if isinstance(m, CLIPAttentionFused)] == modules, "second call re-fused"
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
    check_close(out.logits_per_image, ref.logits_per_image, TOL_FP32, "CLIPModel logits")
    check_close(out.text_embeds, ref.text_embeds, TOL_FP32, "CLIPModel text embeds")


def test_llava_vision_tower():
    model = build_model("llava-tiny", seed=4)
    randomize_(model.model.vision_tower, 12)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(13))
    n_lm = sum(1 for _ in model.model.language_model.modules())
    with torch.no_grad():
        ref = model.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states
        make_fused_vision_attn(model, "cpu")
        out = model.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states
    assert count(model) == (2, 0)
    assert sum(1 for _ in model.model.language_model.modules()) == n_lm, "the language model was modified"
    check_close(out[-2], ref[-2], TOL_FP32, "LLaVA feature layer -2")
    check_close(out[-1], ref[-1], TOL_FP32, "LLaVA last layer")


def ref_attention_f64(x, w, b, wo, bo, heads, mask):
    """float64 multi-head attention with separate q/k/v weights ``w = (wq, wk, wv)``."""
    bsz, s, c = x.shape
    d = c // heads
    q, k, v = (torch.nn.functional.linear(x.double(), wi.double(), bi.double()).view(bsz, s, heads, d).transpose(1, 2)
               for wi, bi in zip(w, b))
    p = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + mask.double(), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(bsz, s, c)
    return torch.nn.functional.linear(o, wo.double(), bo.double()), p


@pytest.mark.parametrize("seq", [7, 33])
def test_old_signature_vs_float64(seq):
    torch.manual_seed(40 + seq)
    cfg = vision_config("eager", 64, 4)
    hf = randomize_(hf_clip.CLIPAttention(cfg).eval(), seq)
    fused = fuse_clip_attention(hf)
    x = torch.randn(2, seq, 64)
    pad = torch.zeros(2, 1, 1, seq)
    pad[1, ..., seq - 3:] = torch.finfo(torch.float32).min
    causal = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1).expand(2, 1, seq, seq)
    ref, ref_p = ref_attention_f64(x, (hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight),
                                   (hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias), hf.out_proj.weight,
                                   hf.out_proj.bias, 4, (pad.double() + causal.double()).clamp_min(-1e300))
    with torch.no_grad():
        for impl in IMPLS:
            fused.attn_impl = impl
            out, weights = fused(x, pad.expand(2, 1, seq, seq), causal, False)
            assert weights is None
            check_close(out, ref, TOL_F64_REF, f"old signature ({impl})")
        out, weights = fused(x, pad.expand(2, 1, seq, seq), causal, True)
    check_close(weights, ref_p, TOL_F64_REF, "old signature weights")


def test_encoder_layer_matches_transformers():
    torch.manual_seed(50)
    cfg = vision_config("eager")
    ours = randomize_(CLIPEncoderLayer(cfg).eval(), 14)
    hf = hf_clip.CLIPEncoderLayer(cfg).eval()
    sd = {k: v for k, v in ours.state_dict().items() if "qkv_proj" not in k}
    for name, w in zip(("q_proj", "k_proj", "v_proj"), ours.self_attn.qkv_proj.weight.chunk(3)):
        sd[f"self_attn.{name}.weight"] = w
    for name, b in zip(("q_proj", "k_proj", "v_proj"), ours.self_attn.qkv_proj.bias.chunk(3)):
        sd[f"self_attn.{name}.bias"] = b
    hf.load_state_dict(sd)
    x = torch.randn(2, 11, 64)
    causal = torch.full((11, 11), torch.finfo(torch.float32).min).triu(1).expand(2, 1, 11, 11)
    with torch.no_grad():
        check_close(ours(x, None), hf(x, None), TOL_FP32, "encoder layer")
        check_close(ours(x, None, causal_attention_mask=causal), hf(x, causal), TOL_FP32, "encoder layer causal")


def test_additive_mask_forms():
    b = torch.tensor([[True, True, False]]).view(1, 1, 1, 3)
    m = additive_mask(b, torch.float32)
    assert m[0, 0, 0, :2].eq(0).all() and m[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert torch.equal(additive_mask(torch.tensor([[1, 1, 0]]), torch.float32), m)
    assert additive_mask(None, torch.float32) is None
    with pytest.raises(ValueError, match="4-D"):
        additive_mask(torch.ones(1, 3, 3), torch.float32)


def test_errors_name_the_problem():
    lin = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CLIPAttentionFused(64, 5, torch.nn.Linear(64, 192), lin)
    with pytest.raises(ValueError, match="expected 64 -> 192"):
        CLIPAttentionFused(64, 4, torch.nn.Linear(64, 128), lin)
    with pytest.raises(TypeError, match="not a CLIPAttention itself"):
        make_fused_vision_attn(hf_clip.CLIPAttention(vision_config("eager")))
    with pytest.raises(TypeError, match="expected a transformers CLIPAttention"):
        fuse_clip_attention(lin)
    attn = fuse_clip_attention(hf_clip.CLIPAttention(vision_config("eager")))
    attn.attn_impl = "flash"
    with pytest.raises(ValueError, match="choose one of"):
        attn(torch.randn(1, 3, 64))


@pytest.mark.parametrize("impl", ["vlmx", "eager"])
def test_export_fused_vision_model(impl):
    torch.manual_seed(60)
    model = randomize_(CLIPVisionModel(vision_config("sdpa")).eval(), 15)
    make_fused_vision_attn(model)
    set_impl(model, impl)
    px = torch.randn(2, 3, 42, 42)
    ep = torch.export.export(model, (), {"pixel_values": px}, dynamic_shapes={"pixel_values": {0: Dim("batch")}})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    n_flash = sum(t.startswith("vlmx.flash_attention") for t in targets)
    print(f"attn_impl={impl}: {n_flash} vlmx.flash_attention nodes")
    assert n_flash == (2 if impl == "vlmx" else 0)
    px3 = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        check_close(ep.module()(pixel_values=px3).last_hidden_state, model(pixel_values=px3).last_hidden_state,
                    TOL_F64_REF, f"exported ({impl}) vs eager, batch 3")

"""W8A8 SigLIP encoder: exact integer GEMM, weight/activation quantization, norm+quant, activation buffers,
accuracy vs the fp32 transformers encoder (hidden 128 and SigLIP's head_dim 72), drop-in use, torch.export."""
import pytest
import torch
from torch.export import Dim
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from vlmx.torch_ref.models import make_config
from vlmx.torch_ref.siglip_w8a8 import (CLIP_RANGE, ActivationBuffer, QuantSiglipEncoder, RMSNormGeneral,
                                        W8A8OF16LinearDynamicInputScale, quantize_weight_per_channel)

TOL_W8A8_ENCODER = 3e-2   # the bound: W8A8 encoder last_hidden_state vs fp32
TOL_INT8_ROW = 1e-2       # one per-token int8 quantization of a row (max error 1/254 of its max)
TOL_FP16_OUT = 1e-3       # fp16 rounding of an exact int8 GEMM


def check_close(out, ref, tol, name=""):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
    return err


def small_config():
    return SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


CONFIGS = {"hidden128-d32": small_config, "siglip-tiny-d72": lambda: make_config("llava-siglip-tiny").vision_config}


def random_encoder(cfg, seed):
    """A fp32 SiglipEncoder with fresh random weights, biases and LayerNorm affine (none of them zero)."""
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    enc = SiglipEncoder(cfg).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return enc


# ------------------------------------------------------------------------------------------------ integer GEMM
def test_int8_gemm_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(1)
    k = 4096  # sums reach ~6e7 > 2^24: a float32 accumulation would round partial sums
    x = torch.randint(90, 128, (37, k), generator=g, dtype=torch.int8)
    w = torch.randint(90, 128, (24, k), generator=g, dtype=torch.int8)
    x[::3] *= -1
    lin = W8A8OF16LinearDynamicInputScale(k, 24, bias=False, out_dtype="float32")
    lin.weight = w
    y = lin(x, torch.ones(37, 1))
    exact = x.long() @ w.long().t()
    assert exact.abs().max() > 2 ** 24 and exact.abs().max() < 2 ** 31
    assert torch.equal(y, exact.to(torch.float32)), "W8A8 GEMM is not the exact int32 accumulation"
    emulated = x.float() @ w.float().t()
    assert not torch.equal(emulated, exact.to(torch.float32)), "inputs too easy to tell exact from float math"


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (50, 144, 432), (729, 128, 304)])
def test_w8a8_linear_vs_int64_reference(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
        linear.bias.copy_(torch.randn(n, generator=g))
    lin = W8A8OF16LinearDynamicInputScale.from_linear(linear)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    xs = torch.rand(m, 1, generator=g) * 0.05 + 1e-3
    y = lin(x, xs)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    ref = (x.long() @ lin.weight.long().t()).double() * xs.double() * lin.w_scale.double() + lin.bias.double()
    check_close(y, ref, TOL_FP16_OUT, f"w8a8 linear {m}x{k}x{n} vs int64")
    out = torch.empty(m, n, dtype=torch.float16)
    assert lin(x, xs, out) is out and torch.equal(out, y)


def test_weight_quantization_per_output_channel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 72, generator=g) * torch.logspace(-3, 1, 40).view(-1, 1)
    q, scale = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert torch.equal(q.abs().amax(1), torch.full((40,), 127, dtype=torch.int8))
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


# ------------------------------------------------------------------------------------------------ norm + quant
def ref_norm(x, w, b, mode, eps):
    x = x.double()
    if mode == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double() + b.double()


@pytest.mark.parametrize("mode", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_norm_quant_per_token(mode, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(60, 144, generator=g) * 3 + 1).to(dtype)
    w, b = (1 + 0.2 * torch.randn(144, generator=g)).to(dtype), (0.1 * torch.randn(144, generator=g)).to(dtype)
    norm = RMSNormGeneral(w, b, 1e-6, True, mode=mode)
    qbuf, sbuf, sumbuf = torch.empty(60, 144, dtype=torch.int8), torch.empty(60, 1), torch.empty(60, 1)
    q, scale, total = norm(x, qbuf, sbuf, sumbuf)
    assert q is qbuf and scale is sbuf and total is sumbuf, "eager mode must return the filled buffers"
    ref = ref_norm(x, w, b, mode, 1e-6)
    check_close(q.float() * scale, ref, TOL_INT8_ROW, f"{mode} {dtype} dequantized")
    torch.testing.assert_close(total, (q.float() * scale).sum(-1, keepdim=True))
    q2, s2, _ = norm(x, None, None)
    assert torch.equal(q2, q) and torch.equal(s2, scale)


def test_norm_quant_per_tensor_and_clip():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 64, generator=g, dtype=torch.float32) * 2
    w, b = 1 + 0.5 * torch.rand(64, generator=g), 0.3 * torch.randn(64, generator=g)
    ref = ref_norm(x, w, b, "layernorm", 1e-6)
    static = float(ref.abs().max()) / 127
    q, scale, _ = RMSNormGeneral(w, b, use_per_token_quant=False, mode="layernorm", static_scale=static)(x)
    assert torch.all(scale == static)
    check_close(q.float() * scale, ref, TOL_INT8_ROW, "per-tensor layernorm")
    q, scale, _ = RMSNormGeneral(w, b, mode="layernorm", clip_range=1.0)(x)
    deq = q.float() * scale
    assert deq.abs().max() <= 1.0 + 1e-6 and ref.abs().max() > 1.5
    check_close(deq, ref.clamp(-1, 1), TOL_INT8_ROW, "clipped layernorm")


# ------------------------------------------------------------------------------------------------ buffers
def test_activation_buffer_grows_only_when_needed():
    buf = ActivationBuffer(144, 304)
    buf.allocate_activation_buffer(2 * 50)
    ptr = buf.quantized_hidden_states_buffer.data_ptr()
    buf.bind(1 * 50)
    assert buf.allocations == 1 and buf.quantized_hidden_states_buffer.data_ptr() == ptr
    assert buf.qkv_proj_act_buffer.shape == (50, 432) and buf.fc1_buffer.shape == (50, 304)
    assert buf.quantized_mlp_act_buffer.shape == (50, 304) and buf.quantized_scale_buffer.shape == (50, 1)
    buf.bind(3 * 50)
    assert buf.allocations == 2 and buf.capacity == 150 and buf.in_out_fc2_act_buffer.shape == (150, 144)
    buf.bind(10, "meta")  # activations on another device: re-allocated there
    assert buf.allocations == 3 and buf.quantized_scale_buffer.device.type == "meta" and buf.capacity == 150
    with pytest.raises(ValueError, match="must be positive"):
        buf.allocate_activation_buffer(0)


def test_encoder_buffer_reuse_and_functional_path_agree():
    enc = random_encoder(small_config(), 5)
    qenc = QuantSiglipEncoder(enc, bsz=2, seqlen=20)
    assert qenc.buffer.allocations == 1 and qenc.buffer.capacity == 40
    g = torch.Generator().manual_seed(6)
    x_small, x_big = torch.randn(1, 30, 128, generator=g), torch.randn(3, 20, 128, generator=g)
    with torch.no_grad():
        y_small = qenc(x_small).last_hidden_state
        assert qenc.buffer.allocations == 1, "a smaller batch×seq must reuse the buffers"
        y_big = qenc(x_big).last_hidden_state
        assert qenc.buffer.allocations == 2 and qenc.buffer.capacity == 60, "a larger batch×seq must grow them"
        qenc(x_small)
        assert qenc.buffer.allocations == 2
        qenc.use_buffer = False
        assert torch.equal(qenc(x_small).last_hidden_state, y_small), "buffered and functional paths differ"
        assert torch.equal(qenc(x_big).last_hidden_state, y_big)


# ------------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("impl", ["eager", "vlmx"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_encoder_accuracy_vs_fp32(config, impl):
    enc = random_encoder(CONFIGS[config](), 7)
    qenc = QuantSiglipEncoder(enc, bsz=2, seqlen=50)
    for m in qenc.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = impl
    x = torch.randn(2, 50, enc.config.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = enc(inputs_embeds=x).last_hidden_state
        out = qenc(inputs_embeds=x)
    assert out.last_hidden_state.dtype == torch.float32
    err = check_close(out.last_hidden_state, ref, TOL_W8A8_ENCODER, f"W8A8 encoder {config} ({impl}) vs fp32")
    assert err > 1e-4, "suspiciously exact: is the encoder quantized at all?"


def test_clip_range_reaches_the_norms():
    enc = random_encoder(small_config(), 9)
    with torch.no_grad():
        for layer in enc.layers:
            layer.layer_norm1.weight.mul_(4.0)  # push norm outputs past CLIP_RANGE
    x = torch.randn(1, 20, 128, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        plain = QuantSiglipEncoder(enc, 1, 20)(x).last_hidden_state
        clipped = QuantSiglipEncoder(enc, 1, 20, clip_range=CLIP_RANGE)(x).last_hidden_state
    assert CLIP_RANGE == 5
    assert not torch.equal(plain, clipped)


def test_outputs_like_transformers_encoder():
    enc = random_encoder(small_config(), 11)
    qenc = QuantSiglipEncoder(enc, bsz=1, seqlen=16)
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(12)).half()
    with torch.no_grad():
        out = qenc(x, output_hidden_states=True, output_attentions=True)
        tup = qenc(x, return_dict=False)
    assert out.last_hidden_state.dtype == torch.float16
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[0], x)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state) and torch.equal(tup[0], out.last_hidden_state)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(out.attentions[0].float().sum(-1), torch.ones(2, 4, 16), atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_drop_in_siglip_vision_model(dtype):
    """The W8A8 encoder inside a transformers SiglipVisionModel: outputs, LLaVA's feature layer (-2) through
    transformers' hidden-state recorder, attention weights; in fp32 and fp16 models."""
    cfg = make_config("llava-siglip-tiny").vision_config
    cfg._attn_implementation = "eager"
    torch.manual_seed(13)
    model = SiglipVisionModel(cfg).eval()
    model.encoder = random_encoder(cfg, 14)
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        ref = model(pixel_values=px, output_hidden_states=True)
        model.encoder = QuantSiglipEncoder(model.encoder, bsz=2, seqlen=16)
        model.to(dtype)
        out = model(pixel_values=px.to(dtype), output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.dtype == dtype and out.hidden_states[-2].dtype == dtype
    check_close(out.last_hidden_state, ref.last_hidden_state, TOL_W8A8_ENCODER, f"SiglipVisionModel W8A8 ({dtype})")
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    check_close(out.hidden_states[-2], ref.hidden_states[-2], TOL_W8A8_ENCODER, f"feature layer -2 ({dtype})")
    assert len(out.attentions) == cfg.num_hidden_layers and out.attentions[0].shape == (2, 2, 16, 16)


def test_export_dynamic_batch_and_sequence():
    enc = random_encoder(small_config(), 16)
    qenc = QuantSiglipEncoder(enc, bsz=2, seqlen=24, clip_range=CLIP_RANGE)
    for m in qenc.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "vlmx"
    before = qenc.buffer.allocations, qenc.buffer.quantized_scale_buffer.clone()
    x = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(17))
    ep = torch.export.export(qenc, (x,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    # Bitwise: the scale buffer is allocated uninitialised and may hold NaN patterns, which torch.equal calls unequal.
    assert qenc.buffer.allocations == before[0] and torch.equal(qenc.buffer.quantized_scale_buffer.view(torch.int32),
                                                               before[1].view(torch.int32))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("vlmx.")]
    found = {str(n.target).split(".")[1] for n in nodes}
    print("vlmx ops in the exported graph:", sorted(found), len(nodes), "nodes")
    assert found == {"norm_quant", "w8a8_linear", "quantize_per_token", "gelu_quant", "flash_attention"}
    per_layer = {"norm_quant": 2, "w8a8_linear": 4, "quantize_per_token": 1, "gelu_quant": 1, "flash_attention": 1}
    for op, n in per_layer.items():
        assert sum(str(x.target) == f"vlmx.{op}.default" for x in nodes) == 2 * n
    assert all(n.kwargs.get("clip_range") == CLIP_RANGE for n in nodes if "norm_quant" in str(n.target))
    x2 = torch.randn(3, 37, 128, generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        assert torch.equal(ep.module()(x2).last_hidden_state, qenc(x2).last_hidden_state)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="norm mode 'batchnorm'"):
        RMSNormGeneral(torch.ones(4), None, mode="batchnorm")
    with pytest.raises(ValueError, match="static_scale > 0"):
        RMSNormGeneral(torch.ones(4), None, use_per_token_quant=False, static_scale=0.0)
    lin = W8A8OF16LinearDynamicInputScale(8, 4)
    with pytest.raises(ValueError, match="quantize them per token first"):
        lin(torch.randn(2, 8), torch.ones(2, 1))
    with pytest.raises(TypeError, match="wraps a transformers SiglipEncoder"):
        QuantSiglipEncoder(torch.nn.Linear(2, 2))
    cfg = small_config()
    cfg.hidden_act = "relu"
    with pytest.raises(ValueError, match="no fused GeluQuant"):
        QuantSiglipEncoder(random_encoder(cfg, 0), 1, 4)
    qenc = QuantSiglipEncoder(random_encoder(small_config(), 0), 1, 4)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, 128\]"):
        qenc(torch.randn(1, 4, 64))

"""SmoothQuant W8A8 for Llama-shaped language models (random weights with injected activation outliers, CPU):
smoothing preserves the float function, lowers the W8A8 error, GQA folding is exact, skip lists are honoured."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_export_helpers import assert_close, relative_error
from vlmx.torch_ref import lm_w8a8


def _llama(heads=4, kv_heads=2, layers=2, outliers=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    if outliers:  # a few large channels in the norm outputs and in v, as real LLMs have
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[[3, 17]] = torch.tensor([40.0, -25.0])
                layer.post_attention_layernorm.weight[5] = 30.0
                layer.self_attn.v_proj.weight[7] *= 20
                layer.mlp.up_proj.weight[11] *= 15
    return model


def _ids(seed=1, b=2, n=48):
    return torch.randint(0, 320, (b, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_smoothing_preserves_the_float_model(heads, kv_heads):
    model = _llama(heads, kv_heads)
    ids = _ids()
    ref = _logits(model, ids)
    smoothed = copy.deepcopy(model)
    plan = lm_w8a8.calibrate(smoothed, _ids(seed=2))
    assert any(a is not None for a in plan.alphas.values()), plan.alphas
    assert any(a is not None for k, a in plan.alphas.items() if k.endswith(".o")), "v→o (GQA) never smoothed"
    assert_close(_logits(smoothed, ids).numpy(), ref.numpy(), "fp32", f"smoothed float, {heads}/{kv_heads} heads")


def test_smoothing_lowers_w8a8_error_on_outliers():
    model = _llama()
    ids, calib = _ids(), _ids(seed=2)
    ref = _logits(model, ids)
    errs = {}
    for smooth in (False, True):
        q = copy.deepcopy(model)
        plan = lm_w8a8.quantize_lm(q, calib, smooth=smooth, skip=[])
        assert isinstance(q.model.layers[0].self_attn.q_proj, lm_w8a8.W8A8Linear)
        assert isinstance(q.lm_head, torch.nn.Linear)  # lm_head only when asked
        assert plan.skip == []
        errs[smooth] = relative_error(_logits(q, ids).numpy(), ref.numpy())
    print(f"W8A8 logits relative error: plain {errs[False]:.3e}, smoothquant {errs[True]:.3e}")
    assert errs[True] < 0.7 * errs[False], errs
    assert errs[True] < 3e-2


def test_w8a8_linear_is_the_vlmx_op_pair():
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    q, s = torch.ops.vlmx.quantize_per_token(x)
    w = lm_w8a8.W8A8Linear(lin)
    expect = torch.ops.vlmx.w8a8_linear(q, s, w.inner.weight, w.inner.w_scale, lin.bias.detach(),
                                        out_dtype="float32")
    torch.testing.assert_close(w(x), expect, rtol=0, atol=0)
    assert_close(w(x).detach().numpy(), lin(x).detach().numpy(), "w8a8", "W8A8Linear vs float")


def test_skip_lists_explicit_and_automatic():
    model = _llama(outliers=False)
    name = "model.layers.1.mlp.down_proj"
    q = copy.deepcopy(model)
    plan = lm_w8a8.quantize_lm(q, _ids(), skip=[name])
    assert plan.skip == [name]
    assert isinstance(q.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert isinstance(q.model.layers[0].mlp.down_proj, lm_w8a8.W8A8Linear)
    auto = lm_w8a8.calibrate(copy.deepcopy(model), _ids(), skip_threshold=0.0, max_skip=3)
    worst = sorted(auto.errors, key=auto.errors.get, reverse=True)[:3]
    assert auto.skip == worst and len(set(auto.errors)) == 2 * 7  # every linear measured once
    assert lm_w8a8.calibrate(copy.deepcopy(model), _ids(), skip_threshold=1.0).skip == []


def test_calibration_streams_layers_in_their_dtype():
    """fp16 models calibrate one layer at a time in float32 and come back in float16."""
    model = _llama().half()
    lm_w8a8.calibrate(model, _ids())
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_calibration_text_and_ids():
    text = lm_w8a8.calibration_text()
    assert len(text) == lm_w8a8.CALIB_CHARS and text == lm_w8a8.calibration_text()
    later = lm_w8a8.calibration_text(offset=lm_w8a8.CALIB_CHARS, chars=200)
    assert later and later not in text
    ids = lm_w8a8.calibration_ids(vocab_size=320, seq_len=64, num_seqs=3)
    assert ids.shape == (3, 64) and int(ids.max()) < 320
    with pytest.raises(ValueError, match="tokenizer or the vocab_size"):
        lm_w8a8.calibration_ids()
    with pytest.raises(ValueError, match="tokens"):
        lm_w8a8.calibration_ids(vocab_size=320, seq_len=10_000, num_seqs=10)


def test_not_a_llama_decoder_is_refused():
    with pytest.raises(TypeError, match="Llama-shaped"):
        lm_w8a8.decoder_parts(torch.nn.Sequential(torch.nn.Linear(4, 4)))

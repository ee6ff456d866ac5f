"""Model presets: full-size shapes (config / meta device only), tiny builds, checkpoint round trips and errors."""
import copy
import time

import numpy as np
import pytest
import torch

from vlmx.torch_ref import models
from vlmx.torch_ref.mpt_attention import MptAttentionAdapter, swap_mpt_attention

TINY = ["llava-tiny", "llava-siglip-tiny", "llava-mpt-tiny"]
TOL_SWAP = 1e-5


def check_close(out, ref, tol, name=""):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def test_llava_config_has_llava15_shapes():
    s, c = models.get_preset("llava"), models.make_config("llava")
    v, t = c.vision_config, c.text_config
    assert (s.vision, s.language, s.has_cls, s.feature_layer, s.select_strategy) == \
        ("clip", "llama", True, -2, "default")
    assert (v.model_type, v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == \
        ("clip_vision_model", 1024, 24, 16, 14, 336)
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == \
        ("llama", 4096, 32, 32, 11008)
    assert s.num_image_tokens == c.image_seq_length == 576
    assert c.projector_hidden_act == "gelu" and c.vision_feature_layer == -2
    # every parameter shape without allocating 7B parameters
    with torch.device("meta"):
        m = models.model_class("llava")(c)
    proj = m.model.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features, proj.linear_2.out_features) == (1024, 4096, 4096)
    assert sum(p.numel() for p in m.parameters()) == 7_063_427_072  # LLaVA-1.5-7B


def test_llava_siglip_config_has_so400m_shapes():
    s, c = models.get_preset("llava-siglip"), models.make_config("llava-siglip")
    v = c.vision_config
    assert (v.model_type, v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == \
        ("siglip_vision_model", 1152, 27, 16, 4304)
    assert (v.patch_size, v.image_size, s.vision_head_dim, s.has_cls, s.select_strategy) == (14, 384, 72, False, "full")
    assert s.num_image_tokens == c.image_seq_length == 729


def test_llava_mpt_config_has_mpt7b_shapes():
    s, c = models.get_preset("llava-mpt"), models.make_config("llava-mpt")
    t = c.text_config
    assert (t.model_type, t.d_model, t.n_heads, t.n_layers, t.vocab_size, t.attn_config.alibi) == \
        ("mpt", 4096, 32, 32, 50432, True)
    assert s.alibi and s.num_image_tokens == 576 and c.vision_config.model_type == "clip_vision_model"
    with torch.device("meta"):
        m = models.model_class("llava-mpt")(c)
    assert m.lm_head.weight is m.model.language_model.wte.weight  # MPT-7B ties its embeddings


@pytest.mark.parametrize("name", TINY)
def test_tiny_twin_keeps_the_architecture(name):
    s, full = models.get_preset(name), models.get_preset(name.removesuffix("-tiny"))
    for f in ("vision", "language", "has_cls", "feature_layer", "select_strategy", "alibi"):
        assert getattr(s, f) == getattr(full, f), f
    assert s.image_size % s.patch_size == 0 and s.tiny and s.text_layers == 2
    if s.vision == "siglip":  # the head-dim-72 quirk is what kernels must handle
        assert s.vision_head_dim == full.vision_head_dim == 72


def tiny_inputs(name, seed=0):
    """BOS, random text ids, the image's tokens, more text; random pixels (the processor is tested on its own)."""
    s = models.get_preset(name)
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(3, models.TOKENIZER_VOCAB, n).tolist()  # noqa: E731
    ids = [models.BOS_ID] + text(4) + [s.image_token_id] * s.num_image_tokens + text(7)
    px = torch.from_numpy(rng.standard_normal((1, 3, s.image_size, s.image_size)).astype(np.float32))
    return torch.tensor([ids]), px


@pytest.mark.parametrize("name", TINY)
def test_tiny_builds_fast_deterministically_and_runs(name):
    t0 = time.perf_counter()
    m = models.build_model(name, seed=3)
    elapsed = time.perf_counter() - t0
    print(f"{name}: built in {elapsed:.3f} s")
    assert elapsed < 2.0
    assert not m.training and isinstance(m, models.LlavaForConditionalGeneration)
    ids, px = tiny_inputs(name)
    s = models.get_preset(name)
    assert px.shape == (1, 3, s.image_size, s.image_size)
    assert int((ids == s.image_token_id).sum()) == s.num_image_tokens
    with torch.no_grad():
        out = m(input_ids=ids, pixel_values=px).logits
    assert out.shape == (1, ids.shape[1], s.vocab_size) and torch.isfinite(out).all()
    same, other = models.build_model(name, seed=3), models.build_model(name, seed=4)
    sd, sd_same, sd_other = m.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip(name, tmp_path):
    m = models.build_model(name, seed=1)
    models.save_checkpoint(m, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = models.build_model(name, checkpoint=tmp_path / "ckpt")
    assert type(loaded) is type(m) and not loaded.training
    ids, px = tiny_inputs(name, seed=5)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, pixel_values=px).logits, loaded(input_ids=ids, pixel_values=px).logits)
    if models.get_preset(name).language == "mpt":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.wte.weight.data_ptr()
    half = models.load_checkpoint(name, tmp_path / "ckpt", dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_checkpoint_errors(tmp_path):
    with pytest.raises(models.PresetError, match="llava-tiny, llava-siglip") as e:
        models.get_preset("llava-13b")
    assert isinstance(e.value, ValueError)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.build_model("llava-tiny", checkpoint=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.PresetError, match="no config.json"):
        models.load_checkpoint("llava-tiny", tmp_path / "empty")
    models.save_checkpoint(models.build_model("llava-tiny"), tmp_path / "llama")
    with pytest.raises(models.PresetError, match="text model_type is 'llama', preset expects 'mpt'.*'llava-tiny'"):
        models.load_checkpoint("llava-mpt-tiny", tmp_path / "llama")
    with pytest.raises(models.PresetError, match="vision model_type is 'clip_vision_model'"):
        models.load_checkpoint("llava-siglip-tiny", tmp_path / "llama")
    with pytest.raises(models.PresetError, match="hidden_size is 64, preset expects 1024"):
        models.load_checkpoint("llava", tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").unlink()
    with pytest.raises(models.PresetError, match="no weights"):
        models.load_checkpoint("llava-tiny", tmp_path / "llama")


def test_preset_token_ids_fit_the_vocab():
    for s in models.PRESETS.values():
        c = models.make_config(s)
        assert (c.image_token_id, c.text_config.pad_token_id, c.text_config.eos_token_id) == \
            (s.image_token_id, s.pad_token_id, s.eos_token_id)
        if s.tokenizer == "tiny-bpe":
            assert models.TOKENIZER_VOCAB <= s.image_token_id < s.pad_token_id < s.vocab_size
            assert (s.bos_token_id, s.eos_token_id) == (models.BOS_ID, models.EOS_ID)
        else:  # a real tokenizer's own ids (llava-micro: SmolLM2's <empty_output>, <|im_end|> ends and pads)
            assert s.image_token_id < s.vocab_size and s.pad_token_id == s.eos_token_id
    assert (models.get_preset("llava").image_token_id, models.get_preset("llava").pad_token_id) == (32000, 32001)


def test_llava_mpt_runs_with_vlmx_mpt_attention():
    m = models.build_model("llava-mpt-tiny", seed=2)
    swapped = swap_mpt_attention(copy.deepcopy(m), "vlmx", respect_attention_mask=False)
    assert sum(isinstance(x, MptAttentionAdapter) for x in swapped.modules()) == 2
    ids, px = tiny_inputs("llava-mpt-tiny", seed=7)
    with torch.no_grad():
        check_close(swapped(input_ids=ids, pixel_values=px).logits, m(input_ids=ids, pixel_values=px).logits,
                    TOL_SWAP, "llava-mpt logits after swapping attention")

"""The runtime processor (no torch, no transformers) against transformers' own LlavaProcessor / tokenizer: identical
input ids, pixel values, chat-template text and decoded text; streaming detokenization never splits a character."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmx.export.processor_files import ProcessorFilesError, check_checkpoint_files, write_processor_files
from vlmx.torch_ref import models
from vlmx.trt_runtime.processor import Processor, ProcessorError
from vlmx.trt_runtime.tokenizer import TextTokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

PROMPTS = ["What is shown in this picture?", "  two  spaces\nand a newline", "Ünïcödé ✓ 日本語 🎉 émoji",
           "<s> literal special tokens </s> in text"]
#: (height, width, mode): square, landscape, portrait, smaller than the crop, odd sizes, grey, transparent
IMAGES = [(56, 56, "RGB"), (70, 90, "RGB"), (200, 31, "RGB"), (13, 17, "RGB"), (301, 300, "L"), (64, 100, "RGBA")]
MULTIBYTE = ["héllo wörld", "日本語のテキスト", "emoji 🎉🙂👍🏽 mixed", "Ελληνικά и русский", "a\u0301 combining", "✓✗→∞"]


def fresh_image(h, w, mode, rng):
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(arr, "RGBA")
    return Image.fromarray(arr[..., :3], "RGB").convert(mode)


def preset_dir(tmp_path, name, **image_overrides):
    d = tmp_path / name
    d.mkdir()
    write_processor_files(d, models.get_preset(name))
    if image_overrides:
        p = d / "preprocessor_config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **image_overrides}))
    return d


@pytest.fixture(scope="module")
def smollm2_dirs(tmp_path_factory):
    """(SmolLM2 tokenizer dir, LLaVA checkpoint dir with that tokenizer + <image>)."""
    from smollm2_fixture import save_llava_checkpoint, save_smollm2_tokenizer

    root = tmp_path_factory.mktemp("smollm2")
    tok = save_smollm2_tokenizer(root / "tokenizer")
    return tok, save_llava_checkpoint(tok, root / "checkpoint")


def assert_same_inputs(directory, prompts=PROMPTS, images=IMAGES):
    mine, ref = Processor.from_dir(directory), transformers.AutoProcessor.from_pretrained(directory)
    rng = np.random.default_rng()  # fresh pixels every run
    for prompt in prompts:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = ref.apply_chat_template(conversation, add_generation_prompt=True)
        assert mine.chat_prompt(prompt) == text
        for h, w, mode in images:
            image = fresh_image(h, w, mode, rng)
            want, got = ref(text=text, images=image, return_tensors="np"), mine(text, image)
            assert np.array_equal(got["input_ids"], want["input_ids"]), (prompt, h, w)
            assert got["pixel_values"].dtype == want["pixel_values"].dtype == np.float32
            assert np.array_equal(got["pixel_values"], want["pixel_values"]), (h, w, mode)
            assert (got["input_ids"] == mine.image_token_id).sum() == mine.num_image_tokens(got["pixel_values"])
    return mine


@pytest.mark.parametrize("name, tokens", [("llava-tiny", 16), ("llava-siglip-tiny", 16), ("llava-mpt-tiny", 16)])
def test_preset_inputs_equal_transformers_llava_processor(tmp_path, name, tokens):
    mine = assert_same_inputs(preset_dir(tmp_path, name))
    assert mine.num_image_tokens(np.zeros((1, 3, 56, 56))) == tokens
    assert mine.image_token_id == models.get_preset(name).image_token_id


def test_full_size_preset_keeps_llava15_ids(tmp_path):
    mine = assert_same_inputs(preset_dir(tmp_path, "llava"), prompts=PROMPTS[:1], images=IMAGES[1:2])
    assert (mine.image_token_id, mine.generation.pad_token_id, mine.eos_token_ids) == (32000, 32001, (2,))
    assert mine.num_image_tokens(np.zeros((1, 3, 336, 336))) == 576


def test_llava_pad_to_square_equals_llava_image_processor(tmp_path):
    d = preset_dir(tmp_path, "llava-tiny", image_processor_type="LlavaImageProcessor", do_pad=True)
    assert Processor.from_dir(d).image_processor.do_pad
    assert type(transformers.AutoProcessor.from_pretrained(d).image_processor).__name__.startswith("LlavaImage")
    assert_same_inputs(d, prompts=PROMPTS[:1])


def test_smollm2_checkpoint_inputs_equal_transformers(smollm2_dirs):
    mine = assert_same_inputs(smollm2_dirs[1])
    assert (mine.image_token_id, mine.eos_token_ids, len(mine.tokenizer)) == (49152, (2,), 49153)


def test_chat_template_equals_apply_chat_template(smollm2_dirs):
    """SmolLM2's ChatML template (string content, system prompt default) and LLaVA's (content lists, assistant
    turns with {% generation %}), with and without the generation prompt."""
    chats = [[{"role": "user", "content": "Hi ✓"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "日本語で?"}]]
    tok_dir, ckpt = smollm2_dirs
    ref, mine = transformers.AutoTokenizer.from_pretrained(tok_dir), TextTokenizer.from_dir(tok_dir)
    for chat in chats:
        for gen in (True, False):
            assert mine.apply_chat_template(chat, add_generation_prompt=gen) == \
                ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    ref, mine = transformers.AutoProcessor.from_pretrained(ckpt), Processor.from_dir(ckpt)
    llava = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
             {"role": "user", "content": [{"type": "text", "text": "Colour? 🎨"}]}]
    for gen in (True, False):
        assert mine.apply_chat_template(llava, add_generation_prompt=gen) == \
            ref.apply_chat_template(llava, add_generation_prompt=gen)


def tokenizers_under_test(tmp_path, smollm2_dirs):
    """(runtime tokenizer, transformers tokenizer): the tiny byte-fallback BPE and SmolLM2's byte-level BPE."""
    d = preset_dir(tmp_path, "llava-tiny")
    return [(TextTokenizer.from_dir(p), transformers.AutoTokenizer.from_pretrained(p)) for p in (d, smollm2_dirs[1])]


def test_encode_and_decode_equal_transformers(tmp_path, smollm2_dirs):
    rng = np.random.default_rng()
    for mine, ref in tokenizers_under_test(tmp_path, smollm2_dirs):
        for text in MULTIBYTE + PROMPTS:
            assert mine.encode(text) == ref(text).input_ids
            assert mine.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
        for _ in range(20):  # random ids: lone continuation bytes, specials, the image token
            ids = rng.integers(0, len(mine), int(rng.integers(1, 40))).tolist()
            for skip in (True, False):
                assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_streaming_never_splits_a_character(tmp_path, smollm2_dirs):
    for mine, _ in tokenizers_under_test(tmp_path, smollm2_dirs):
        for text in MULTIBYTE:
            ids = mine.encode(text, add_special_tokens=False)
            stream = mine.stream()
            pieces = [stream.push(i) for i in ids]
            assert "".join(pieces) + stream.flush() == mine.decode(ids) == text
            assert not any("\ufffd" in p for p in pieces), pieces
            if any("\ufffd" in mine.decode([i]) for i in ids):  # a token holding part of a character...
                assert "" in pieces  # ...was held back until the character was whole


def test_streaming_random_ids_concatenate_to_decode(tmp_path, smollm2_dirs):
    rng = np.random.default_rng()
    for mine, _ in tokenizers_under_test(tmp_path, smollm2_dirs):
        specials = [i for i, t in mine.tokenizer.get_added_tokens_decoder().items() if t.special]
        for _ in range(1000):  # lone/partial bytes, specials between byte tokens (skipped: the runs join)
            ids = rng.integers(0, len(mine), int(rng.integers(1, 60))).tolist()
            ids = [int(rng.choice(specials)) if rng.random() < 0.1 else i for i in ids]
            stream = mine.stream()
            assert "".join(stream.push(i) for i in ids) + stream.flush() == mine.decode(ids)


def test_held_back_bytes_come_out_whole(tmp_path):
    tok = TextTokenizer.from_dir(preset_dir(tmp_path, "llava-tiny"))
    ids = tok.encode("x 🎉", add_special_tokens=False)
    assert [tok.tokenizer.id_to_token(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert pieces[-4:] == ["", "", "", ""] and "".join(pieces) + stream.flush() == "x 🎉"
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids + tok.encode(" end", add_special_tokens=False)]
    assert pieces[len(ids) - 4:len(ids)] == ["", "", "", ""] and pieces[len(ids)].startswith("🎉")


def test_processor_errors(tmp_path, smollm2_dirs):
    d = preset_dir(tmp_path, "llava-tiny")
    mine = Processor.from_dir(d)
    with pytest.raises(ProcessorError, match="2 image tokens but 1 images"):
        mine("<image><image>", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ProcessorError, match="exactly one image"):
        mine.split_at_image(np.asarray(mine.tokenizer.encode("no image here")))
    (d / "tokenizer.json").write_text("{ broken")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a tokenizers file"):
        Processor.from_dir(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="has no tokenizer.json; re-run vlm-export"):
        Processor.from_dir(d)
    ckpt = smollm2_dirs[1]
    config = transformers.LlavaConfig.from_pretrained(ckpt)
    check_checkpoint_files(ckpt, config)
    config.image_token_id = 7
    with pytest.raises(ProcessorFilesError, match="maps the image token '<image>' to 49152.*image_token_id 7"):
        check_checkpoint_files(ckpt, config)
    config = transformers.LlavaConfig.from_pretrained(ckpt)
    config.text_config.vocab_size = 1024
    with pytest.raises(ProcessorFilesError, match="49153 tokens but the language model's vocab_size is 1024"):
        check_checkpoint_files(ckpt, config)
    with pytest.raises(ProcessorFilesError, match="has no tokenizer.json"):
        check_checkpoint_files(tmp_path, config)

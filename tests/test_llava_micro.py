"""llava-micro: preset wiring (no weights needed), the lossless Q4_1 repack, the VQA generator, the eval baselines."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_pruning  # noqa: E402
import make_vqa  # noqa: E402
import train_projector  # noqa: E402

from vlmx.export.graphs import VisionGraph  # noqa: E402
from vlmx.export.model_configs import family_for  # noqa: E402
from vlmx.torch_ref import llava_micro, models  # noqa: E402


def rel_err(out, ref):
    return float(torch.linalg.norm(out.double() - ref.double()) / torch.linalg.norm(ref.double()))


def test_preset_is_llava_with_a_dinov2_tower():
    spec = models.get_preset("llava-micro")
    assert (spec.num_patches, spec.num_image_tokens, spec.has_cls) == (144, 144, True)
    cfg = models.make_config(spec)
    assert cfg.vision_config.model_type == "dinov2" and cfg.text_config.num_key_value_heads == 3
    assert cfg.text_config.tie_word_embeddings and cfg.text_config.rope_parameters["rope_theta"] == 100000.0
    assert family_for(spec).name == "llava-dinov2"


@pytest.fixture(scope="module")
def micro_processor(tmp_path_factory):
    """The runtime Processor over the processor files vlm-export writes for llava-micro (SmolLM2's tokenizer)."""
    from vlmx.export.processor_files import write_processor_files
    from vlmx.torch_ref import real_weights
    from vlmx.trt_runtime.processor import Processor

    why = real_weights.available("smollm2")
    if why:
        pytest.skip(f"no SmolLM2 tokenizer: {why}")
    out = tmp_path_factory.mktemp("micro-processor")
    info = write_processor_files(out, models.get_preset("llava-micro"))
    return Processor.from_dir(out), out, info


def test_export_processor_files_carry_smollm2_tokenizer_unchanged(micro_processor):
    from vlmx.export.processor_files import check_checkpoint_files

    proc, out, info = micro_processor
    spec = models.get_preset("llava-micro")
    assert info["source"] == "preset" and "tokenizer.json" in info["files"]
    assert (out / "tokenizer.json").read_text() == llava_micro.tokenizer().backend_tokenizer.to_str()
    check_checkpoint_files(out, models.make_config(spec))  # the checkpoint rule holds for the preset's own files
    img = np.random.default_rng(0).integers(0, 256, (168, 168, 3), dtype=np.uint8)
    px = proc.image_processor(img)
    assert px.shape == (1, 3, 168, 168) and proc.num_image_tokens(px) == spec.num_image_tokens
    assert proc.image_token_id == spec.image_token_id and proc.eos_token_ids == (spec.eos_token_id,)
    text = proc.chat_prompt("Is there a small black dot?")
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    prefix, suffix = proc.prompt_ids("Is there a small black dot?")
    ids = proc(text, images=img)["input_ids"][0]
    assert (ids == spec.image_token_id).sum() == 144
    assert np.array_equal(ids, np.concatenate([prefix, [spec.image_token_id] * 144, suffix]))


def test_training_prompts_are_the_export_prompts(micro_processor):
    proc = micro_processor[0]
    answers = train_projector.answer_tokens(proc)
    for kind, words in make_vqa.ANSWERS.items():  # closed-set scoring needs distinct first tokens per kind
        assert len({answers[w] for w in words}) == len(words), kind
    eval_first = {w: int(proc.tokenizer.encode(w, add_special_tokens=False)[0]) for w in answers}
    assert eval_first == answers
    assert proc.decode([answers["yes"]]) == "yes"


def test_dinov2_cls_attention_matches_eager_attention_probabilities():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     image_size=56, patch_size=14, attn_implementation="eager")).eval()
    fam = family_for(models.get_preset("llava-micro"))
    graph = VisionGraph(tower, torch.nn.Identity(), -1, drop_cls=True, cls_attention=True, cls_qk=fam.cls_qk).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        feats, cls = graph(px)
        ref = tower(px, output_attentions=True).attentions[-1][:, :, 0, 1:].mean(1)
    ref = ref / ref.sum(-1, keepdim=True)
    assert feats.shape == (2, 16, 64) and cls.shape == (2, 16)
    assert rel_err(cls, ref) < 1e-5


def test_q4_1_repack_is_lossless_and_refuses_other_weights():
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(6, 4, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(6, 4, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (6, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every Q4_1 block reaches both ends
    w = (d * q + m).reshape(6, 128)
    packed = train_projector.pack_q4_1(w)
    assert packed is not None and packed["q"].shape == (6, 64)
    back = train_projector.unpack_q4_1(*(torch.from_numpy(packed[k]) for k in ("q", "d", "m")))
    assert torch.equal(back, w)
    assert train_projector.pack_q4_1(torch.randn(6, 128, generator=g)) is None


def test_vqa_is_deterministic_and_answers_follow_the_pixels():
    a_img, a_q = make_vqa.make_split("train", 12, seed=3)
    b_img, b_q = make_vqa.make_split("train", 12, seed=3)
    t_img, _ = make_vqa.make_split("test", 12, seed=3)
    assert np.array_equal(a_img, b_img) and a_q == b_q and not np.array_equal(a_img, t_img)
    assert {q.kind for q in a_q} == set(make_vqa.KINDS)
    for q in a_q:
        assert q.answer in make_vqa.ANSWERS[q.kind]
        assert q.question in make_vqa.all_questions()
        if q.kind == "dot":  # the dot is the only near-black thing on a mid-grey background
            assert (a_img[q.image].max(-1) < 40).any() == (q.answer == "yes")
    ch = make_vqa.chance(a_q)
    assert ch["colour"] == pytest.approx(1 / 6) and 0.25 < ch["all"] < 0.45


@pytest.mark.parametrize("k", [1, 16, 36, 48, 72, 144])
def test_uniform_baseline_keeps_exactly_k_spread_tokens(k):
    s = eval_pruning.uniform_scores(12, k).reshape(12, 12)
    assert int(s.sum()) == k
    if k >= 16:  # every quadrant (each 2x2 cell of the VQA scenes) keeps a share
        for r in (slice(0, 6), slice(6, 12)):
            for c in (slice(0, 6), slice(6, 12)):
                assert s[r, c].sum() >= k // 8


def test_projector_file_errors_are_clear(tmp_path):
    from safetensors.torch import save_file
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    proj = LlavaMultiModalProjector(models.make_config("llava-micro"))
    with pytest.raises(llava_micro.MissingProjectorError, match="train it with"):
        llava_micro.load_projector(proj, tmp_path / "none.safetensors")
    save_file({"linear_1.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(llava_micro.MissingProjectorError, match="does not hold"):
        llava_micro.load_projector(proj, tmp_path / "bad.safetensors")
    good = {k: torch.randn_like(v) for k, v in proj.state_dict().items()}
    save_file(good, str(tmp_path / "good.safetensors"))
    llava_micro.load_projector(proj, tmp_path / "good.safetensors")
    assert torch.equal(proj.linear_2.weight, good["linear_2.weight"])


@pytest.mark.parametrize("script,args,msg", [
    ("train_projector.py", ["train", "--data", "{tmp}/nothing"], "has no part1/lm_a.safetensors.xz"),
    ("eval_pruning.py", ["--export", "{tmp}/nothing"], "is not an export directory"),
    ("make_vqa.py", ["--out", "{tmp}/v", "--size", "20"], "--size 20 is too small"),
])
def test_scripts_reject_bad_input_in_one_line(tmp_path, script, args, msg):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *[x.format(tmp=tmp_path) for x in args]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr

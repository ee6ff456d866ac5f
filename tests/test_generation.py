"""Generation through the one LM graph on CPU (ONNX Runtime): greedy tokens equal transformers' own generate() for
all three tiny families and every attention mode (keep 1.0, and pruned runs against transformers fed the same kept
features); the KV cache stays in the same buffers with no per-step host copy; seeded sampling; stops; refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmx.export.cli import main as export_main
from vlmx.torch_ref import models
from vlmx.torch_ref.contract import KV_PAST, KV_PRESENT, kv_names
from vlmx.trt_runtime import run_cli
from vlmx.trt_runtime.pipeline import PipelineError, VLMPipeline
from vlmx.trt_runtime.sampling import Sampling

PROMPT = "What is shown in this picture?"
NEW_TOKENS = 8
S_MAX = 128
CASES = [(p, a) for p in ("llava-tiny", "llava-siglip-tiny", "llava-mpt-tiny")
         for a in ("plugin", "native", "decomposed")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{p}-{a}" for p, a in CASES])
def export(request, tmp_path_factory):
    preset, attention = request.param
    out = tmp_path_factory.mktemp("gen") / f"{preset}-{attention}"
    assert export_main(["--model", preset, "--attention", attention, "--precision", "fp32", "--out", str(out),
                        "--quiet", "--no-report", "--seed", "4", "--max-seq-len", str(S_MAX)]) == 0
    return out


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray((np.random.default_rng().random((80, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _hf_model(export):
    m = json.loads((export / "manifest.json").read_text())
    return models.build_model(m["model"], seed=m["seed"]), m["model_info"]


def _hf_generate(model, info, **kw):
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=info["eos_token_id"],
                              pad_token_id=0)


def _vlmx_generate(export, image_path, keep):
    """vlm-run's greedy tokens at ``keep``, plus the prompt ids around the image and the pixel values it used."""
    with VLMPipeline(export) as pipe:
        res = pipe.generate(image_path, PROMPT, keep=keep, max_new_tokens=NEW_TOKENS)
        prefix, suffix = pipe.prompt_ids(PROMPT)
        pixel_values = torch.from_numpy(pipe.preprocess(image_path))
    return res, prefix, suffix, pixel_values


def test_greedy_tokens_equal_transformers_generate(export, image_path):
    model, info = _hf_model(export)
    res, prefix, suffix, pixel_values = _vlmx_generate(export, image_path, keep=1.0)
    ids = torch.from_numpy(np.concatenate([prefix, np.full(info["num_image_tokens"], info["image_token_id"]),
                                           suffix]))[None]
    ref = _hf_generate(model, info, input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids))
    ref = ref[0, ids.shape[1]:].tolist()
    print(export.name, "vlmx", res.tokens, "transformers", ref)
    assert res.tokens == ref
    assert res.kept == res.num_visual_tokens and np.array_equal(res.kept_index[0], np.arange(res.kept))


def test_pruned_tokens_equal_transformers_fed_the_kept_features(export, image_path):
    model, info = _hf_model(export)
    res, prefix, suffix, pixel_values = _vlmx_generate(export, image_path, keep=0.25)
    assert res.kept == info["num_image_tokens"] // 4
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixel_values)
        feats = torch.stack(list(getattr(feats, "pooler_output", feats)))  # one [N, C] per image
        kept = feats.reshape(1, -1, feats.shape[-1])[:, torch.from_numpy(res.kept_index[0])]
        emb = model.get_input_embeddings()
        embeds = torch.cat([emb(torch.from_numpy(prefix))[None], kept, emb(torch.from_numpy(suffix))[None]], 1)
    ref = _hf_generate(model, info, inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                                                                    dtype=torch.long))
    print(export.name, "vlmx", res.tokens, "transformers", ref[0].tolist())
    assert res.tokens == ref[0].tolist()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "llava-tiny"
    assert export_main(["--model", "llava-tiny", "--precision", "fp32", "--out", str(out), "--quiet",
                        "--no-report", "--seed", "4", "--max-seq-len", str(S_MAX)]) == 0
    return out


class _Spy:
    """Wraps a runner's infer to record what each call feeds (names) and the cache pointers ORT writes."""

    def __init__(self, runner, names):
        self.runner, self.names, self.calls = runner, names, []
        self._infer = runner.infer
        runner.infer = self

    def __call__(self, feed):
        out = self._infer(feed)
        self.calls.append({"feed": sorted(feed), "ptrs": [self.runner.bound_pointer(n) for n in self.names],
                           "out": [id(out[n]) for n in self.names if n in out]})
        return out


def test_cache_stays_in_the_same_buffers_and_never_crosses_the_host(llava, image_path, capfd):
    with VLMPipeline(llava) as pipe:
        names = kv_names(KV_PAST, pipe.num_layers) + kv_names(KV_PRESENT, pipe.num_layers)
        spy = _Spy(pipe.lm, names)
        res = pipe.generate(image_path, PROMPT, keep=1.0, max_new_tokens=NEW_TOKENS)
    assert len(spy.calls) == NEW_TOKENS == len(res.tokens)  # one prefill, then one call per decode step
    first = spy.calls[0]
    n = len(names) // 2
    assert first["ptrs"][:n] == first["ptrs"][n:], "past and present must be one buffer"
    for call in spy.calls[1:]:
        assert call["ptrs"] == first["ptrs"] and call["out"] == first["out"], "cache buffers changed between steps"
        # a decode step feeds only the mask view: the token embedding and the cache are bound buffers
        assert call["feed"] == ["attention_mask"]
    assert first["feed"] == ["attention_mask", "inputs_embeds"]
    assert "in-place optimization not activated" not in capfd.readouterr().err  # ORT never copied the cache


def test_seeded_sampling_is_reproducible(llava, image_path):
    with VLMPipeline(llava) as pipe:
        runs = [pipe.generate(image_path, PROMPT, max_new_tokens=NEW_TOKENS,
                              sampling=Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=s)).tokens
                for s in (7, 7, 8, 9)]
        greedy = pipe.generate(image_path, PROMPT, max_new_tokens=NEW_TOKENS).tokens
    print(runs, greedy)
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) > 1 and any(r != greedy for r in runs)


def test_streaming_and_stop_strings(llava, image_path):
    with VLMPipeline(llava) as pipe:
        full = pipe.generate(image_path, PROMPT, max_new_tokens=NEW_TOKENS)
        pieces = list(pipe.stream(image_path, PROMPT, max_new_tokens=NEW_TOKENS))
        assert "".join(t.text for t in pieces) == full.text and [t.id for t in pieces] == full.tokens
        stop = full.text[len(full.text) // 2:][:3]
        gen = pipe.stream(image_path, PROMPT, max_new_tokens=NEW_TOKENS, stop=[stop])
        streamed = "".join(t.text for t in gen)
    res = gen.result
    assert res.finish_reason == "stop" and stop not in res.text and streamed == res.text
    assert full.text.startswith(res.text) and len(res.tokens) < len(full.tokens) + 1


def test_too_long_generation_is_refused_before_any_work(llava, image_path):
    with VLMPipeline(llava) as pipe:
        calls = []
        vision = pipe.runners["vision"].infer
        pipe.runners["vision"].infer = lambda feed: calls.append(1) or vision(feed)
        prompt = len(pipe.prompt_ids(PROMPT)[0]) + len(pipe.prompt_ids(PROMPT)[1]) + 16
        with pytest.raises(PipelineError, match=rf"prompt is {prompt} tokens .* {prompt + S_MAX} > the export's "
                                                rf"KV-cache length {S_MAX}; pass --max-new-tokens {S_MAX - prompt}"):
            pipe.stream(image_path, PROMPT, max_new_tokens=S_MAX)
        assert not calls
        short = sum(len(x) for x in pipe.prompt_ids("hi")) + 16
        res = pipe.generate(image_path, "hi", max_new_tokens=S_MAX - short)  # fills the cache exactly
        assert res.prompt_tokens == short and len(res.tokens) <= S_MAX - short


def test_vlm_run_streams_and_prints_a_json_record(llava, image_path, capsys):
    args = ["--artifacts", str(llava), "--image", str(image_path), "--prompt", PROMPT, "--max-new-tokens", "4"]
    assert run_cli.main(args + ["--json", "--temperature", "0.7", "--seed", "3"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(rec["tokens"]) == 4 and rec["finish_reason"] == "length" and rec["timings"]["ttft_ms"] > 0
    assert run_cli.main(args + ["--json", "--temperature", "0.7", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == rec["tokens"]
    assert run_cli.main(args + ["--max-new-tokens", "1000"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert run_cli.main(args + ["--top-p", "0"]) == 2
    assert "--top-p 0.0 must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the torch backend's CUDA-graph decode)")
def test_torch_backend_cuda_graph_decode_matches_onnxruntime(llava, image_path):
    """On a GPU: the torch backend (device tensors, caches written in place, decode replayed from one CUDA graph)
    gives ONNX Runtime's greedy tokens, with and without the graph; its caches never leave the device."""
    with VLMPipeline(llava) as pipe:
        want = pipe.generate(image_path, PROMPT, max_new_tokens=NEW_TOKENS).tokens
    for graph in (True, False):
        with VLMPipeline(llava, backend="torch", cuda_graph=graph) as tp:
            assert tp.lm.device_io
            res = tp.generate(image_path, PROMPT, max_new_tokens=NEW_TOKENS)
        assert res.tokens == want, f"cuda_graph={graph}"

"""The export contract (vlmx.torch_ref.contract) and the output-directory rule (vlmx.torch_ref.outdir): unit tests
plus hypothesis fuzzing of manifest fields and CLI arguments. Every input must be accepted or refused with the
module's own error class, never another exception."""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vlmx.torch_ref import contract as C
from vlmx.torch_ref.outdir import OutputError, check_out

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                              max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> dict:
    """A valid manifest of a synthetic export (the contract's own writer, onnx.helper graphs)."""
    from test_trt_build import make_export

    root = make_export(tmp_path_factory.mktemp("synthetic") / "e")
    return json.loads((root / C.MANIFEST).read_text())


def test_the_contract_imports_without_torch_onnx_or_pydantic():
    code = ("import sys, vlmx.torch_ref.contract, vlmx.torch_ref.outdir; "
            "bad = [m for m in ('torch', 'onnx', 'pydantic', 'numpy') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_declared_io_expands_flags_and_kv_names():
    info = {"num_layers": 2, "position_ids": False, "has_cls": True}
    ins, outs = C.declared_io("lm", info)
    assert ins == ["inputs_embeds", "attention_mask", "past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert outs == ["logits"] + C.kv_names(C.KV_PRESENT, 2)
    assert C.declared_io("vision", info)[1] == ["image_features", "cls_attention"]
    assert C.declared_io("vision", {**info, "has_cls": False})[1] == ["image_features"]
    assert C.QUANT_GRAPHS == ("vision", "lm") and set(C.GRAPH_NAMES) == set(C.GRAPHS)


@pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 3, 4)])
def test_relative_error_is_the_norm_ratio(shape):
    rng = np.random.default_rng()
    ref = rng.standard_normal(shape)
    noise = rng.standard_normal(shape) * 1e-3
    expect = np.linalg.norm(noise) / np.linalg.norm(ref)
    assert np.isclose(C.relative_error(ref + noise, ref), expect, rtol=1e-9)
    assert C.relative_error(ref[..., :1], ref) == float("inf")
    bad = ref.copy()
    bad.flat[0] = np.nan
    assert C.relative_error(bad, ref) == float("inf")
    assert C.relative_error(noise, np.zeros(shape)) == pytest.approx(np.linalg.norm(noise))


def test_real_token_rule_drops_padded_positions():
    rng = np.random.default_rng()
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    ref = rng.standard_normal((2, 4, 3))
    out = ref.copy()
    out[0, :2] += 100.0  # garbage at padded query positions is not compared
    kept_out, kept_ref, masked = C.real_tokens({"attention_mask": mask}, out, ref)
    assert masked and kept_out.shape == (6, 3) and C.relative_error(kept_out, kept_ref) == 0.0
    out[1, 0] += 1.0
    assert C.relative_error(*C.real_tokens({"attention_mask": mask}, out, ref)[:2]) > 0


def test_manifest_round_trip_and_digest(manifest):
    assert C.validate_manifest(copy.deepcopy(manifest)) == manifest
    reordered = dict(reversed(list(manifest.items())))
    assert C.manifest_digest(reordered) == manifest["manifest_sha256"]


def test_the_writer_refuses_an_invalid_manifest(tmp_path):
    with pytest.raises(C.ArtifactError, match="field precision"):
        C.make_manifest(tmp_path, {"model": "x", "checkpoint": None, "target": "trt-sm75", "sm": 75,
                                   "precision": "int4", "attention": "plugin", "opset": 18, "keep": 1.0,
                                   "prune": "text", "seed": 0, "plugins_only": False, "ops_used": [],
                                   "model_info": {}, "graphs": {}, "reference": None, "report": None})


def _leaves(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _leaves(v, path + (i,))
    yield path


def _set(d, path, value):
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


@FUZZ
@given(data=st.data(), value=JSON, sign=st.booleans())
def test_fuzzed_manifest_fields_are_refused_cleanly(manifest, data, value, sign):
    """Any field set to any JSON value: valid, or one ArtifactError; unsigned changes are always refused."""
    m = copy.deepcopy(manifest)
    paths = [p for p in _leaves(m) if p and p != ("manifest_sha256",)]
    path = data.draw(st.sampled_from(paths))
    _set(m, path, value)
    changed = C.manifest_digest(m) != manifest["manifest_sha256"]
    if sign:
        m["manifest_sha256"] = C.manifest_digest(m)
    try:
        C.validate_manifest(json.loads(json.dumps(m)))
    except C.ArtifactError as e:
        assert "\n" not in str(e) and "; " in str(e)  # one line, saying what to do
    else:
        assert sign or not changed, f"an edited, unsigned manifest was accepted ({path} = {value!r})"


@FUZZ
@given(data=st.data())
def test_fuzzed_missing_fields_are_refused_cleanly(manifest, data):
    m = copy.deepcopy(manifest)
    path = data.draw(st.sampled_from([p for p in _leaves(m) if p]))
    parent = m
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    m["manifest_sha256"] = C.manifest_digest(m)
    try:
        C.validate_manifest(m)
    except C.ArtifactError:
        pass


WORDS = st.sampled_from(["fp16", "w8a8", "fp32", "int4", "plugin", "native", "decomposed", "flash", "trt-sm75",
                         "trt-sm90", "trt-sm12", "text", "cls", "", "-1", "0", "1", "nan", "inf", "1e9", "23", "17",
                         "0.5", "1.5", "--overwrite", "\u00e9", "a b"]) | st.text(max_size=8)
FLAGS = ["--target", "--precision", "--attention", "--opset", "--calib", "--keep", "--prune", "--seed", "--out",
         "--checkpoint"]


@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), WORDS), max_size=5),
       switches=st.lists(st.sampled_from(["--overwrite", "--plugins-only", "--no-report"]), max_size=2))
def test_fuzzed_vlm_export_arguments_are_refused_cleanly(tmp_path, monkeypatch, pairs, switches):
    """The torch-free checks of vlm-export accept an argument set or raise UsageError; argparse exits with 2."""
    from vlmx.export import cli

    monkeypatch.chdir(tmp_path)
    argv = ["--model", "llava-tiny", "--out", str(tmp_path / "o")] + [x for p in pairs for x in p] + switches
    try:
        args = cli.parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        cli.check_arguments(args)
    except cli.UsageError as e:
        assert "\n" not in str(e)
    else:
        assert args.precision in C.PRECISIONS and args.prune in C.PRUNE_METHODS and 0 < args.keep <= 1
    assert not (tmp_path / "o").exists()


@FUZZ
@given(text=WORDS | st.floats(allow_nan=True).map(str) | st.integers().map(str))
def test_fuzzed_vlm_run_numbers(text):
    from vlmx.trt_runtime.run_cli import parse_keep, parse_new_tokens

    for parse, ok in ((parse_keep, lambda v: (0 < v <= 1) or (isinstance(v, int) and v >= 1)),
                      (parse_new_tokens, lambda v: isinstance(v, int) and v >= 1)):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert ok(value), (parse.__name__, text, value)


@FUZZ
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_fuzzed_compare_thresholds(value):
    from vlmx.trt_runtime.compare import check_threshold

    try:
        assert check_threshold(value) == value and value > 0 and np.isfinite(value)
    except C.ArtifactError:
        assert not (np.isfinite(value) and value > 0)


@FUZZ
@given(name=st.text(max_size=20), overwrite=st.booleans())
@example(name="~0", overwrite=False)  # found by this test: expanduser raised RuntimeError for an unknown user
@example(name="a\x00b", overwrite=True)
def test_fuzzed_output_paths_never_touch_anything(tmp_path, monkeypatch, name, overwrite):
    monkeypatch.chdir(tmp_path)
    before = sorted(Path(tmp_path).rglob("*"))
    try:
        out = check_out(name, overwrite, C.is_export_dir)
    except OutputError as e:
        assert "\n" not in str(e)
    else:
        assert out.resolve() not in (tmp_path.resolve(), *tmp_path.resolve().parents)
    assert sorted(Path(tmp_path).rglob("*")) == before


def test_graph_io_reads_only_the_io_and_matches_onnx(tiny_export, tmp_path):
    import onnx

    for f in sorted(tiny_export.glob("*.onnx")):
        model = onnx.load(str(f), load_external_data=False)
        assert C.graph_io(f) == (C.io_entries(model.graph.input), C.io_entries(model.graph.output)), f.name
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((tiny_export / "vision.onnx").read_bytes()[:5000])
    with pytest.raises(C.ArtifactError, match="is not a readable ONNX file"):
        C.graph_io(broken)


@FUZZ
@given(data=st.data())
def test_fuzzed_onnx_bytes_are_refused_cleanly(tmp_path, data):
    """A damaged graph file: its I/O is read or ArtifactError is raised, nothing else."""
    from test_trt_build import conform, matmul_softmax_graph

    src = tmp_path / "g.onnx"
    if not src.exists():
        src.write_bytes(conform(matmul_softmax_graph(0), "prune").SerializeToString())
    raw = bytearray(src.read_bytes())
    cut = data.draw(st.integers(0, len(raw)))
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(bytes(raw[:cut]))
    try:
        ins, outs = C.graph_io(bad)
    except C.ArtifactError:
        return
    assert all(isinstance(e["name"], str) for e in ins + outs)

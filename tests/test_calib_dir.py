"""``vlm-export --precision w8a8 --calib DIR``: the directory format (images + prompts.txt or <image>.txt), one clear
error line for every bad directory, and an export calibrated on it: other smoothing and weight scales than the
built-in text, through the large-graph (streamed) path the 7B language model takes, with a passing report."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from vlmx.export import calib_data, cli
from vlmx.export.driver import LM_W8A8_FILE, ExportOptions, export_model
from vlmx.export.passes.insert_quant_streamed import read_tensor
from vlmx.torch_ref import lm_w8a8, models


def _image(path, seed, size=(40, 52)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(path)


def _calib_dir(root, n=3, prompts=("Describe the picture in detail.", "What colour is the object on the left?")):
    root.mkdir()
    for i in range(n):
        _image(root / f"img{i}.{'png' if i % 2 else 'jpg'}", i)
    (root / calib_data.PROMPTS_FILE).write_text("\n".join(prompts) + "\n\n")
    return root


def test_format_own_prompt_file_wins_and_prompts_txt_cycles(tmp_path):
    d = _calib_dir(tmp_path / "c", n=4, prompts=("first", "second"))
    (d / "img2.txt").write_text("  my own prompt \n")
    (d / "notes.md").write_text("ignored")
    got = [(s.image.name, s.prompt) for s in calib_data.read_calib_dir(d)]
    assert got == [("img0.jpg", "first"), ("img1.png", "second"), ("img2.jpg", "my own prompt"),
                   ("img3.png", "first")]


def _broken(tmp_path):
    """(setup, expected message) per bad --calib DIR."""
    def missing(root):
        return root / "nope"

    def a_file(root):
        (root / "f.txt").write_text("x")
        return root / "f.txt"

    def empty(root):
        (root / "e").mkdir()
        return root / "e"

    def no_images(root):
        d = root / "t"
        d.mkdir()
        (d / "prompts.txt").write_text("hello\n")
        return d

    def unreadable(root):
        d = _calib_dir(root / "u")
        (d / "img9.png").write_bytes(b"not a png at all")
        return d

    def no_prompts(root):
        d = root / "p"
        d.mkdir()
        _image(d / "a.png", 0)
        return d

    def empty_prompt_file(root):
        d = _calib_dir(root / "q")
        (d / "img0.txt").write_text("  \n")
        return d

    return [(missing, "does not exist"), (a_file, "is not a directory"), (empty, "holds no images"),
            (no_images, "holds no images"), (unreadable, "img9.png cannot be read"), (no_prompts, "has no prompt"),
            (empty_prompt_file, "img0.txt is empty")]


@pytest.mark.parametrize("case", range(7))
def test_bad_calib_dir_is_one_error_line(tmp_path, capsys, case):
    setup, message = _broken(tmp_path)[case]
    (tmp_path / "data").mkdir()
    calib = setup(tmp_path / "data")
    out = tmp_path / "out"
    rc = cli.main(["--model", "llava-tiny", "--out", str(out), "--quiet", "--precision", "w8a8",
                   "--calib", str(calib)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("vlm-export: error:") == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_calib_dir_needs_w8a8_and_a_smoothed_language_model(tmp_path, capsys):
    d = _calib_dir(tmp_path / "c")
    for extra, message in ((["--precision", "fp16"], "needs --precision w8a8"),
                           (["--precision", "w8a8", "--model", "llava-mpt-tiny"], "omit --calib")):
        rc = cli.main(["--model", "llava-tiny", "--out", str(tmp_path / "out"), "--quiet", "--calib", str(d), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err


def test_calibrate_on_embeds_equals_calibrate_on_ids():
    """Sequences given as embeddings (the --calib DIR path) calibrate exactly like the same tokens given as ids."""
    spec = models.get_preset("llava-tiny")
    ids = lm_w8a8.calibration_ids(vocab_size=spec.vocab_size, seq_len=32, num_seqs=2)
    plans = []
    for as_embeds in (False, True):
        model = models.build_model(spec, seed=1, dtype=torch.float32)
        embed = model.get_input_embeddings()
        with torch.no_grad():
            kw = {"inputs_embeds": [embed(r) for r in ids]} if as_embeds else {}
            plans.append(lm_w8a8.calibrate(model, None if as_embeds else ids, **kw).to_dict())
    assert plans[0]["alphas"] == plans[1]["alphas"] and plans[0]["tokens"] == plans[1]["tokens"] == 64
    np.testing.assert_allclose(list(plans[1]["errors"].values()), list(plans[0]["errors"].values()), rtol=1e-5)


def _weight_scales(out) -> dict:
    model = onnx.load(str(out / "lm.onnx"), load_external_data=False)
    return {t.name: read_tensor(t, out) for t in model.graph.initializer if t.name.endswith("_ws")}


@pytest.mark.slow
def test_export_calibrated_on_a_directory(tmp_path):
    """The streamed (7B) path with --calib DIR: the plan counts the directory's tokens (images + prompts), the
    smoothing and the int8 weight scales differ from the built-in calibration, and the report passes."""
    d = _calib_dir(tmp_path / "c")
    outs = {}
    for name, calib in (("default", None), ("dir", d)):
        out = outs[name] = tmp_path / name
        manifest = export_model(ExportOptions(model="llava-tiny", out=out, precision="w8a8", calib_dir=calib,
                                              external_threshold=0))
        assert json.loads((out / "report.json").read_text())["passed"]
        assert "insert_quant(dynamic, streamed)" in manifest["graphs"]["lm"]["passes"]
    plans = {k: json.loads((o / LM_W8A8_FILE).read_text()) for k, o in outs.items()}
    spec = models.get_preset("llava-tiny")
    assert plans["dir"]["calibration"] == f"--calib {d}" and plans["default"]["calibration"] == "the built-in text"
    assert plans["dir"]["tokens"] > 3 * spec.num_image_tokens and plans["dir"]["tokens"] != plans["default"]["tokens"]
    assert plans["dir"]["errors"] != plans["default"]["errors"]
    scales = {k: _weight_scales(o) for k, o in outs.items()}
    assert scales["dir"].keys() == scales["default"].keys() and len(scales["dir"]) >= 10
    differ = [k for k in scales["dir"] if not np.array_equal(scales["dir"][k], scales["default"][k])]
    assert len(differ) >= len(scales["dir"]) // 2, differ  # smoothing moved the scales of most linears


def test_cli_calib_dir_and_count(tmp_path):
    d = _calib_dir(tmp_path / "c")
    base = ["--model", "llava-tiny", "--out", str(tmp_path / "out"), "--precision", "w8a8"]
    opts = cli.validate(cli.parser().parse_args(base + ["--calib", str(d)]))
    assert opts.calib_dir == d and opts.calib == 0 and opts.resolved_opset() == 18
    opts = cli.validate(cli.parser().parse_args(base + ["--calib", "4"]))
    assert opts.calib_dir is None and opts.calib == 4

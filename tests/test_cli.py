"""vlm-export argument handling: every bad argument or unsupported combination gives one clear error, exit
status 2 and no output directory; a failing export leaves nothing behind."""
from __future__ import annotations

import pytest

from vlmx.export import cli

BAD = [
    (["--model", "llava-huge"], "not known"),
    (["--target", "trt-sm12"], "not a known target"),
    (["--precision", "int4"], "--precision int4 is not known"),
    (["--attention", "flash"], "--attention flash is not known"),
    (["--attention", "native", "--opset", "18"], "--opset 23"),
    (["--opset", "99"], "--opset 99 is not supported"),
    (["--calib", "8"], "needs --precision w8a8"),
    (["--calib", "-1", "--precision", "w8a8"], "must be >= 0"),
    (["--calib", "4", "--precision", "w8a8", "--opset", "18"], "opset 19"),
    (["--keep", "0"], "outside (0, 1]"),
    (["--keep", "1.5"], "outside (0, 1]"),
    (["--prune", "random"], "--prune random is not known"),
    (["--model", "llava-siglip-tiny", "--prune", "cls"], "[CLS]"),
    (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_arguments_fail_with_one_clear_error(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = ["--model", "llava-tiny", "--out", str(out), "--quiet"]
    rc = cli.main(base + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("vlm-export: error:") == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert cli.main(["--model", "llava-tiny", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_failing_export_removes_the_temporary_directory(tmp_path, capsys, monkeypatch):
    from vlmx.export import driver

    calls = []

    def broken(spec, out_dir, opset=18, postprocess=None, functions=True):
        calls.append(spec.name)
        if len(calls) == 2:
            raise RuntimeError(f"simulated failure exporting {spec.name}")
        return real(spec, out_dir, opset, postprocess, functions)

    real = driver.export_graph
    monkeypatch.setattr(driver, "export_graph", broken)
    out = tmp_path / "out"
    rc = cli.main(["--model", "llava-tiny", "--out", str(out), "--quiet"])
    assert rc == 1
    assert "simulated failure exporting embed" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_opset_defaults_follow_the_options():
    parse = cli.parser().parse_args
    base = ["--model", "llava-tiny", "--out", "/nonexistent-vlmx-out"]
    assert cli.validate(parse(base)).resolved_opset() == 18
    assert cli.validate(parse(base + ["--attention", "native"])).resolved_opset() == 23
    assert cli.validate(parse(base + ["--precision", "w8a8", "--calib", "2"])).resolved_opset() == 19
    assert cli.validate(parse(base + ["--opset", "21"])).resolved_opset() == 21

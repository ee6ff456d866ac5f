"""vlm-export --build-engines hands the finished export to vlm-build (TensorRT-RTX's CPU builder here)."""
from __future__ import annotations

import json

import pytest

from vlmx.apps.export_cli import main as export_main
from vlmx.trt_runtime.engine_build import EngineBuildError, build_engines
from vlmx.trt_runtime.trt_import import available_flavours

needs_rtx = pytest.mark.skipif("tensorrt-rtx" not in available_flavours(),
                               reason="TensorRT-RTX is not importable (pip install '.[trt-rtx]')")


@needs_rtx
def test_export_then_engines_for_sm75(tmp_path, capsys):
    out = tmp_path / "tiny"
    rc = export_main(["--model", "llava-tiny", "--attention", "decomposed", "--out", str(out), "--quiet",
                      "--build-engines", "--engine-backend", "tensorrt-rtx"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "engines" / "engines.json").read_text())
    assert meta["backend"] == "tensorrt-rtx" and meta["target_sm"] == 75
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    assert set(meta["engines"]) == set(graphs)
    for g in graphs:
        assert (out / "engines" / f"{g}.plan").stat().st_size > 0
    assert not list(tmp_path.glob("**/*.vlmx-tmp-*")), "a temporary engine directory was left behind"

    # A failing rebuild leaves the previous engines untouched and no temporary directory.
    before = (out / "engines" / "engines.json").read_text()
    with pytest.raises(EngineBuildError, match="not in the export"):
        build_engines(out, backend="tensorrt-rtx", graphs=["vision", "no-such-graph"], progress=False)
    assert (out / "engines" / "engines.json").read_text() == before
    assert not list(out.glob("engines.vlmx-tmp-*"))


@pytest.mark.parametrize("extra, message", [
    (["--build-engines", "--engine-backend", "tensorrt-9"], "--engine-backend tensorrt-9 is not known"),
    (["--plugin-lib", "libx.so"], "only apply with --build-engines"),
])
def test_bad_engine_arguments_fail_before_exporting(tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert export_main(["--model", "llava-tiny", "--out", str(out), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())

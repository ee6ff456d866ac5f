"""The TensorRT plugin library's sources agree with the op table, and its CMake build refuses clearly without TensorRT."""
import shutil
import subprocess

import pytest

from vlmx.plugins import trt_build
from vlmx.torch_ref.op_table import OPS, PLUGIN_NAMESPACE, PLUGIN_VERSION


def test_checked_in_header_matches_the_op_table():
    """Fails when op_table.py changed without `python -m vlmx.plugins.trt_build --write-header`."""
    assert trt_build.HEADER_PATH.read_text() == trt_build.render_op_table_header(), (
        "plugins/trt/generated/vlmx_op_table.h is stale; run `python -m vlmx.plugins.trt_build --write-header`")


def test_header_lists_every_op_attribute_with_its_plugin_field_kind():
    text = trt_build.render_op_table_header()
    assert f'kPluginNamespace = "{PLUGIN_NAMESPACE}"' in text and f'kPluginVersion = "{PLUGIN_VERSION}"' in text
    assert f"kNbOps = {len(OPS)};" in text
    kinds = {"int": "AttrKind::kInt", "float": "AttrKind::kFloat", "string": "AttrKind::kString"}
    for op in OPS.values():
        assert f'{{"{op.name}", {len(op.inputs)}, k{op.name}Inputs, {len(op.outputs)}, k{op.name}Outputs, ' \
               f'{len(op.attrs)}, ' in text
        for a in op.attrs:
            assert f'{{"{a.name}", {kinds[a.kind]}, {"true" if a.default is None else "false"}, ' in text, (op.name, a)


def test_every_creator_is_registered_by_getCreators():
    """getCreators() lists one creator per op-table entry (the static_assert keeps the count in step)."""
    src = (trt_build.TRT_DIR / "vlmx_plugin.cpp").read_text()
    for op in OPS.values():
        assert f"vlmx::VlmxPluginCreator(vlmx::gen::k{op.name})" in src, op.name
    assert 'extern "C"' in src and "getCreators(int32_t& nbCreators)" in src and "setLoggerFinder(" in src


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configure_without_tensorrt_stops_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    r = subprocess.run(["cmake", "-S", str(trt_build.TRT_DIR), "-B", str(tmp_path / "b"),
                        f"-DTENSORRT_ROOT={tmp_path / 'no-tensorrt'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "TensorRT not found" in out and "TENSORRT_ROOT" in out, out[-2000:]


def test_build_plugin_library_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    if trt_build.find_tensorrt_root() is not None:
        pytest.skip("TensorRT is installed here; the refusal path cannot be exercised")
    with pytest.raises(RuntimeError, match="TENSORRT_ROOT"):
        trt_build.build_plugin_library(tensorrt_root=tmp_path / "none", build_dir=tmp_path / "b")

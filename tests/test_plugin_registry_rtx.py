"""libvlmx_trt_plugins.so built in CI against real TensorRT headers and loaded into TensorRT-RTX's plugin registry.

The headers come at test time from the pinned ``kernel-lens`` wheel (vlmx.plugins.trt_build.HEADERS_PACKAGE: pip
download, sha256 check, cached under ~/.cache/vlmx); the library is built once per checkout (CMake, SASS sm_75 +
compute_75 PTX, no GPU) under build/ci_trt_plugins_sm75 and rebuilt incrementally. TensorRT-RTX's registry then
lists our creators: each name, namespace, version and field list (names, order, PluginField types) must be the op
table's, and each creator must create a plugin from TensorRT-built PluginFields. Registry work runs in a child
process, so a crash inside TensorRT-RTX fails a test instead of killing the session.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmx.plugins import trt_build
from vlmx.plugins.build import fatbin_entries
from vlmx.torch_ref.op_table import OPS, PLUGIN_NAMESPACE, PLUGIN_VERSION

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (the vlmx[trt-rtx] extra)")
pytestmark = pytest.mark.nvcc
FIELD_TYPES = {"int": "INT32", "float": "FLOAT32", "string": "CHAR"}
BUILD_DIR = Path(__file__).resolve().parents[1] / "build" / "ci_trt_plugins_sm75"


@pytest.fixture(scope="session")
def plugin_lib() -> Path:
    if shutil.which("cmake") is None or shutil.which("nvcc") is None:
        pytest.skip("needs cmake and nvcc on PATH to build the plugin library")
    root = trt_build.fetch_tensorrt_headers()
    return trt_build.build_plugin_library(75, root, BUILD_DIR)


_REGISTRY_PROBE = r"""
import json, sys
import numpy as np
import tensorrt_rtx_bindings as trt
reg = trt.get_plugin_registry()
reg.load_library(sys.argv[1])
spec = json.loads(sys.argv[2])
out = {"version": trt.__version__, "creators": {}}
for c in reg.all_creators:
    if c.plugin_namespace != spec["namespace"]:
        continue
    fields = [(f.name, f.type.name) for f in c.field_names]
    created = None
    if c.name in spec["fields"]:
        pf = []
        for name, kind, value in spec["fields"][c.name]:
            if kind == "string":
                pf.append(trt.PluginField(name, np.frombuffer(value.encode(), np.int8), trt.PluginFieldType.CHAR))
            elif kind == "int":
                pf.append(trt.PluginField(name, np.array([value], np.int32), trt.PluginFieldType.INT32))
            else:
                pf.append(trt.PluginField(name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        plugin = c.create_plugin(c.name + "_probe", trt.PluginFieldCollection(pf), trt.TensorRTPhase.BUILD)
        core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE) if plugin is not None else None
        created = plugin is not None and core is not None
    out["creators"][c.name] = {"namespace": c.plugin_namespace, "version": c.plugin_version,
                               "kind": c.interface_info.kind, "fields": fields, "created": created}
print("REGISTRY" + json.dumps(out))
"""


def _required_fields() -> dict:
    """Per op: the fields a valid node carries (required attributes, with values the creators accept)."""
    values = {"num_heads": 2, "head_dim": 64}
    return {op.name: [(a.name, a.kind, values.get(a.name, a.default)) for a in op.attrs
                      if a.default is None or a.kind == "string"] for op in OPS.values()}


@pytest.fixture(scope="session")
def registry(plugin_lib) -> dict:
    spec = {"namespace": PLUGIN_NAMESPACE, "fields": _required_fields()}
    r = subprocess.run([sys.executable, "-c", _REGISTRY_PROBE, str(plugin_lib), json.dumps(spec)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"registry probe exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("REGISTRY"))
    return json.loads(line[len("REGISTRY"):])


def test_library_carries_sm75_sass_and_compute75_ptx(plugin_lib):
    kinds = {(kind, sm) for kind, sm, _ in fatbin_entries(plugin_lib)}
    print(f"{plugin_lib}: fatbin entries {sorted(kinds)}")
    assert ("sass", 75) in kinds and ("ptx", 75) in kinds, kinds
    headers = trt_build.find_tensorrt_root(trt_build.cache_dir() / f"tensorrt-headers-"
                                           f"{trt_build.HEADERS_PACKAGE['tensorrt']}")
    assert headers is not None and f"{trt_build.HEADERS_PACKAGE['tensorrt'].split('.')[0]}" in \
        (headers / "include" / "NvInferVersion.h").read_text()


def test_registry_lists_every_op_table_creator_with_its_fields(registry):
    creators = registry["creators"]
    print(f"TensorRT-RTX {registry['version']}: {json.dumps(creators, indent=1)}")
    assert sorted(creators) == sorted(OPS), "the vlmx namespace holds exactly one creator per op"
    for op in OPS.values():
        c = creators[op.name]
        assert c["namespace"] == PLUGIN_NAMESPACE and c["version"] == PLUGIN_VERSION, (op.name, c)
        assert c["kind"] == "PLUGIN CREATOR_V3ONE", (op.name, c["kind"])
        assert c["fields"] == [[a.name, FIELD_TYPES[a.kind]] for a in op.attrs], op.name


def test_every_creator_creates_a_plugin_from_tensorrt_plugin_fields(registry):
    """createPlugin through TensorRT-RTX's own PluginFieldCollection (what its ONNX parser hands a creator)."""
    assert {n: c["created"] for n, c in registry["creators"].items()} == {n: True for n in OPS}


def test_header_pin_is_refused_when_the_wheel_does_not_match(tmp_path, monkeypatch):
    """A wheel whose sha256 differs from the pin is deleted and reported, never extracted."""
    pkg = dict(trt_build.HEADERS_PACKAGE)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / pkg["wheel"]).write_bytes(b"not the pinned wheel")
    with pytest.raises(RuntimeError, match="expected " + pkg["sha256"]):
        trt_build.fetch_tensorrt_headers(tmp_path)
    assert not (wheels / pkg["wheel"]).exists()
    assert not (tmp_path / f"tensorrt-headers-{pkg['tensorrt']}").exists()

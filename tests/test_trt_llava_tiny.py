"""CI: TensorRT-RTX on the CPU parses and builds the llava-tiny export for ComputeCapability.SM75.

``vlm-export --model llava-tiny --attention native|decomposed|plugin --out DIR`` then ``build_engines(DIR,
backend="tensorrt-rtx")``; every graph of the export must build, and the test prints each engine's layer list.
With ``plugin`` the vlmx FlashAttention nodes build from their function bodies (TensorRT-RTX has no plugins).
Skipped with a reason when TensorRT-RTX or the exporter is not available.
"""
import json

import pytest

from vlmx.trt_runtime.engine_build import build_engines
from vlmx.trt_runtime.trt_import import TensorRTUnavailable, import_tensorrt

try:
    import_tensorrt("tensorrt-rtx")
    RTX_REASON = ""
except TensorRTUnavailable as e:
    RTX_REASON = str(e)

try:
    from vlmx.export.cli import main as export_main
    EXPORT_REASON = ""
except ImportError as e:
    export_main = None
    EXPORT_REASON = f"the exporter is not available ({e})"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(RTX_REASON), reason=f"TensorRT-RTX missing: {RTX_REASON[:200]}"),
              pytest.mark.skipif(export_main is None, reason=EXPORT_REASON)]


@pytest.mark.parametrize("attention", ["native", "decomposed", "plugin"])
def test_llava_tiny_export_builds_for_sm75_with_tensorrt_rtx(tmp_path, attention):
    out = tmp_path / f"llava-tiny-{attention}"
    assert export_main(["--model", "llava-tiny", "--attention", attention, "--out", str(out)]) in (0, None)
    paths = build_engines(out, backend="tensorrt-rtx", target="trt-sm75", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(paths) == sorted(manifest["graphs"])
    meta = json.loads((out / "engines" / "engines.json").read_text())
    assert meta["target_sm"] == 75 and meta["backend"] == "tensorrt-rtx"
    for graph, entry in meta["engines"].items():
        print(f"--- {attention} {graph}: {entry['bytes']} bytes, built in {entry['build_seconds']} s, "
              f"{len(entry['layers'])} engine layers, vlmx nodes {entry['vlmx_nodes']}")
        for line in entry["layers"]:
            print("   ", line[:200])
        assert entry["bytes"] > 0 and entry["layers"], graph
    vision, lm = meta["engines"]["vision"], meta["engines"]["lm"]
    native_attention = [ln for ln in vision["network_layers"] + lm["network_layers"] if "[ATTENTION_" in ln]
    # one LM engine for prefill and decode: two optimization profiles, the cache written by KV_CACHE_UPDATE layers
    assert lm["profiles"] == ["prefill", "decode"]
    assert sum("[KV_CACHE_UPDATE]" in ln for ln in lm["network_layers"]) == 2 * manifest["model_info"]["num_layers"]
    if attention == "native":  # the ONNX Attention op maps to TensorRT's attention layer
        assert native_attention
    else:
        assert not native_attention
    if attention == "plugin":  # FlashAttention nodes carry function bodies, which TensorRT-RTX inlines
        assert any(n.startswith("FlashAttention:") for n in vision["vlmx_nodes"]["plugin_or_body"])

"""Engine builds with TensorRT-RTX on the CPU for ComputeCapability.SM75 (CI), from export directories.

Until the exporter's llava-tiny export is available these tests build a synthetic export directory that follows the
artifact contract (manifest.json with graphs/profiles/files, six graphs) made of small onnx.helper graphs: the
standard ONNX Attention op (opset 23) in the vision graph, MatMul/Softmax elsewhere, and vlmx nodes with and without
model-local function bodies. Each build prints the engine's layer list (from the builder's detailed layer log: the
engine inspector needs a GPU to deserialize the plan).
"""
import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from vlmx.trt_runtime import build_cli
from vlmx.torch_ref.contract import GRAPH_NAMES as REQUIRED_GRAPHS
from vlmx.trt_runtime.engine_build import EngineBuildError, build_engines, resolve_target_sm
from vlmx.trt_runtime.trt_import import TensorRTUnavailable, import_tensorrt

try:
    RTX = import_tensorrt("tensorrt-rtx")
except TensorRTUnavailable as e:
    RTX = None
    RTX_REASON = str(e)
needs_rtx = pytest.mark.skipif(RTX is None, reason="TensorRT-RTX is not installed (pip install "
                                                   "tensorrt-rtx-cu12-libs==1.6.1.120 tensorrt-rtx-cu12-bindings==1.6.1.120)")
HIDDEN, HEADS = 64, 2


def _model(nodes, inputs, outputs, inits=(), functions=(), opset=23):
    imports = [oh.make_opsetid("", opset)] + ([oh.make_opsetid("vlmx", 1)] if functions or any(
        n.domain == "vlmx" for n in nodes) else [])
    m = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=imports,
                      functions=list(functions))
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _io(name, shape, dt=TP.FLOAT16):
    return oh.make_tensor_value_info(name, dt, shape)


def _weight(name, shape, seed):
    return nh.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float16) * 0.1, name)


def attention_graph():
    """x [b, s, 64] → ONNX Attention (opset 23, 2 heads) → MatMul → y."""
    nodes = [oh.make_node("MatMul", ["x", "wq"], ["q"]), oh.make_node("MatMul", ["x", "wk"], ["k"]),
             oh.make_node("MatMul", ["x", "wv"], ["v"]),
             oh.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=HEADS, kv_num_heads=HEADS),
             oh.make_node("MatMul", ["a", "wo"], ["y"])]
    inits = [_weight(n, (HIDDEN, HIDDEN), i) for i, n in enumerate(("wq", "wk", "wv", "wo"))]
    return _model(nodes, [_io("x", ["b", "s", HIDDEN])], [_io("y", ["b", "s", HIDDEN])], inits)


def matmul_softmax_graph(seed=0):
    nodes = [oh.make_node("MatMul", ["x", "w"], ["t"]), oh.make_node("Softmax", ["t"], ["y"], axis=-1)]
    return _model(nodes, [_io("x", ["b", "s", HIDDEN])], [_io("y", ["b", "s", 16])], [_weight("w", (HIDDEN, 16), seed)],
                  opset=17)


def vlmx_graph(with_body: bool):
    """x → vlmx.QuantizePerToken-like node "ScaledSoftmax" (domain vlmx) → y, with or without a function body."""
    node = oh.make_node("ScaledSoftmax", ["x"], ["y"], domain="vlmx", plugin_namespace="vlmx", plugin_version="1")
    fn = oh.make_function("vlmx", "ScaledSoftmax", ["x"], ["y"],
                          [oh.make_node("Add", ["x", "x"], ["x2"]), oh.make_node("Softmax", ["x2"], ["y"], axis=-1)],
                          [oh.make_opsetid("", 17)], [])
    return _model([node], [_io("x", ["b", "s", HIDDEN])], [_io("y", ["b", "s", HIDDEN])],
                  functions=[fn] if with_body else [], opset=17)


#: model_info of the synthetic export: one LM layer, no [CLS], no position ids (fixes the declared graph I/O).
SYNTHETIC_INFO = {"vision": "synthetic", "language": "synthetic", "num_layers": 1, "num_image_tokens": 16,
                  "has_cls": False, "position_ids": False}


def conform(model, graph: str):
    """Give a one-input/one-output synthetic graph (x -> y) the I/O the export contract declares for ``graph``:
    x and y take the first declared names; further declared inputs are small static tensors echoed (or summed) into
    the further declared outputs, which are otherwise copies of y."""
    from vlmx.torch_ref.contract import declared_io

    ins, outs = declared_io(graph, SYNTHETIC_INFO)
    g = model.graph
    rename = {"x": ins[0], "y": outs[0]}
    for node in g.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    g.input[0].name, g.output[0].name = ins[0], outs[0]
    extra_in, extra_out = ins[1:], outs[1:]
    for n in extra_in:
        g.input.append(_io(n, [1, 4]))
    for j, n in enumerate(extra_out):
        src = extra_in[j:] if j == len(extra_out) - 1 else extra_in[j:j + 1]
        g.node.append(oh.make_node("Sum", src, [n]) if src else oh.make_node("Identity", [outs[0]], [n]))
        g.output.append(_io(n, [1, 4]) if src else oh.ValueInfoProto(name=n, type=g.output[0].type))
    if extra_in and not extra_out:  # fold the unpaired inputs into the output
        core = outs[0] + "_core"
        for node in g.node:
            node.output[:] = [core if o == outs[0] else o for o in node.output]
        g.node.append(oh.make_node("Concat", extra_in, ["extra"], axis=-1))
        g.node.append(oh.make_node("ReduceSum", ["extra"], ["extra_sum"], keepdims=0))
        g.node.append(oh.make_node("Add", [core, "extra_sum"], [outs[0]]))
    onnx.checker.check_model(model)
    return model


def make_export(root, graphs: dict | None = None, profile_max=32, drop_profile_of=None):
    """An export directory following the artifact contract, with the given {graph: ModelProto} (x -> y graphs,
    renamed to the declared I/O by :func:`conform`), written through the contract's own manifest writer."""
    from vlmx.torch_ref.contract import GRAPH_NAMES, declared_io, graph_entry, write_manifest

    graphs = dict(graphs or {})
    defaults = {"vision": attention_graph(), "lm": attention_graph()}
    for i, g in enumerate(GRAPH_NAMES):
        graphs.setdefault(g, defaults.get(g) or matmul_softmax_graph(i))
    root.mkdir(parents=True, exist_ok=True)
    entries = {}
    for g, model in graphs.items():
        path = root / f"{g}.onnx"
        onnx.save(conform(model, g), str(path))
        first = declared_io(g, SYNTHETIC_INFO)[0][0]
        prof = {first: {"min": [1, 1, HIDDEN], "opt": [1, 8, HIDDEN], "max": [2, profile_max, HIDDEN]}}
        entries[g] = graph_entry(path, {first: {0: "b", 1: "s"}}, {} if g == drop_profile_of else prof)
    write_manifest(root, {"model": "synthetic", "checkpoint": None, "target": "trt-sm75", "sm": 75,
                          "precision": "fp16", "attention": "native", "opset": 23, "keep": 1.0, "prune": "text",
                          "seed": 0, "plugins_only": False, "ops_used": [], "model_info": SYNTHETIC_INFO,
                          "graphs": entries, "reference": None, "report": None, "notes": []})
    return root


def _print_layers(meta):
    for g, e in meta["engines"].items():
        print(f"--- {g}: {e['bytes']} bytes, {len(e['layers'])} engine layers, built in {e['build_seconds']} s")
        for line in e["layers"]:
            print("   ", line[:160])


@needs_rtx
def test_rtx_builds_every_graph_for_sm75_and_records_engines_json(tmp_path):
    export = make_export(tmp_path / "export")
    paths = build_engines(export, backend="tensorrt-rtx", progress=False)
    assert sorted(paths) == sorted(REQUIRED_GRAPHS)
    meta = json.loads((export / "engines" / "engines.json").read_text())
    _print_layers(meta)
    assert meta["backend"] == "tensorrt-rtx" and meta["tensorrt_version"] == RTX.version
    assert meta["target_sm"] == 75 and meta["built_on"]["device"] is None and meta["plugin_lib"] is None
    for g, p in paths.items():
        e = meta["engines"][g]
        assert p.stat().st_size == e["bytes"] > 0
        assert hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"]
        assert e["layers"], f"{g}: the builder logged no engine layers"
    # The ONNX Attention op becomes TensorRT's native attention layer (no decomposition, no plugin).
    assert any("[ATTENTION_INPUT]" in ln for ln in meta["engines"]["vision"]["network_layers"])
    assert meta["timing_cache"] is None  # TensorRT-RTX has no timing cache (deprecated no-op since 1.2)


@needs_rtx
def test_vlmx_nodes_with_function_bodies_are_inlined_and_bare_ones_refused(tmp_path):
    export = make_export(tmp_path / "body", {"score": vlmx_graph(with_body=True)})
    build_engines(export, backend="tensorrt-rtx", graphs=["score"], progress=False)
    meta = json.loads((export / "engines" / "engines.json").read_text())
    score = meta["engines"]["score"]
    print("score network layers:", score["network_layers"])
    kinds = " ".join(score["network_layers"])
    assert "[ELEMENTWISE]" in kinds and "[SOFTMAX]" in kinds and "PLUGIN" not in kinds
    assert score["vlmx_nodes"]["plugin_or_body"] == ["ScaledSoftmax:"]
    bare = make_export(tmp_path / "bare", {"score": vlmx_graph(with_body=False)})
    with pytest.raises(EngineBuildError, match="without function bodies.*--plugins-only"):
        build_engines(bare, backend="tensorrt-rtx", graphs=["score"], progress=False)


@needs_rtx
def test_refusals_name_the_problem(tmp_path):
    export = make_export(tmp_path / "e", drop_profile_of="embed")
    with pytest.raises(EngineBuildError, match="input input_ids has dynamic shape .* no profile"):
        build_engines(export, backend="tensorrt-rtx", graphs=["embed"], progress=False)
    with pytest.raises(EngineBuildError, match="cannot target sm_90"):
        build_engines(export, backend="tensorrt-rtx", graphs=["vision"], target="sm90", progress=False)
    with pytest.raises(EngineBuildError, match="cannot load plugin libraries"):
        build_engines(export, backend="tensorrt-rtx", graphs=["vision"], plugin_lib=tmp_path / "x.so", progress=False)
    with pytest.raises(EngineBuildError, match="not in the export"):
        build_engines(export, backend="tensorrt-rtx", graphs=["vision2"], progress=False)


def test_target_names_resolve():
    assert resolve_target_sm("trt-sm75") == 75 and resolve_target_sm("sm86") == 86 and resolve_target_sm(89) == 89
    assert resolve_target_sm(None, {"sm": 87}) == 87 and resolve_target_sm(None) == 75
    with pytest.raises(ValueError, match="not a known target"):
        resolve_target_sm("trt-sm12")
    with pytest.raises(EngineBuildError, match="not a target"):
        resolve_target_sm("turing")


@needs_rtx
def test_vlm_build_cli(tmp_path, capsys):
    export = make_export(tmp_path / "cli")
    assert build_cli.main(["--artifacts", str(export), "--backend", "tensorrt-rtx", "--graph", "embed",
                           "--print-layers"]) == 0
    out = capsys.readouterr()
    assert "embed:" in out.out and "[vlm-build] embed" in out.err and "[build embed]" in out.err
    meta = json.loads((export / "engines" / "engines.json").read_text())
    assert f"{len(meta['engines']['embed']['layers'])} layers (builder log (engines.json)):" in out.out
    assert "LayerType: gemm" in out.out
    assert build_cli.main(["--artifacts", str(tmp_path / "missing"), "--backend", "tensorrt-rtx"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_missing_tensorrt_is_reported_with_install_hint(monkeypatch):
    import vlmx.trt_runtime.trt_import as ti

    monkeypatch.setattr(ti, "_MODULES", {"tensorrt": ("no_such_tensorrt",), "tensorrt-rtx": ("no_such_rtx",)})
    with pytest.raises(TensorRTUnavailable, match="tensorrt-rtx-cu12-libs"):
        ti.import_tensorrt("auto")
    with pytest.raises(ValueError, match="choose one of"):
        ti.import_tensorrt("onnxruntime")


def _vlmx_op_model(op: str, ins, outs, attrs: dict):
    """One vlmx node backed by the exporter's function body (vlmx.export.functions)."""
    functions = pytest.importorskip("vlmx.export.functions", reason="the exporter's function bodies are not here")
    from vlmx.export.domain import node_attrs, register_schemas
    from vlmx.torch_ref.op_table import OPS

    register_schemas()
    node = oh.make_node(op, [i.name for i in ins], [o.name for o in outs], domain="vlmx", name=op,
                        **node_attrs(OPS[op], attrs))
    m = oh.make_model(oh.make_graph([node], "g", ins, outs), opset_imports=[oh.make_opsetid("", 23),
                                                                            oh.make_opsetid("vlmx", 1)])
    m.ir_version = 10
    return functions.attach_functions(m)


F16, F32, I8, I64 = TP.FLOAT16, TP.FLOAT, TP.INT8, TP.INT64
BODY_CASES = {  # name: (op, inputs, outputs, attrs)
    "attention-gqa-causal": ("FlashAttention", [_io("q", [1, 16, 128]), _io("k", [1, 16, 64]), _io("v", [1, 16, 64])],
                             [_io("o", [1, 16, 128])], {"num_heads": 2, "num_kv_heads": 1, "head_dim": 64,
                                                         "causal": 1}),
    "attention-alibi": ("FlashAttention", [_io("q", [1, 16, 128]), _io("k", [1, 16, 128]), _io("v", [1, 16, 128])],
                        [_io("o", [1, 16, 128])], {"num_heads": 2, "head_dim": 64, "alibi": 1, "causal": 1}),
    "quantize": ("QuantizePerToken", [_io("x", [4, 64])], [_io("q", [4, 64], I8), _io("scale", [4, 1], F32)], {}),
    "gelu-quant": ("GeluQuant", [_io("x", [4, 64])], [_io("q", [4, 64], I8), _io("scale", [4, 1], F32)], {}),
    "norm-quant": ("NormQuant", [_io("x", [4, 64]), _io("weight", [64]), _io("bias", [64])],
                   [_io("q", [4, 64], I8), _io("scale", [4, 1], F32)], {}),
    "token-importance": ("TokenImportance", [_io("q_text", [1, 5, 128]), _io("k_vis", [1, 20, 128])],
                         [_io("scores", [1, 20], F32)], {"num_heads": 2, "head_dim": 64}),
    "gather-topk": ("GatherTopK", [_io("x", [1, 20, 32]), _io("scores", [1, 20], F32), _io("keep", [1], I64)],
                    [_io("x_kept", [1, "k", 32]), _io("idx", [1, "k"], I64)], {}),
}


@needs_rtx
@pytest.mark.parametrize("name", sorted(BODY_CASES))
def test_rtx_builds_every_vlmx_function_body_for_sm75(tmp_path, name):
    """TensorRT-RTX has no plugins: each vlmx node's model-local function body is inlined and built natively."""
    from vlmx.trt_runtime.engine_build import build_engine

    op, ins, outs, attrs = BODY_CASES[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(_vlmx_op_model(op, ins, outs, attrs), str(path))
    profile = {"keep": {"values": {"min": [1], "opt": [5], "max": [20]}}} if op == "GatherTopK" else {}
    entry = build_engine(RTX, path, tmp_path / f"{name}.plan", profile, progress=False, default_shape_value=20)
    print(f"{name}: {entry['bytes']} bytes, {len(entry['layers'])} engine layers: "
          f"{[ln.split(',')[0] for ln in entry['layers']]}")
    assert entry["bytes"] > 0 and entry["layers"] and entry["vlmx_nodes"]["plugin_or_body"] == [f"{op}:{op}"]


@needs_rtx
def test_rtx_refuses_w8a8_bodies_with_a_hint(tmp_path):
    """MatMulInteger (the W8A8Linear body) is not importable by TensorRT-RTX: the error says what to do instead."""
    model = _vlmx_op_model("W8A8Linear", [_io("x", [4, 64], I8), _io("x_scale", [4, 1], F32),
                                          _io("w", [32, 64], I8), _io("w_scale", [32], F32)],
                           [_io("y", [4, 32])], {})
    path = tmp_path / "w8a8.onnx"
    onnx.save(model, str(path))
    from vlmx.trt_runtime.engine_build import build_engine

    with pytest.raises(EngineBuildError, match="MatMulInteger.*--backend tensorrt and the vlmx plugin library"):
        build_engine(RTX, path, tmp_path / "w8a8.plan", progress=False)

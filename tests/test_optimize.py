"""vlm-optimize: the numeric check catches broken rewrites (one mutation per pass: a wrong scale, a misordered bias,
a dropped mask), external data in and out with weights read only where a pass rewrites them, opsets 17-24, the
report, --strict, and one clear error line (exit 2, nothing written) for every bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import stock_onnx as S
from vlmx.export import large_model, optimize as O
from vlmx.export.functions import attach_functions
from vlmx.export.optimize_cli import main


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Stock Llama (GQA, biases, left-padded mask, sdpa NaN guard), legacy exporter, dynamic shapes."""
    d = tmp_path_factory.mktemp("llama")
    S.export("llama-gqa", "legacy", "sdpa", True, d / "in.onnx", layers=2)
    return d / "in.onnx"


def _optimized(src, tmp_path, **kw):
    dst = tmp_path / "out.onnx"
    report = O.optimize(src, dst, O.Options(seed=0, **kw))
    assert report["check"]["verdict"] == "PASS", report["check"]  # the unmutated rewrite is right
    return dst, report


def _check_mutant(src, dst, tmp_path, mutate, **kw):
    model = onnx.load(str(dst))
    mutate(model)
    if any(n.domain == "vlmx" for n in model.graph.node):
        attach_functions(model)
    path = tmp_path / "mutant.onnx"
    onnx.save(model, str(path))
    return O.numeric_check(src, path, large_model.load(src), O.Options(seed=3, **kw))["verdict"]


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _set_attr(node, name, value):
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))


# ------------------------------------------------------------------------------------------------ mutations
def test_check_catches_a_wrong_attention_scale(llama, tmp_path):
    dst, _ = _optimized(llama, tmp_path, attention="vlmx")

    def wrong_scale(m):
        for n in _nodes(m, "FlashAttention"):
            s = next(a.f for a in n.attribute if a.name == "scale")
            _set_attr(n, "scale", s * 1.1)

    assert _check_mutant(llama, dst, tmp_path, wrong_scale, attention="vlmx") == "FAIL"


def test_check_catches_a_dropped_attention_mask(llama, tmp_path):
    dst, _ = _optimized(llama, tmp_path, attention="vlmx")

    def drop_mask(m):
        for n in _nodes(m, "FlashAttention"):
            assert len(n.input) == 4
            del n.input[3]

    assert _check_mutant(llama, dst, tmp_path, drop_mask, attention="vlmx") == "FAIL"


def test_check_catches_a_dropped_mask_in_onnx_attention(tmp_path):
    src = tmp_path / "in.onnx"
    S.export("llama-gqa", "legacy", "sdpa", True, src, opset=23, layers=1)
    dst, _ = _optimized(src, tmp_path, attention="onnx")

    def drop_mask(m):
        for n in _nodes(m, "Attention"):
            del n.input[3]

    assert _check_mutant(src, dst, tmp_path, drop_mask, attention="onnx") == "FAIL"


def test_check_catches_a_misordered_qkv_bias(llama, tmp_path):
    dst, report = _optimized(llama, tmp_path, qkv=True)
    assert report["summary"]["fuse_qkv"]["fused"] == 2

    def swap_k_v_bias(m):
        for split in _nodes(m, "Split"):
            sizes = numpy_helper.to_array(_init(m, split.input[1]))
            add = next(n for n in m.graph.node if split.input[0] in n.output)
            bias = next(t for t in m.graph.initializer if t.name in add.input)
            b = numpy_helper.to_array(bias).copy()
            q, k = sizes[0], sizes[1]
            b[q:q + k], b[q + k:] = b[q + k:].copy(), b[q:q + k].copy()  # k and v halves swapped
            bias.CopyFrom(numpy_helper.from_array(b, bias.name))

    assert _check_mutant(llama, dst, tmp_path, swap_k_v_bias, qkv=True) == "FAIL"


def test_check_catches_a_wrong_w8a8_scale_and_a_misordered_bias(llama, tmp_path):
    dst, report = _optimized(llama, tmp_path, w8a8=True)
    assert report["check"]["precision"] == "w8a8" and report["summary"]["insert_quant(dynamic)"]["fused"] > 0

    def wrong_scale(m):  # weight scales 30% too large
        for n in _nodes(m, "W8A8Linear"):
            t = _init(m, n.input[3])
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.3, t.name))

    def reversed_bias(m):
        for n in _nodes(m, "W8A8Linear"):
            t = _init(m, n.input[4])
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[::-1].copy(), t.name))

    assert _check_mutant(llama, dst, tmp_path, wrong_scale, w8a8=True) == "FAIL"
    assert _check_mutant(llama, dst, tmp_path, reversed_bias, w8a8=True) == "FAIL"


def test_check_catches_a_wrong_static_activation_scale(llama, tmp_path):
    dst, report = _optimized(llama, tmp_path, static=True, calib=2)
    assert report["summary"]["insert_quant(static)"]["fused"] > 0

    def tiny_act_scale(m):  # activations clip at 1/20 of their calibrated range
        for n in _nodes(m, "QuantizeLinear"):
            t = _init(m, n.input[1])
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.05, t.name))

    assert _check_mutant(llama, dst, tmp_path, tiny_act_scale, static=True) == "FAIL"


def test_failed_check_writes_nothing(llama, tmp_path, monkeypatch):
    from vlmx.export.passes import fuse_attention

    def broken(graph, **kw):
        fuse_attention(graph, **kw)
        for n in graph.nodes:
            if n.op == "FlashAttention":
                n.attrs["scale"] *= 1.1
        return graph

    monkeypatch.setattr(O, "fuse_attention", broken)
    dst = tmp_path / "out.onnx"
    report = O.optimize(llama, dst, O.Options(attention="vlmx", seed=0))
    assert report["check"]["verdict"] == "FAIL" and not report["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp dir left
    assert "NOT written" in O.format_report(report)


# ------------------------------------------------------------------------------------------------ external data
def test_external_data_in_and_out_reads_only_rewritten_weights(tmp_path, monkeypatch):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    m, _, _ = S.export("clip", "dynamo", "eager", False, tmp_path / "plain.onnx", layers=2)
    onnx.save_model(m, str(src_dir / "in.onnx"), save_as_external_data=True, location="weights.bin")
    big = {t.name for t in onnx.load(str(src_dir / "in.onnx"), load_external_data=False).graph.initializer
           if large_model._external(t)}
    assert len(big) >= 12  # q, k, v, o, fc1, fc2 weights of two layers
    loaded = []
    real_load = large_model.FileValues.load
    monkeypatch.setattr(large_model.FileValues, "load", lambda self: loaded.append(self.tensor.name) or
                        real_load(self))
    dst = tmp_path / "out" / "model.onnx"
    report = O.optimize(src_dir / "in.onnx", dst, O.Options(qkv=True, seed=0))
    assert report["summary"]["fuse_qkv"]["fused"] == 2 and report["check"]["verdict"] == "PASS"
    fused = [r for r in report["passes"]["fuse_qkv"] if r["status"] == "fused"]
    assert len(fused) == 2
    # only the q/k/v weights of the two fused groups were read from disk (biases are inline, < 1 KiB)
    assert len(set(loaded)) == 6 and set(loaded) <= big, sorted(set(loaded))
    out = onnx.load(str(dst), load_external_data=False)
    locations = {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    (src_dir / "weights.bin").unlink()  # the output stands alone
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(dst))


def _attention_model(opset):
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "c"], ["s1"]),
             helper.make_node("Softmax", ["s1"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    ins = [helper.make_tensor_value_info(n, f32, ["batch", 2, "seq", 8]) for n in ("q", "k", "v")]
    g = helper.make_graph(nodes, "attn", ins, [helper.make_tensor_value_info("o", f32, None)],
                          [numpy_helper.from_array(np.asarray(0.3, np.float32), "c")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 24])
def test_opsets_17_to_24(tmp_path, opset):
    onnx.save(_attention_model(opset), str(tmp_path / "in.onnx"))
    report = O.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", O.Options(attention="vlmx"))
    assert report["summary"]["fuse_attention"]["fused"] == 1 and report["check"]["verdict"] == "PASS"


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_reports_per_layer_and_strict(tmp_path, llama, capsys):
    dst = tmp_path / "out.onnx"
    assert main([str(llama), str(dst), "--qkv", "--attention", "vlmx", "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "fuse_attention: 2 fused, 0 not matched" in out and "numeric check" in out and "PASS" in out
    assert "only 2 projections" in out  # the MLP gate/up pair, with the reason and the node
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["check"]["verdict"] == "PASS" and len(saved["passes"]["fuse_attention"]) == 2
    onnx.save(_attention_model(18), str(tmp_path / "attn.onnx"))
    assert main([str(tmp_path / "attn.onnx"), str(tmp_path / "o2.onnx"), "--qkv"]) == 0
    assert main([str(tmp_path / "attn.onnx"), str(tmp_path / "o3.onnx"), "--qkv", "--strict"]) == 1
    assert "fuse_qkv matched nothing" in capsys.readouterr().err


def _bad(tmp_path, capsys, argv):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm-optimize: error:") and "Traceback" not in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return err[0]


def test_cli_bad_inputs_give_one_line(tmp_path, capsys):
    good = tmp_path / "attn.onnx"
    onnx.save(_attention_model(18), str(good))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    onnx.save(_attention_model(16), str(tmp_path / "old.onnx"))
    out = tmp_path / "o.onnx"
    assert "does not exist" in _bad(tmp_path, capsys, [tmp_path / "missing.onnx", out, "--qkv"])
    assert "not a readable ONNX model" in _bad(tmp_path, capsys, [tmp_path / "junk.onnx", out, "--qkv"])
    assert "opset 16" in _bad(tmp_path, capsys, [tmp_path / "old.onnx", out, "--qkv"])
    assert "needs opset 23" in _bad(tmp_path, capsys, [good, out, "--attention", "onnx"])
    assert "not known" in _bad(tmp_path, capsys, [good, out, "--attention", "flash"])
    assert "no pass requested" in _bad(tmp_path, capsys, [good, out])
    assert "NAME=SIZE" in _bad(tmp_path, capsys, [good, out, "--qkv", "--dim", "seq"])
    assert "exists" in _bad(tmp_path, capsys, [good, good.with_name("junk.onnx"), "--qkv"])
    assert "must end in .onnx" in _bad(tmp_path, capsys, [good, tmp_path / "o.bin", "--qkv"])
    assert "choose one" in _bad(tmp_path, capsys, [good, out, "--w8a8", "--static-qdq"])


def test_cli_missing_external_data_is_one_line(tmp_path, capsys):
    m = _attention_model(18)
    m.graph.initializer.append(numpy_helper.from_array(np.ones((64, 64), np.float32), "w"))
    d = tmp_path / "m"
    d.mkdir()
    onnx.save_model(m, str(d / "in.onnx"), save_as_external_data=True, location="in.data", size_threshold=0)
    (d / "in.data").unlink()
    assert "missing next to the model" in _bad(tmp_path, capsys, [d / "in.onnx", tmp_path / "o.onnx", "--qkv"])


@pytest.mark.slow
def test_graph_over_2gb_is_optimized_without_loading_its_weights(tmp_path):
    """A 2.2 GB embedding table in external data (a sparse file) plus three projections: vlm-optimize fuses the
    projections in a process whose peak memory stays far below the weights, and streams the table to OUT.data."""
    import subprocess
    import sys

    rows, width = 17_200_000, 32  # 17.2M x 32 float32 = 2.2 GB
    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}") for i in range(3)]
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width])
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"])] + \
        [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(3)]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(3)],
                          [table] + ws)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    data = tmp_path / "big.bin"
    nbytes = rows * width * 4
    with open(data, "wb") as f:
        f.truncate(nbytes)  # sparse: no disk used for the input table
        off = nbytes
        for t in model.graph.initializer:
            if t.name == "table":
                large_model._set_external(t, "big.bin", 0, nbytes)
            else:
                f.seek(off)
                f.write(t.raw_data)
                large_model._set_external(t, "big.bin", off, len(t.raw_data))
                off += len(t.raw_data)
    (tmp_path / "big.onnx").write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    # The peak is measured by a fresh wrapper process: RUSAGE_CHILDREN of this pytest process would be the maximum
    # over every child the suite started before (CLI subprocesses of other tests), not vlm-optimize's own.
    wrap = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    try:
        r = subprocess.run([sys.executable, "-c", wrap, sys.executable, "-m", "vlmx.export.optimize_cli",
                            str(tmp_path / "big.onnx"), str(out), "--qkv", "--no-check"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "fuse_qkv: 1 fused" in r.stdout
        peak_mb = int(r.stdout.rsplit("peak_kb", 1)[1].split()[0]) / 1024
        assert peak_mb < 1200, peak_mb  # the 2.2 GB table was never in memory
        assert (tmp_path / "out.onnx.data").stat().st_size >= nbytes and out.stat().st_size < 1 << 20
        fused = onnx.load(str(out), load_external_data=False)
        assert [n.op_type for n in fused.graph.node] == ["Gather", "MatMul", "Split"]
    finally:
        for p in (data, tmp_path / "out.onnx.data"):
            p.unlink(missing_ok=True)


def test_not_matched_says_why_and_where(tmp_path):
    """Probabilities that are also a graph output (need_weights) cannot be fused: the row names the reason and
    the Softmax; with --strip-functions the check is reported as not run (bare vlmx nodes)."""
    m = _attention_model(18)
    m.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    onnx.save(m, str(tmp_path / "in.onnx"))
    report = O.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", O.Options(attention="vlmx"))
    (row,) = report["passes"]["fuse_attention"]
    assert row["status"] == "not matched" and "graph output" in row["reason"] and row["at"].startswith("Softmax")
    onnx.save(_attention_model(18), str(tmp_path / "in2.onnx"))
    report = O.optimize(tmp_path / "in2.onnx", tmp_path / "out2.onnx",
                        O.Options(attention="vlmx", strip_functions=True))
    assert report["summary"]["strip_functions"]["fused"] == 1 and report["check"]["verdict"] == "not run"
    out = onnx.load(str(tmp_path / "out2.onnx"))
    assert [n.op_type for n in out.graph.node] == ["FlashAttention"] and not out.functions


def test_cli_input_that_onnx_runtime_cannot_run_is_one_line(tmp_path, capsys):
    m = _attention_model(18)
    m.graph.node.append(helper.make_node("NoSuchOp", ["o"], ["z"], domain="acme"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    m.opset_import.append(helper.make_opsetid("acme", 1))
    onnx.save(m, str(tmp_path / "in.onnx"))
    err = _bad(tmp_path, capsys, [tmp_path / "in.onnx", tmp_path / "new" / "dir" / "o.onnx", "--attention", "vlmx"])
    assert "cannot run the input model" in err and "--no-check" in err  # and new/dir was removed again

"""insert_quant_streamed: the large-graph (external data) path of W8A8 quantization, forced on small graphs.

It must give exactly the in-memory insert_quant's graph numerics, keep skipped linears float, write one new data
file without the float weights it replaced, and leave nothing behind on failure."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from test_export_helpers import assert_close
from test_pass_quant import _mlp
from vlmx.export.functions import attach_functions
from vlmx.export.passes import insert_quant, run_passes
from vlmx.export.passes.insert_quant import skip_nodes
from vlmx.export.passes.insert_quant_streamed import insert_quant_streamed, read_tensor
from vlmx.torch_ref.op_table import DOMAIN, op_for_type


def _external(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model with external data rewrites the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    return path, onnx.load(str(path), load_external_data=False)


def _run(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    """Node op names, vlmx variant nodes (``<Op>_v<k>``, one per attribute/arity variant) counted as their op."""
    return [op_for_type(n.op_type).name if n.domain == DOMAIN else n.op_type for n in model.graph.node]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_equals_in_memory(tmp_path, dtype):
    model, feed = _mlp(dtype, seed=3)
    path, lazy = _external(model, tmp_path)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    quant = insert_quant_streamed(lazy, tmp_path)
    attach_functions(quant)
    onnx.save(quant, str(path))
    ops = _ops(quant)
    assert ops.count("W8A8Linear") == 2 and "MatMul" not in ops and "Add" not in ops, ops
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "m.onnx.data"}
    out = _run(path, feed)
    ref_q = run_passes(model, [lambda g: insert_quant(g, "dynamic")])
    mem = ort.InferenceSession(ref_q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(out, mem)  # same rounding, same scales: bit-identical
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert_close(out, ref, "w8a8", "streamed W8A8 MLP")
    # the float weights are gone from the data file: int8 [N, K] + fp32 scales + the bias
    assert (tmp_path / "m.onnx.data").stat().st_size < sum(
        numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    wq = next(t for t in quant.graph.initializer if t.name.endswith("_wq"))
    assert read_tensor(wq, tmp_path).dtype == np.int8


def test_streamed_skip_keeps_float(tmp_path):
    model, feed = _mlp(np.float32, seed=4)
    first = model.graph.node[0].name = "first_linear"
    path, lazy = _external(model, tmp_path)
    quant = insert_quant_streamed(lazy, tmp_path, skip={first})
    attach_functions(quant)
    onnx.save(quant, str(path))
    ops = _ops(quant)
    assert ops.count("W8A8Linear") == 1 and ops.count("MatMul") == 1, ops
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert_close(_run(path, feed), ref, "w8a8", "streamed W8A8 MLP, first linear float")


def test_streamed_failure_leaves_data_untouched(tmp_path):
    model, _ = _mlp(np.float32, seed=5)
    path, lazy = _external(model, tmp_path)
    before = (tmp_path / "m.onnx.data").read_bytes()
    (tmp_path / "m.onnx.data").write_bytes(before[: len(before) // 8])  # truncated: a weight cannot be read
    with pytest.raises(ValueError):
        insert_quant_streamed(lazy, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "m.onnx.data"}


def test_skip_nodes_from_scope_metadata():
    model, _ = _mlp(np.float32)
    for node, scope in zip([n for n in model.graph.node if n.op_type == "MatMul"],
                           ["decoder.lm.layers.0.mlp.up_proj", "decoder.lm.layers.3.mlp.down_proj"]):
        node.name = scope.replace(".", "_")
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", "decoder", scope, "linear"]))
    assert skip_nodes(model, ["model.language_model.layers.3.mlp.down_proj"]) == {"decoder_lm_layers_3_mlp_down_proj"}
    assert skip_nodes(model, ["model.layers.0.mlp.up_proj", "lm_head"]) == {"decoder_lm_layers_0_mlp_up_proj"}
    assert skip_nodes(model, ["layers.1.mlp.up_proj"]) == set()


def test_insert_quant_skip_in_memory():
    model, feed = _mlp(np.float32)
    model.graph.node[0].name = "keep_me"
    quant = run_passes(model, [lambda g: insert_quant(g, "dynamic", skip={"keep_me"})])
    ops = _ops(quant)
    assert ops.count("W8A8Linear") == 1 and ops.count("MatMul") == 1, ops

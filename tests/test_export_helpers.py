"""Shared helpers of the export and pass tests (no tests here): relative error with named tolerances, ONNX Runtime
runs, and single-node vlmx models."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from vlmx.export.domain import node_attrs
from vlmx.export.functions import attach_functions
from vlmx.torch_ref.contract import THRESHOLDS
from vlmx.torch_ref.op_table import OPS

#: Named tolerances on ‖out − ref‖ / ‖ref‖: the export contract's per-precision thresholds, plus a tighter one.
TOLERANCES = {
    "fp32_exact_math": 1e-6,   # same float32 math, different op order
    **THRESHOLDS,              # fp32 / fp16 / w8a8: the graph contract
}


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def assert_close(out, ref, tolerance: str, what: str = "") -> float:
    """Report the relative error and assert it is within the named tolerance."""
    err = relative_error(out, ref)
    limit = TOLERANCES[tolerance]
    print(f"{what}: relative error {err:.3e} (tolerance {tolerance} = {limit:g})")
    assert np.all(np.isfinite(np.asarray(out, np.float64))), f"{what}: non-finite output"
    assert err <= limit, f"{what}: relative error {err:.3e} > {tolerance} ({limit:g})"
    return err


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return session(model).run(None, feed)


_NP = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "int8": TensorProto.INT8,
       "int64": TensorProto.INT64}


def single_op_model(op_name: str, tensors: list, attrs: dict, opset: int = 18, out_shapes: list | None = None):
    """A model with one vlmx node (absent optional inputs as None) backed by its function. Returns (model, feed)."""
    op = OPS[op_name]
    names = [t.name if v is not None else "" for t, v in zip(op.inputs, tensors)]
    while names and not names[-1]:
        names.pop()
    outs = [f"{t.name}_out" for t in op.outputs if not t.optional]
    node = helper.make_node(op_name, names, outs, domain="vlmx", **node_attrs(op, attrs))
    float_type = next((v.dtype for t, v in zip(op.inputs, tensors) if v is not None and t.dtype == "T"), None)
    if op_name == "W8A8Linear":
        float_type = tensors[4].dtype if tensors[4] is not None else np.dtype(node_attrs(op, attrs)["out_dtype"])
    ins = [helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for t, v in zip(op.inputs, tensors) if v is not None]
    out_vi = []
    for i, t in enumerate([t for t in op.outputs if not t.optional]):
        dt = helper.np_dtype_to_tensor_dtype(np.dtype(float_type)) if t.dtype == "T" else _NP[t.dtype]
        shape = out_shapes[i] if out_shapes else None
        out_vi.append(helper.make_tensor_value_info(f"{t.name}_out", dt, shape))
    graph = helper.make_graph([node], f"single_{op_name}", ins, out_vi)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("vlmx", 1)])
    attach_functions(model)
    feed = {t.name: v for t, v in zip(op.inputs, tensors) if v is not None}
    return model, feed

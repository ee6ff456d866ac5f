"""``fuse_qkv``: three (or more) projections of one tensor become one GEMM and a Split.

```
x ─┬─ MatMul(Wq) ─ Add(bq) ─ q        x ─ MatMul([Wq|Wk|Wv]) ─ Add([bq|bk|bv]) ─ Split ─ q, k, v
   ├─ MatMul(Wk) ─ Add(bk) ─ k   =>
   └─ MatMul(Wv) ─ Add(bv) ─ v
```

A projection is ``MatMul(x, W)`` with a constant 2-D ``W [K, N]``, optionally followed by ``Add`` of a constant
``[N]`` bias (the only consumer of the MatMul). Projections without a bias get zeros in the fused bias when others
have one (``y + 0`` is exact). Groups of fewer than three projections (an MLP's gate/up pair) are left alone.
Candidates are found from shapes and dtypes alone, so weights stored on disk are read only for the groups fused.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

MIN_GROUP = 3


def _is_projection(node: gs.Node) -> bool:
    """``MatMul(x, W)`` with a constant 2-D W, judged without reading W's values."""
    return node.op == "MatMul" and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant) and \
        len(node.inputs[1].shape) == 2


def _weight(node: gs.Node) -> np.ndarray | None:
    if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = node.inputs[1].values
    return w if w.ndim == 2 else None


def _bias(node: gs.Node):
    """``(add_node, bias)`` when the MatMul's only consumer adds a constant [N] bias, else ``(None, None)``."""
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return None, None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if not isinstance(other, gs.Constant):
        return None, None
    b = other.values
    n = node.inputs[1].values.shape[1]
    if b.shape != (n,):
        return None, None
    return add, b


def _groups(graph: gs.Graph, report: list | None = None):
    for tensor in list(graph.tensors().values()):
        if isinstance(tensor, gs.Constant):
            continue
        projs = [n for n in tensor.outputs if n.inputs and n.inputs[0] is tensor and _is_projection(n)]
        if len(projs) < 2:
            continue
        row = {"input": tensor.name, "projections": len(projs)}
        k = {n.inputs[1].shape[0] for n in projs}
        dtypes = {np.dtype(n.inputs[1].dtype) for n in projs}
        if len(projs) < MIN_GROUP:
            row.update(status="not matched", reason=f"only {len(projs)} projections of this tensor (needs "
                       f"{MIN_GROUP}: an MLP gate/up pair is left alone)", at=f"MatMul {projs[0].name!r}")
        elif len(k) != 1 or len(dtypes) != 1:
            row.update(status="not matched", reason="projection weights differ in input size or dtype",
                       at=f"MatMul {projs[0].name!r}")
        else:
            row.update(status="fused", detail="+".join(str(n.inputs[1].shape[1]) for n in projs))
            yield tensor, projs
        if report is not None:
            report.append(row)


def fuse_qkv(graph: gs.Graph, report: list | None = None) -> gs.Graph:
    """Fuse every group of ≥3 constant-weight MatMul(+Add) projections reading one tensor (one ``report`` row per
    tensor read by two or more projections); returns the graph."""
    for x, projs in list(_groups(graph, report)):
        weights = [_weight(n) for n in projs]
        biases = [_bias(n) for n in projs]
        sizes = [w.shape[1] for w in weights]
        name = projs[0].name or x.name
        fused_w = gs.Constant(f"{name}_qkv_weight", np.concatenate(weights, axis=1))
        y = gs.Variable(f"{name}_qkv_matmul", dtype=x.dtype)
        graph.nodes.append(gs.Node("MatMul", f"{name}_qkv_matmul", inputs=[x, fused_w], outputs=[y]))
        if any(b is not None for _, b in biases):
            dtype = weights[0].dtype
            fused_b = np.concatenate([b if b is not None else np.zeros(n, dtype) for (_, b), n in zip(biases, sizes)])
            yb = gs.Variable(f"{name}_qkv_biased", dtype=x.dtype)
            graph.nodes.append(gs.Node("Add", f"{name}_qkv_bias", inputs=[y, gs.Constant(f"{name}_qkv_b",
                                                                                        fused_b.astype(dtype))],
                                       outputs=[yb]))
            y = yb
        outs = []
        for node, (add, _) in zip(projs, biases):
            last = add if add is not None else node
            old = last.outputs[0]
            last.outputs.clear()
            node.outputs.clear()
            outs.append(old)
        split = gs.Constant(f"{name}_qkv_split", np.asarray(sizes, dtype=np.int64))
        graph.nodes.append(gs.Node("Split", f"{name}_qkv_split", attrs={"axis": -1}, inputs=[y, split],
                                   outputs=outs))
        for node in projs:
            node.inputs.clear()
    return graph.cleanup().toposort()

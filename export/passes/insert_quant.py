"""``insert_quant``: int8 linear layers, in one of two forms.

```
mode="dynamic" (vlmx W8A8Linear, per-token activation scales computed at run time):
x ─ MatMul(W) ─ Add(b) ─ y   =>   x ─ vlmx.QuantizePerToken ─ (q, s) ─ vlmx.W8A8Linear(q, s, Wq, w_scale, b) ─ y

mode="static" (standard Q/DQ, TensorRT's INT8 form: per-tensor activation scale from calibration,
per-output-channel weight scale):
x ─ MatMul(W) ─ y   =>   x ─ QuantizeLinear(sₓ) ─ DequantizeLinear(sₓ) ─ MatMul(DequantizeLinear(Wq, s_w, axis=1)) ─ y
```

Linear = ``MatMul(x, W)`` with a constant 2-D ``W [K, N]`` (optionally followed by an ``Add`` of a constant ``[N]``
bias, folded into W8A8Linear). Weights are quantized symmetrically per output channel (``s_w = max|W[:, n]|/127``).
Already-quantized graphs have no float constant-weight MatMul left, so the pass is idempotent. ``skip``: node names of
linears to keep float (:func:`skip_nodes` finds them from module names; a fused ``<q>_qkv_matmul`` is skipped with
its first projection ``<q>``).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vlmx.torch_ref.op_table import DOMAIN, OPS, QMAX, QUANT_EPS

from ..domain import node_attrs
from .fuse_qkv import _bias, _weight

MODES = ("dynamic", "static")


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W [K, N]`` → (int8 ``[K, N]``, float32 per-channel scale ``[N]``), symmetric round-half-even."""
    wf = w.astype(np.float32)
    scale = np.maximum(np.abs(wf).max(axis=0), QUANT_EPS) / QMAX
    q = np.clip(np.rint(wf / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def linears(graph: gs.Graph, skip=()) -> list[gs.Node]:
    """Float MatMul nodes with a constant 2-D weight (except those named in ``skip``)."""
    skip = set(skip)
    return [n for n in graph.nodes if _weight(n) is not None and np.issubdtype(_weight(n).dtype, np.floating)
            and n.name not in skip and n.name.removesuffix("_qkv_matmul") not in skip]


def _tail(module: str) -> str:
    """The part of a module path that names the same linear in any wrapper: from ``layers.N.`` on, else the leaf."""
    i = module.rfind("layers.")
    return module[i:] if i >= 0 else module.rpartition(".")[2]


def skip_nodes(model: onnx.ModelProto, modules) -> set[str]:
    """Names of the MatMul nodes that the torch modules ``modules`` (e.g. ``model.layers.3.mlp.down_proj``,
    ``lm_head``) became, from the exporter's scope metadata (read it before graphsurgeon passes, which drop it)."""
    tails = {_tail(m) for m in modules}
    found = set()
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        parts = [s.strip(" '") for s in scopes.strip("[]").split(",") if s.strip(" '")]
        if len(parts) >= 2 and _tail(parts[-2]) in tails:
            found.add(node.name)
    return found


def _dynamic(graph: gs.Graph, node: gs.Node, i: int) -> None:
    x, w = node.inputs[0], _weight(node)
    add, b = _bias(node)
    wq, ws = quantize_weight(w)
    name = node.name or f"linear_{i}"
    q = gs.Variable(f"{name}_xq", dtype=np.int8)
    s = gs.Variable(f"{name}_xs", dtype=np.float32)
    graph.nodes.append(gs.Node("QuantizePerToken", f"{name}_quantize", domain=DOMAIN,
                               attrs=node_attrs(OPS["QuantizePerToken"], {}), inputs=[x], outputs=[q, s]))
    ins = [q, s, gs.Constant(f"{name}_wq", np.ascontiguousarray(wq.T)), gs.Constant(f"{name}_ws", ws)]
    if b is not None:
        ins.append(gs.Constant(f"{name}_bias", b))
    last = add if add is not None else node
    y = last.outputs[0]
    last.outputs.clear()
    node.outputs.clear()
    node.inputs.clear()
    out_dtype = "float16" if w.dtype == np.float16 else "float32"
    graph.nodes.append(gs.Node("W8A8Linear", f"{name}_w8a8", domain=DOMAIN,
                               attrs=node_attrs(OPS["W8A8Linear"], {"out_dtype": out_dtype}), inputs=ins,
                               outputs=[y]))


def _static(graph: gs.Graph, node: gs.Node, i: int, amax: float) -> None:
    x, w = node.inputs[0], _weight(node)
    wq, ws = quantize_weight(w)
    name = node.name or f"linear_{i}"
    fdtype = w.dtype
    xs = gs.Constant(f"{name}_act_scale", np.asarray(max(amax, QUANT_EPS) / QMAX, dtype=fdtype))
    zp = gs.Constant(f"{name}_act_zp", np.asarray(0, dtype=np.int8))
    xq = gs.Variable(f"{name}_xq", dtype=np.int8)
    xd = gs.Variable(f"{name}_xdq", dtype=fdtype)
    wd = gs.Variable(f"{name}_wdq", dtype=fdtype)
    graph.nodes += [
        gs.Node("QuantizeLinear", f"{name}_q", inputs=[x, xs, zp], outputs=[xq]),
        gs.Node("DequantizeLinear", f"{name}_dq", inputs=[xq, xs, zp], outputs=[xd]),
        gs.Node("DequantizeLinear", f"{name}_wdq", attrs={"axis": 1},
                inputs=[gs.Constant(f"{name}_wq", wq), gs.Constant(f"{name}_ws", ws.astype(fdtype)),
                        gs.Constant(f"{name}_wzp", np.zeros(ws.shape, np.int8))], outputs=[wd]),
    ]
    node.inputs[0], node.inputs[1] = xd, wd


def insert_quant(graph: gs.Graph, mode: str = "dynamic", act_amax: dict[str, float] | None = None,
                 skip=()) -> gs.Graph:
    """Quantize every float constant-weight linear layer. ``mode="static"`` needs ``act_amax``: calibrated max |x|
    per activation tensor name (see :func:`calibrate`); a linear whose input was not calibrated is left in float."""
    if mode not in MODES:
        raise ValueError(f"insert_quant mode {mode!r} is not known; choose one of {list(MODES)}")
    if mode == "static" and act_amax is None:
        raise ValueError("insert_quant(mode='static') needs act_amax from calibrate(); pass --calib N")
    for i, node in enumerate(linears(graph, skip)):
        if mode == "dynamic":
            _dynamic(graph, node, i)
        elif node.inputs[0].name in act_amax:
            _static(graph, node, i, act_amax[node.inputs[0].name])
    return graph.cleanup().toposort()


def calibrate(model: onnx.ModelProto, feeds: list[dict]) -> dict[str, float]:
    """Max |x| of every linear layer's input over the calibration ``feeds`` (ONNX Runtime on the CPU)."""
    import onnxruntime as ort

    graph = gs.import_onnx(model)
    names = sorted({n.inputs[0].name for n in linears(graph)})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for n in names:
        if n not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(names, 0.0)
    for feed in feeds:
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        for n in names:
            amax[n] = max(amax[n], float(np.abs(outs[n].astype(np.float32)).max()))
    return amax

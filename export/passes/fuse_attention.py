"""``fuse_attention``: the decomposed attention core becomes one vlmx FlashAttention node (``layout=bhsd``).

```
q ─(Mul c₁)─┐
            MatMul ─ Mul/Div(scale) ─ Add(mask) ─ (Cast) ─ Softmax ─ (Cast) ─ MatMul ─ o
k ─ Transpose(…,3,2) ─(Mul c₂)─┘                                       v ─┘
   =>   q, k, v, mask ─ vlmx.FlashAttention(num_heads, num_kv_heads, head_dim, scale = scale·c₁·c₂) ─ o
```

Optional pieces: the scalar pre-scales c₁/c₂ (how torch lowers SDPA below opset 23), the scale, the mask, the
float32 Casts around Softmax. Q must be rank 4 with static head count and head dim (from value_info / shape
inference); intermediate scores and probabilities must have no other consumers. Each match is rewritten once; the
result contains no Softmax, so a second run finds nothing (idempotent).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from vlmx.torch_ref.op_table import DOMAIN, OPS

from ..domain import node_attrs


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _single_consumer(t: gs.Tensor, outputs: set) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and t.name not in outputs else None


def _scalar(t: gs.Tensor) -> float | None:
    if isinstance(t, gs.Constant) and t.values.size == 1:
        return float(np.asarray(t.values).reshape(-1)[0])
    return None


def _strip_scalar_mul(t: gs.Tensor) -> tuple[gs.Tensor, float]:
    """``Mul(x, c)`` with scalar constant ``c`` (x having no other use) → ``(x, c)``; else ``(t, 1)``."""
    node = _producer(t)
    if node is not None and node.op == "Mul" and len(t.outputs) == 1:
        for a, b in ((0, 1), (1, 0)):
            c = _scalar(node.inputs[b])
            if c is not None:
                return node.inputs[a], c
    return t, 1.0


def _static(t: gs.Tensor, axis: int) -> int | None:
    shape = t.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[axis], (int, np.integer)):
        return None
    return int(shape[axis])


def _leads_to_scores(t: gs.Tensor) -> bool:
    """True when ``t`` is ``MatMul(...)`` or ``Mul/Div(MatMul(...), scalar)``: the score side of the mask Add."""
    node = _producer(t)
    if node is not None and node.op in ("Mul", "Div") and _scalar(node.inputs[1]) is not None:
        node = _producer(node.inputs[0])
    return node is not None and node.op == "MatMul"


def _match(softmax: gs.Node, outputs: set):
    """Return the rewrite of one Softmax-centred attention core, or None."""
    axis = softmax.attrs.get("axis", -1)
    t = softmax.inputs[0]
    if axis not in (-1, 3):
        return None
    # ---- forward: (Cast) → MatMul(p, v)
    p = softmax.outputs[0]
    nxt = _single_consumer(p, outputs)
    if nxt is not None and nxt.op == "Cast":
        p = nxt.outputs[0]
        nxt = _single_consumer(p, outputs)
    if nxt is None or nxt.op != "MatMul" or nxt.inputs[0] is not p:
        return None
    pv, v = nxt, nxt.inputs[1]
    # ---- backward: (Cast) ← Add(mask) ← Mul/Div(scale) ← MatMul(q, kᵀ)
    scale, bias, cur = 1.0, None, t
    node = _producer(cur)
    if node is not None and node.op == "Cast" and len(cur.outputs) == 1:
        cur = node.inputs[0]
        node = _producer(cur)
    if node is not None and node.op == "Add" and len(cur.outputs) == 1:
        a, b = node.inputs
        if _leads_to_scores(a):
            cur, bias = a, b
        elif _leads_to_scores(b):
            cur, bias = b, a
        else:
            return None
        node = _producer(cur)
    if node is not None and node.op in ("Mul", "Div") and len(cur.outputs) == 1:
        c = _scalar(node.inputs[1])
        if c is None or c == 0:
            return None
        scale = c if node.op == "Mul" else 1.0 / c
        cur = node.inputs[0]
        node = _producer(cur)
    if node is None or node.op != "MatMul" or len(cur.outputs) != 1:
        return None
    q, c1 = _strip_scalar_mul(node.inputs[0])
    kt, c2 = _strip_scalar_mul(node.inputs[1])
    tr = _producer(kt)
    perm = list(tr.attrs.get("perm", [])) if tr is not None and tr.op == "Transpose" else []
    if len(perm) != 4 or perm[0] != 0:
        return None
    k_src = tr.inputs[0]
    k_perm = [perm[0], perm[1], perm[3], perm[2]]  # kᵀ = x.transpose(perm)  ⇒  k = x.transpose(k_perm)
    heads, head_dim = _static(q, 1), _static(q, 3)
    if heads is None or head_dim is None:
        return None
    src_shape = k_src.shape if k_src.shape is not None and len(k_src.shape) == 4 else None
    kv_heads = src_shape[k_perm[1]] if src_shape is not None else None
    kv_heads = int(kv_heads) if isinstance(kv_heads, (int, np.integer)) else heads
    if kv_heads < 1 or heads % kv_heads:
        return None
    return {"q": q, "k": k_src, "k_perm": k_perm, "v": v, "bias": bias, "out": pv, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "scale": scale * c1 * c2}


def fuse_attention(graph: gs.Graph) -> gs.Graph:
    """Replace every matched attention core by a vlmx FlashAttention node; returns the graph."""
    outputs = {t.name for t in graph.outputs}
    op = OPS["FlashAttention"]
    for i, sm in enumerate([n for n in graph.nodes if n.op == "Softmax"]):
        m = _match(sm, outputs)
        if m is None:
            continue
        k = m["k"]
        if m["k_perm"] != [0, 1, 2, 3]:
            k = gs.Variable(f"{sm.name or i}_fa_k", dtype=k.dtype)
            graph.nodes.append(gs.Node("Transpose", f"{sm.name or i}_fa_k_transpose", attrs={"perm": m["k_perm"]},
                                       inputs=[m["k"]], outputs=[k]))
        inputs = [m["q"], k, m["v"]]
        bias = m["bias"]
        if bias is not None:
            if bias.dtype is not None and m["q"].dtype is not None and bias.dtype != m["q"].dtype:
                cast = gs.Variable(f"{sm.name or i}_fa_bias", dtype=m["q"].dtype)
                graph.nodes.append(gs.Node("Cast", f"{sm.name or i}_fa_bias_cast",
                                           attrs={"to": _onnx_dtype(m["q"].dtype)}, inputs=[bias], outputs=[cast]))
                bias = cast
            inputs.append(bias)
        out = m["out"].outputs[0]
        m["out"].outputs.clear()
        attrs = node_attrs(op, {"num_heads": m["heads"], "num_kv_heads": m["kv_heads"], "head_dim": m["head_dim"],
                                "scale": m["scale"], "layout": "bhsd"})
        graph.nodes.append(gs.Node("FlashAttention", f"{sm.name or i}_flash_attention", attrs=attrs, inputs=inputs,
                                   outputs=[out], domain=DOMAIN))
    return graph.cleanup().toposort()


def _onnx_dtype(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

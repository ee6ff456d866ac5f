"""``fuse_attention``: a decomposed attention core becomes one vlmx ``FlashAttention`` node (``layout=bhsd``) or
the standard ONNX ``Attention`` (opset ≥ 23), whatever form torch.onnx wrote it in.

```
q ─(Mul c₁)───────────────────────┐
                                  MatMul ─ (Mul/Div c) ─ (Add bias)* ─ (Where(m, fill, ·)) ─ (Cast)* ─ Softmax ─┐
k ─ kᵀ ─(Mul c₂)──────────────────┘                          (Cast)* ─ (Where(IsNaN(p), 0, p)) ─ (Cast)* ─ MatMul ─ o
v ─────────────────────────────────────────────────────────────────────────────────────────────────────┘
   =>   q, k, v, bias ─ FlashAttention(num_heads, num_kv_heads, head_dim, scale = c·c₁·c₂) ─ o
```

kᵀ is ``Transpose(k, perm)`` (eager; any perm that is a head split plus a swap of the last two axes), or
``Reshape(Transpose(Reshape(k, [B·H, S, D]), [0, 2, 1]), [B, H, D, S])`` (dynamo's SDPA lowering). GQA/MQA key
and value expansion (``Reshape(Expand(Unsqueeze(kv, 2)))``, or the same folded into the kᵀ reshape) is undone, so
the fused node reads the ``H_kv`` heads. Scalar constants may be initializers or ``Constant`` nodes (legacy
exporter). A masked fill before Softmax (MPT) becomes an additive bias ``Where(m, fill, 0)``; an ALiBi bias stays
an additive bias unless its values are verified (below). The NaN guard of SDPA's safe softmax is kept by the fused
op's semantics (a row that sees no key gives 0). Head count and head dim come from static shapes, or from the
Reshape that split the heads (``[B, S, -1, D]`` of a ``[B, S, H·D]`` tensor).

Every Softmax is reported: fused, or not matched with the reason and the node where the pattern broke. The result
contains no Softmax for fused layers, so a second run finds nothing new (idempotent). Names are never used. A constant
bias equal to MPT's ALiBi (static shapes) becomes the op's ``alibi`` attribute.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from vlmx.torch_ref.op_table import DOMAIN, OPS

from ..domain import node_attrs
from .tensor_facts import const_values, dim, producer, rank, scalar

TARGETS = ("vlmx", "onnx")
#: First default-domain opset with the standard ``Attention`` op.
ONNX_ATTENTION_OPSET = 23
#: MPT's default ``alibi_bias_max``: the slopes a constant bias is verified against.
ALIBI_BIAS_MAX = 8


class NoMatch(Exception):
    """The pattern broke at ``node`` for ``reason``."""

    def __init__(self, reason: str, node: gs.Node | None = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


# ------------------------------------------------------------------------------------------------ small helpers
def _single_use(t, outputs: set) -> bool:
    return len(t.outputs) == 1 and t.name not in outputs


def _strip_scalar_mul(t, outputs: set) -> tuple:
    """``Mul(x, c)`` with a scalar constant c and a single use → ``(x, c)``; else ``(t, 1)``."""
    node = producer(t)
    if node is not None and node.op == "Mul" and _single_use(t, outputs):
        for a, b in ((0, 1), (1, 0)):
            c = scalar(node.inputs[b])
            if c is not None:
                return node.inputs[a], c
    return t, 1.0


# ------------------------------------------------------------------------------------------------ pattern pieces
def _undo_kv_expand(t, heads: int | None):
    """``Reshape(Expand(Unsqueeze(kv, axis=2)), [B, H, S, D])`` (repeat_kv) → ``(kv, H_kv)``; else ``(t, None)``."""
    node = producer(t)
    src = node.inputs[0] if node is not None and node.op == "Reshape" and rank(node.inputs[0]) == 5 else None
    if node is not None and node.op == "Expand" and rank(t) == 5:  # already the 5-D expansion
        src = t
    if src is None:
        return t, None
    exp = producer(src)
    if exp is None or exp.op != "Expand":
        return t, None
    un = producer(exp.inputs[0])
    if un is None or un.op != "Unsqueeze":
        return t, None
    axes = un.attrs.get("axes")
    axes = list(axes) if axes is not None else (
        None if len(un.inputs) < 2 or const_values(un.inputs[1]) is None else
        [int(a) for a in const_values(un.inputs[1]).reshape(-1)])
    kv = un.inputs[0]
    if axes not in ([2], [-3]) or rank(kv) != 4:
        return t, None
    kv_heads = dim(kv, 1)
    if kv_heads is None or (heads is not None and heads % kv_heads):
        return t, None
    return kv, kv_heads


def _undo_kv_expand_cast(t, heads: int | None, outputs: set):
    """:func:`_undo_kv_expand`, also through one ``Cast`` after the expansion (SDPA upcasting float16 inputs; the
    rewrite casts the kv heads to q's type itself)."""
    kv, kv_heads = _undo_kv_expand(t, heads)
    node = producer(t)
    if kv_heads is None and node is not None and node.op == "Cast" and _single_use(t, outputs):
        inner, h = _undo_kv_expand(node.inputs[0], heads)
        if h is not None:
            return inner, h
    return kv, kv_heads


def _key(kt, heads, outputs: set):
    """kᵀ → ``(k source, perm to bhsd or None, kv heads or None)``; raises NoMatch."""
    tr = producer(kt)
    if tr is None:
        raise NoMatch("kᵀ is a graph input or initializer, not a transposed key")
    if tr.op == "Transpose":
        perm = list(tr.attrs.get("perm", []))
        if len(perm) != 4 or perm[0] != 0:
            raise NoMatch(f"kᵀ Transpose perm {perm} does not keep the batch axis first", tr)
        k_perm = [perm[0], perm[1], perm[3], perm[2]]  # kᵀ = x.transpose(perm)  ⇒  k = x.transpose(k_perm)
        src = tr.inputs[0]
        if k_perm == [0, 1, 2, 3]:
            kv, kv_heads = _undo_kv_expand_cast(src, heads, outputs)
            return kv, None, kv_heads
        return src, k_perm, None
    if tr.op == "Reshape" and rank(kt) == 4:
        t2 = producer(tr.inputs[0])
        if t2 is None or t2.op != "Transpose" or list(t2.attrs.get("perm", [])) != [0, 2, 1]:
            raise NoMatch("kᵀ Reshape does not follow a Transpose(0, 2, 1)", tr)
        r1 = producer(t2.inputs[0])
        if r1 is None or r1.op != "Reshape" or rank(r1.outputs[0]) != 3:
            raise NoMatch("kᵀ Transpose(0, 2, 1) does not follow a rank-3 Reshape", t2)
        src = r1.inputs[0]
        if rank(src) == 5:
            kv, kv_heads = _undo_kv_expand(src, heads)
            if kv_heads is None:
                raise NoMatch("rank-5 key before the kᵀ reshapes is not a repeat_kv expansion", r1)
            return kv, None, kv_heads
        if rank(src) != 4:
            raise NoMatch("key before the kᵀ reshapes is not rank 4", r1)
        d_src, d_kt = dim(src, 3), dim(kt, 2)
        if d_src is None or (d_kt is None and not _views_of(src, r1, tr)) or (d_kt is not None and d_src != d_kt):
            raise NoMatch(f"kᵀ reshapes do not transpose the head dim ({d_src} vs {d_kt})", tr)
        kv, kv_heads = _undo_kv_expand_cast(src, heads, outputs)
        return kv, None, kv_heads
    raise NoMatch(f"kᵀ comes from {tr.op}, not a Transpose or the SDPA reshape chain", tr)


def _views_of(src, *reshapes) -> bool:
    """Every Reshape target is built only from constants and slices of ``Shape(src)`` (dynamic-shape exports)."""
    def from_src_shape(t, depth=3):
        n = producer(t)
        if n is None or depth == 0:
            return False
        if n.op == "Shape":
            return n.inputs[0] is src or (producer(n.inputs[0]) is not None and producer(n.inputs[0]).op == "Transpose"
                                          and producer(n.inputs[0]).outputs[0] is src)
        return n.op in ("Slice", "Gather", "Squeeze", "Unsqueeze") and from_src_shape(n.inputs[0], depth - 1)

    for r in reshapes:
        cat = producer(r.inputs[1])
        if cat is None or cat.op != "Concat" or not all(const_values(x) is not None or from_src_shape(x)
                                                         for x in cat.inputs):
            return False
    return True


def _score_side(node: gs.Node, outputs: set):
    """Of a binary node's two inputs, ``(scores, other)`` where scores is the single-use tensor computed from the
    QKᵀ MatMul (masks and position biases are shared by all layers, or constant)."""
    def reaches(t, depth=6):
        n = producer(t)
        if n is None or depth == 0:
            return False
        if n.op == "MatMul":
            return not any(isinstance(x, gs.Constant) for x in n.inputs)
        return n.op in ("Cast", "Mul", "Div", "Add", "Where") and any(reaches(x, depth - 1) for x in n.inputs)

    ins = [x for x in node.inputs]
    cands = [i for i, x in enumerate(ins) if _single_use(x, outputs) and reaches(x)]
    if len(cands) != 1:
        return None, None
    return ins[cands[0]], ins[1 - cands[0]] if len(ins) == 2 else None


def match(softmax: gs.Node, outputs: set) -> dict:
    """The rewrite of one Softmax-centred attention core; raises :class:`NoMatch`."""
    axis = softmax.attrs.get("axis", -1)
    r = rank(softmax.inputs[0])
    if axis != -1 and not (r is not None and axis == r - 1):
        raise NoMatch(f"Softmax axis {axis} is not the last axis", softmax)
    # ---- forward: (Cast)* → (Where(IsNaN(p), 0, p)) → (Cast)* → MatMul(p, v)
    p, guard, casts = softmax.outputs[0], False, 0
    while True:
        users = [n for n in p.outputs]
        if p.name in outputs:
            raise NoMatch("attention probabilities are a graph output", softmax)
        if len(users) == 1 and users[0].op == "Cast":
            p, casts = users[0].outputs[0], casts + 1
            continue
        if len(users) == 2 and not guard and {u.op for u in users} == {"IsNaN", "Where"}:
            isnan = next(u for u in users if u.op == "IsNaN")
            where = next(u for u in users if u.op == "Where")
            zero = scalar(where.inputs[1])
            if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p or zero != 0.0 or \
                    len(isnan.outputs[0].outputs) != 1:
                raise NoMatch("IsNaN/Where after Softmax is not the safe-softmax guard Where(IsNaN(p), 0, p)", where)
            p, guard = where.outputs[0], True
            continue
        break
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not p:
        what = ", ".join(u.op for u in users) or "nothing"
        raise NoMatch(f"Softmax output feeds {what}, not only the P·V MatMul", users[0] if len(users) == 1 else softmax)
    pv = users[0]
    v = pv.inputs[1]
    # ---- backward: (Cast)* ← (Where fill) ← (Add bias)* ← (Mul/Div c) ← MatMul(q, kᵀ)
    cur, factor, biases, fill = softmax.inputs[0], 1.0, [], None
    while True:
        node = producer(cur)
        if node is None:
            raise NoMatch("scores come from a graph input, not a Q·Kᵀ MatMul", softmax)
        if not _single_use(cur, outputs):
            raise NoMatch(f"scores after {node.op} have another consumer", node)
        if node.op == "Cast":
            cur, casts = node.inputs[0], casts + 1
        elif node.op in ("Mul", "Div"):
            c = scalar(node.inputs[1])
            if c is None and node.op == "Mul":
                c, other = scalar(node.inputs[0]), node.inputs[1]
            else:
                other = node.inputs[0]
            if c is None or c == 0 or not np.isfinite(c):
                raise NoMatch(f"{node.op} on the scores is not by a finite non-zero scalar constant", node)
            factor *= c if node.op == "Mul" else 1.0 / c
            cur = other
        elif node.op == "Add":
            scores, bias = _score_side(node, outputs)
            if scores is None:
                raise NoMatch("Add before Softmax: cannot tell the scores from the bias", node)
            biases.append((bias, factor))
            cur = scores
        elif node.op == "Where" and fill is None and not biases and factor == 1.0:
            cond, a, b = node.inputs
            fa, fb = scalar(a), scalar(b)
            if fa is not None and fb is None:
                fill, cur = (cond, fa, True), b
            elif fb is not None and fa is None:
                fill, cur = (cond, fb, False), a
            else:
                raise NoMatch("Where before Softmax is not a masked fill with a scalar", node)
        elif node.op == "MatMul":
            break
        else:
            raise NoMatch(f"{node.op} between the Q·Kᵀ MatMul and Softmax is not part of the pattern", node)
    qk = node
    q, c1 = _strip_scalar_mul(qk.inputs[0], outputs)
    kt, c2 = _strip_scalar_mul(qk.inputs[1], outputs)
    if rank(q) != 4:
        raise NoMatch("Q is not rank 4 [B, H, S, D] (shape unknown)", qk)
    heads, head_dim = dim(q, 1), dim(q, 3)
    if heads is None or head_dim is None:
        raise NoMatch("Q's head count or head dim is not static", qk)
    k, k_perm, kv_heads = _key(kt, heads, outputs)
    if kv_heads is None:
        kv_heads = dim(k, k_perm[1] if k_perm else 1)
    if kv_heads is None:
        raise NoMatch("K's head count is not static", qk)
    v_src, v_heads = _undo_kv_expand_cast(v, heads, outputs)
    if v_heads is None:
        v_heads = dim(v, 1)
    if v_heads != kv_heads and k_perm is None:  # value expanded differently from the key: read the expanded heads
        raise NoMatch(f"K has {kv_heads} heads but V has {v_heads}", pv)
    if kv_heads < 1 or heads % kv_heads:
        raise NoMatch(f"{heads} query heads are not a multiple of {kv_heads} key/value heads", qk)
    d_v = dim(v_src, 3)
    if d_v is not None and d_v != head_dim:
        raise NoMatch(f"V head dim {d_v} differs from Q head dim {head_dim}", pv)
    return {"q": q, "k": k, "k_perm": k_perm, "v": v_src, "biases": biases, "fill": fill, "out": pv,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "scale": factor * c1 * c2, "guard": guard,
            "casts": casts}


# ------------------------------------------------------------------------------------------------ rewrite
def _onnx_dtype(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _bias_tensor(graph: gs.Graph, m: dict, name: str):
    """One additive bias from the matched biases and masked fill (None when there is none)."""
    dtype = m["q"].dtype
    parts = []
    for i, (b, f) in enumerate(m["biases"]):
        if f != 1.0:
            scaled = gs.Variable(f"{name}_bias{i}_scaled", dtype=b.dtype)
            graph.nodes.append(gs.Node("Mul", f"{name}_bias{i}_scale", inputs=[b, gs.Constant(
                f"{name}_bias{i}_factor", np.asarray(f, dtype=b.dtype or np.float32))], outputs=[scaled]))
            b = scaled
        parts.append(b)
    if m["fill"] is not None:
        cond, value, fill_when_true = m["fill"]
        fdtype = np.dtype(dtype or np.float32)
        fv, zero = gs.Constant(f"{name}_fill", np.asarray(value, fdtype)), gs.Constant(f"{name}_zero",
                                                                                        np.asarray(0, fdtype))
        out = gs.Variable(f"{name}_fill_bias", dtype=fdtype)
        graph.nodes.append(gs.Node("Where", f"{name}_fill_where", inputs=[cond, fv, zero] if fill_when_true else
                                   [cond, zero, fv], outputs=[out]))
        parts.append(out)
    bias = None
    for i, b in enumerate(parts):
        if b.dtype is not None and dtype is not None and np.dtype(b.dtype) != np.dtype(dtype):
            cast = gs.Variable(f"{name}_bias{i}_cast", dtype=dtype)
            graph.nodes.append(gs.Node("Cast", f"{name}_bias{i}_to_q", attrs={"to": _onnx_dtype(dtype)}, inputs=[b],
                                       outputs=[cast]))
            b = cast
        if bias is None:
            bias = b
        else:
            total = gs.Variable(f"{name}_bias_sum{i}", dtype=dtype)
            graph.nodes.append(gs.Node("Add", f"{name}_bias_add{i}", inputs=[bias, b], outputs=[total]))
            bias = total
    return bias


def _alibi(b, heads: int) -> bool:
    """``b`` is a constant ALiBi bias ``slope_h · (j − (L − 1))`` with MPT's slopes, shape [H, 1, L] or [1, H, 1, L]
    (a static-shape MPT export); shapes are checked before any value is read."""
    node = producer(b)
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        b = node.attrs["value"]
    if not isinstance(b, gs.Constant) or b.shape is None or len(b.shape) not in (3, 4):
        return False
    shape = tuple(b.shape) if len(b.shape) == 4 else (1, *b.shape)
    if shape[:3] != (1, heads, 1) or shape[3] < 2:
        return False
    from vlmx.torch_ref.alibi import alibi_bias

    ref = alibi_bias(heads, shape[3], ALIBI_BIAS_MAX).numpy()
    return bool(np.allclose(np.asarray(b.values, np.float32).reshape(shape), ref, rtol=1e-5, atol=1e-6))


def _rewrite(graph: gs.Graph, m: dict, name: str, target: str) -> None:
    m["alibi"] = False
    if target == "vlmx":  # a verified ALiBi constant becomes the op's alibi attribute (ONNX Attention has none)
        for i, (b, f) in enumerate(m["biases"]):
            if f == 1.0 and _alibi(b, m["heads"]):
                m["biases"].pop(i)
                m["alibi"] = True
                break
    qdt = m["q"].dtype
    for key in ("k", "v"):  # the fused op takes q, k, v in one type (SDPA may have upcast only some of them)
        t = m[key]
        if t.dtype is not None and qdt is not None and np.dtype(t.dtype) != np.dtype(qdt):
            cast = gs.Variable(f"{name}_{key}_as_q", dtype=qdt)
            graph.nodes.append(gs.Node("Cast", f"{name}_{key}_as_q", attrs={"to": _onnx_dtype(qdt)}, inputs=[t],
                                       outputs=[cast]))
            m[key] = cast
    k = m["k"]
    if m["k_perm"] is not None:
        k = gs.Variable(f"{name}_k", dtype=k.dtype)
        graph.nodes.append(gs.Node("Transpose", f"{name}_k_transpose", attrs={"perm": m["k_perm"]},
                                   inputs=[m["k"]], outputs=[k]))
    bias = _bias_tensor(graph, m, name)
    final = m["out"].outputs[0]
    m["out"].outputs.clear()
    out = final
    if final.dtype is not None and qdt is not None and np.dtype(final.dtype) != np.dtype(qdt):
        out = gs.Variable(f"{name}_out", dtype=qdt)  # computed in q's type, then the type the graph expects
        graph.nodes.append(gs.Node("Cast", f"{name}_out_cast", attrs={"to": _onnx_dtype(final.dtype)},
                                   inputs=[out], outputs=[final]))
    inputs = [m["q"], k, m["v"]] + ([bias] if bias is not None else [])
    if target == "vlmx":
        attrs = node_attrs(OPS["FlashAttention"], {"num_heads": m["heads"], "num_kv_heads": m["kv_heads"],
                                                   "head_dim": m["head_dim"], "scale": m["scale"], "layout": "bhsd",
                                                   "alibi": int(m["alibi"]), "alibi_bias_max": ALIBI_BIAS_MAX})
        graph.nodes.append(gs.Node("FlashAttention", f"{name}_flash_attention", attrs=attrs, inputs=inputs,
                                   outputs=[out], domain=DOMAIN))
        return
    attrs = {"scale": float(m["scale"])}
    if m["casts"]:
        attrs["softmax_precision"] = 1  # FLOAT, as the Casts around Softmax asked
    o = gs.Variable(f"{name}_attention_out", dtype=out.dtype) if m["guard"] else out
    graph.nodes.append(gs.Node("Attention", f"{name}_attention", attrs=attrs, inputs=inputs, outputs=[o]))
    if m["guard"]:  # rows that see no key: NaN from Attention, 0 from the guarded softmax
        nan = gs.Variable(f"{name}_isnan", dtype=np.bool_)
        graph.nodes += [gs.Node("IsNaN", f"{name}_isnan", inputs=[o], outputs=[nan]),
                        gs.Node("Where", f"{name}_nan_guard", inputs=[nan, gs.Constant(
                            f"{name}_nan_zero", np.asarray(0, np.dtype(out.dtype or np.float32))), o], outputs=[out])]


def describe(m: dict) -> str:
    parts = [f"H={m['heads']}", f"H_kv={m['kv_heads']}", f"D={m['head_dim']}", f"scale={m['scale']:.6g}"]
    if m["biases"]:
        parts.append(f"{len(m['biases'])} additive bias")
    if m.get("alibi"):
        parts.append("ALiBi (slopes verified)")
    if m["fill"] is not None:
        parts.append("masked fill")
    if m["guard"]:
        parts.append("NaN guard")
    return ", ".join(parts)


def fuse_attention(graph: gs.Graph, target: str = "vlmx", report: list | None = None) -> gs.Graph:
    """Replace every matched attention core by one fused node (``target`` ``vlmx``: FlashAttention, ``onnx``: the
    opset-23 ``Attention``); append one row per Softmax to ``report``; returns the graph."""
    if target not in TARGETS:
        raise ValueError(f"fuse_attention target {target!r} is not known; choose one of {list(TARGETS)}")
    outputs = {t.name for t in graph.outputs}
    for i, sm in enumerate([n for n in graph.nodes if n.op == "Softmax"]):
        row = {"layer": i, "softmax": sm.name}
        try:
            m = match(sm, outputs)
        except NoMatch as e:
            row.update(status="not matched", reason=e.reason,
                       at=f"{e.node.op} {e.node.name!r}" if e.node is not None else f"Softmax {sm.name!r}")
        else:
            _rewrite(graph, m, f"{sm.name or 'softmax'}_{i}", target)
            row.update(status="fused", detail=describe(m))
        if report is not None:
            report.append(row)
    return graph.cleanup().toposort()

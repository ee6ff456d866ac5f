"""onnx-graphsurgeon passes. Each is one module with one ``Graph -> Graph`` function that finds a pattern, rewrites
it in place, cleans up and returns the graph; each is idempotent and knows nothing about files or CLI flags.

:func:`run_passes` applies passes to an ``onnx.ModelProto`` and rebuilds the vlmx functions afterwards (graphsurgeon
does not carry node overloads), unless ``strip_functions`` ran. A model without ``value_info`` gets ONNX shape
inference first (the attention pattern needs ranks and static head sizes).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .cleanup import cleanup, infer_shapes
from .fuse_attention import fuse_attention
from .fuse_qkv import fuse_qkv
from .insert_quant import calibrate, insert_quant
from .strip_functions import strip_functions

__all__ = ["calibrate", "cleanup", "infer_shapes", "fuse_attention", "fuse_qkv", "insert_quant", "run_passes", "strip_functions"]


def run_passes(model: onnx.ModelProto, passes, functions: bool = True) -> onnx.ModelProto:
    """Import ``model`` into graphsurgeon, apply ``passes`` (callables ``Graph -> Graph``) in order, export, and
    (with ``functions``) back every vlmx node with its model-local function again."""
    from vlmx.export.functions import attach_functions

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if not model.graph.value_info:  # patterns need ranks and static head sizes
        model = infer_shapes(model)
    graph = gs.import_onnx(model)
    for p in passes:
        graph = p(graph)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    if opset is not None and not any(o.domain == "vlmx" for o in out.opset_import) and \
            any(n.domain == "vlmx" for n in out.graph.node):
        out.opset_import.append(onnx.helper.make_opsetid("vlmx", 1))
    if functions:
        attach_functions(out)
    return out

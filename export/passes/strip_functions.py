"""``strip_functions`` (``--plugins-only``): remove the model-local vlmx function bodies, leaving bare vlmx nodes
for runtimes that implement them as plugins (TensorRT with the vlmx plugin library)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from vlmx.torch_ref.op_table import DOMAIN


def strip_functions(graph: gs.Graph) -> gs.Graph:
    """Drop every function in the vlmx domain; other functions are kept. Idempotent."""
    graph.functions = [f for f in graph.functions if f.domain != DOMAIN]
    return graph

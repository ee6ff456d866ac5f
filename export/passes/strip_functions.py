"""``strip_functions`` (``--plugins-only``): remove the model-local vlmx function bodies, leaving bare vlmx nodes
for runtimes that implement them as plugins (TensorRT with the vlmx plugin library).

```
FlashAttention_v1(q, bias)  + function FlashAttention_v1(q, bias)   =>   FlashAttention(q, bias)
```
Every node is named after its op again (the plugin creators' names) with its inputs in op-table order, by
:func:`vlmx.export.functions.bare_node`, the rule :func:`~vlmx.export.functions.strip_vlmx_functions` follows.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..functions import bare_node
from vlmx.torch_ref.op_table import DOMAIN


def strip_functions(graph: gs.Graph) -> gs.Graph:
    """Drop every function in the vlmx domain and name every vlmx node after its op; other functions are kept.
    Idempotent."""
    formal = {f.name: [t.name for t in f.inputs] for f in graph.functions if f.domain == DOMAIN}
    for node in graph.nodes:
        if node.domain == DOMAIN:
            node.op, inputs = bare_node(node.op, list(node.inputs), formal.get(node.op), lambda t: bool(t.name))
            node.inputs.clear()
            node.inputs.extend(inputs)
    graph.functions = [f for f in graph.functions if f.domain != DOMAIN]
    return graph

"""``cleanup``: drop dead nodes and tensors, sort topologically (graphsurgeon), then infer shapes where possible."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def cleanup(graph: gs.Graph) -> gs.Graph:
    """Remove unused nodes/tensors and toposort; returns the graph."""
    return graph.cleanup().toposort()


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference that never fails the export: a model it cannot handle is returned unchanged."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is an optimisation, not a requirement
        return model

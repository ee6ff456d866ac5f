"""torch → ONNX for one graph: ``torch.onnx.export(dynamo=True)`` with the vlmx translation table, then the
model-local function of every vlmx node, written with external data when the weights pass the 2 GB protobuf limit.

Weights are streamed: the exporter writes initializers straight from the torch tensors to the file (or the
``.onnx.data`` file), and the post-export steps re-open only the graph (``load_external_data=False``), so no second
full copy of the weights is ever held.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch

from . import domain
from .options import MAX_OPSET, MIN_OPSET, check_opset  # noqa: F401  (re-exported)
from .functions import attach_functions
from .model_configs import GraphSpec

#: Protobuf's hard limit is 2 GiB; above this many initializer bytes the weights go to ``<file>.data``.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Model metadata key holding :func:`layer_outputs` of the exported graph.
LAYER_OUTPUTS_KEY = "vlmx.layer_outputs"
_LAYER_SCOPE = re.compile(r"'([\w.]*\.layers?\.\d+)'")  # CLIP/SigLIP/Llama ``layers``, DINOv2 ``layer``


class ExportError(RuntimeError):
    """torch.onnx could not export a graph; the message names the graph and the cause."""


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter/buffer storages a module holds."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export dynamic shapes from the spec's named axes (``"past+1"`` becomes ``Dim("past") + 1``)."""
    dims: dict[str, object] = {}

    def dim(name: str):
        base, _, plus = name.partition("+")
        if base not in dims:
            dims[base] = torch.export.Dim(base, min=1)
        return dims[base] + int(plus) if plus else dims[base]

    flat = [{axis: dim(n) for axis, n in spec.dynamic_axes.get(name, {}).items()} or None for name in spec.inputs]
    params = inspect.signature(spec.module.forward).parameters.values()
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # forward(a, b, *rest): rest is one tuple entry
        return (*flat[:len(fixed)], tuple(flat[len(fixed):]))
    return tuple(flat)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings per stage; the CLI shows its own progress instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_graph(spec: GraphSpec, out_dir: str | Path, opset: int = 18, postprocess=None,
                 functions: bool = True, external_threshold: int | None = None) -> Path:
    """Export ``spec`` to ``out_dir/<name>.onnx``; ``postprocess(model_proto, external) -> model_proto`` runs
    before the vlmx functions are attached (``external``: the weights live in ``<name>.onnx.data`` and are not
    loaded, so only graph-level and streamed passes may run). ``functions=False`` leaves the vlmx nodes bare
    (``--plugins-only``). ``external_threshold``: weight bytes above which the weights go to external data (default
    :data:`EXTERNAL_DATA_THRESHOLD`; tests force the large-graph path with a small one). Returns the file path."""
    check_opset(opset)
    out = Path(out_dir) / spec.file
    limit = EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold
    external = weight_bytes(spec.module) > limit
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(spec.module, tuple(spec.inputs.values()), input_names=list(spec.inputs),
                                     output_names=spec.outputs, dynamic_shapes=dynamic_shapes(spec),
                                     opset_version=opset, dynamo=True,
                                     custom_translation_table=domain.translation_table(), optimize=True)
            prog.save(str(out), external_data=external)
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many types; one message names the graph
        raise ExportError(f"exporting the {spec.name} graph failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    del prog
    model = onnx.load(str(out), load_external_data=False)
    rename_dims(model.graph, spec.dim_names)
    fix_dims(model.graph, spec.dim_values)
    layers = layer_outputs(model)
    if postprocess is not None:
        model = postprocess(model, external)
    model.metadata_props.add(key=LAYER_OUTPUTS_KEY, value=json.dumps(layers))
    if functions:
        attach_functions(model)
    onnx.save(model, str(out))
    return out


def layer_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """``{module path of a numbered layer: output of its last node}`` from the exporter's scope metadata (the
    per-layer tensors of the accuracy report; graph passes keep these names)."""
    last = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        for scope in _LAYER_SCOPE.findall(scopes):
            last[scope] = node.output[0]
    return last


def fix_dims(graph: onnx.GraphProto, values: dict[str, int]) -> None:
    """Give named symbolic dimensions a fixed size in every typed value of the graph."""
    if not values:
        return
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in values:
                d.dim_value = int(values[d.dim_param])  # clears the dim_param (a oneof)


def rename_dims(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename symbolic dimensions (``dim_param``) of every typed value in the graph."""
    if not names:
        return
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]


def data_files(onnx_path: str | Path) -> list[Path]:
    """External data files an ONNX file references (relative to its directory)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location":
                names.add(kv.value)
    return [Path(onnx_path).parent / n for n in sorted(names)]


def file_size(path: str | Path) -> int:
    return os.path.getsize(path)

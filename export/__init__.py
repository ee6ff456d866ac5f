"""vlmx.export: torch → ONNX with self-describing ``vlmx`` custom ops, graph passes, accuracy report, ``vlm-export``.

How the pieces fit (data flows top to bottom):

- :mod:`.model_configs` — one config object per model family (``llava``, ``llava-siglip``, ``llava-mpt``) in one
  table: graph I/O names, dynamic axes, TensorRT profiles, seeded dummy inputs, which modules to swap for each
  ``--attention`` mode. :mod:`.graphs` holds the torch wrappers whose I/O is the artifact contract.
- :mod:`.domain` — the ``vlmx`` domain generated from :mod:`vlmx.torch_ref.op_table`: ONNX schemas, and the
  ``custom_translation_table`` that makes ``torch.onnx.export(dynamo=True)`` emit one ``vlmx`` node per
  ``torch.ops.vlmx.*`` call, with the op-table attributes plus ``plugin_namespace="vlmx"``/``plugin_version="1"``.
- :mod:`.function_bodies` / :mod:`.functions` — every vlmx node is backed by a model-local function (domain vlmx,
  name = op name) whose body is the reference semantics in standard ONNX ops, computed in float32 and cast back
  with ``CastLike``. Attributes are baked into the body; nodes of one op that differ in attributes get one function
  per variant, told apart by the IR-10 ``overload`` field (a model with a single variant per op, the usual case,
  has no overloads at all). ONNX Runtime therefore runs every exported file unmodified.
- :mod:`.exporter` — one graph: dynamo export, weights streamed straight from the torch tensors into the file (or
  ``<graph>.onnx.data`` above 1.8 GB), then the graph alone is re-opened for the passes and the functions.
- :mod:`.passes` — onnx-graphsurgeon passes (``fuse_qkv``, ``fuse_attention``, ``insert_quant``,
  ``strip_functions``, ``cleanup``), each idempotent, each one module.
- :mod:`.report` — polygraphy's ONNX Runtime runner vs the torch reference (a float32 copy of the same weights for
  float16/w8a8 exports) per output, thresholds fp32 1e-5 / fp16 1e-3 / w8a8 3e-2 relative, plus the vision
  tower's per-layer error plot. Float16 graphs are checked as exported on ONNX Runtime's CPU provider (the vlmx
  bodies compute in float32; the standard ops have CPU float16 kernels in ONNX Runtime >= 1.20).
- :mod:`.driver` / :mod:`.cli` — ``vlm-export``: validation, per-stage progress, ``<out>.vlmx-tmp-<pid>`` renamed into
  place when complete, ``manifest.json``, ``reference.npz``, ``report.{json,md}``, ``vlmx_ops.md``.
"""

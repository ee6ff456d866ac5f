"""ONNX Runtime backend: runs the exported ONNX files as they are (vlmx nodes through their function bodies)."""
from __future__ import annotations

import numpy as np

from .runner import Runner

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "int8": np.int8, "bool": np.bool_}


class OrtRunner(Runner):
    """One ONNX file in an ``onnxruntime.InferenceSession``; inputs are cast to the graph's declared dtypes."""

    name = "onnxruntime"

    def __init__(self, path, inputs: list[dict] | None = None, providers: list[str] | None = None,
                 threads: int | None = None):
        super().__init__()
        self.path = str(path)
        self.declared = {i["name"]: i.get("dtype") for i in (inputs or [])}
        self.providers = providers
        self.threads = threads
        self.session = None

    def _activate(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = self.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                       if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _infer(self, feed):
        self.check_feed(feed, self.input_names, self.path)
        cast = {}
        for n in self.input_names:
            arr = np.asarray(feed[n])
            want = _NP_DTYPES.get(self.declared.get(n) or "")
            cast[n] = np.ascontiguousarray(arr.astype(want, copy=False) if want is not None else arr)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, cast)))

    def _deactivate(self):
        self.session = None


PLUGINS_ONLY_REFUSAL = ("was exported with --plugins-only: its vlmx nodes have no function bodies, which ONNX "
                        "Runtime needs; re-export without --plugins-only, or run it with --backend tensorrt and the "
                        "vlmx plugin library")


def graph_runners(artifacts, providers=None, threads=None, **_) -> dict[str, Runner]:
    """An :class:`OrtRunner` per graph in the export directory (refused for --plugins-only exports)."""
    if artifacts.manifest.get("plugins_only"):
        raise ValueError(f"{artifacts.root} {PLUGINS_ONLY_REFUSAL}")
    return {name: OrtRunner(artifacts.graph_path(name), artifacts.graph(name).get("inputs"), providers, threads)
            for name in artifacts.manifest["graphs"]}

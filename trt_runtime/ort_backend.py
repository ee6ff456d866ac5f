"""ONNX Runtime backend: runs the exported ONNX files as they are (vlmx nodes through their function bodies).

Every run goes through an ``IOBinding``. Buffers given to :meth:`OrtRunner.bind` are wrapped once as ``OrtValue`` s
over the caller's memory (numpy arrays on the CPU provider, torch CUDA tensors by pointer on the CUDA provider) and
stay bound: the KV cache is bound as both ``past.*`` (input) and ``present.*`` (output), so ``TensorScatter`` writes
in place (ONNX Runtime logs "in-place optimization not activated" whenever it has to copy instead). Per call only
the changed inputs are bound. On the CUDA provider, torch CUDA tensors go in and come out (``device_io``).
"""
from __future__ import annotations

import numpy as np

from .runner import Runner

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "int8": np.int8, "bool": np.bool_}


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class OrtRunner(Runner):
    """One ONNX file in an ``onnxruntime.InferenceSession``; inputs are cast to the graph's declared dtypes."""

    name = "onnxruntime"

    def __init__(self, path, inputs: list[dict] | None = None, providers: list[str] | None = None,
                 threads: int | None = None, outputs: list[dict] | None = None):
        super().__init__()
        self.path = str(path)
        self.declared = {i["name"]: i.get("dtype") for i in (inputs or [])}
        self.declared_out = {o["name"]: o for o in (outputs or [])}
        self.providers = providers
        self.threads = threads
        self.session = None
        self._values: dict = {}

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _activate(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = self.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                       if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device_io = self.on_cuda
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _deactivate(self):
        self.session = None
        self._values = {}

    # ------------------------------------------------------------------------------------------------ buffers
    def alloc(self, name, shape, dtype):
        if getattr(self, "on_cuda", False):
            import torch

            return torch.zeros(tuple(shape), dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
        return np.zeros(tuple(shape), dtype=np.dtype(dtype))

    def _ortvalue(self, arr: np.ndarray):
        """An OrtValue over a host array's own memory (no copy)."""
        import onnxruntime as ort

        if not arr.flags.c_contiguous:
            raise ValueError("buffers bound to ONNX Runtime must be C-contiguous")
        return ort.OrtValue.ortvalue_from_numpy(arr)

    def bind(self, buffers):
        super().bind(buffers)
        for name, buf in buffers.items():
            if _is_torch(buf) and buf.is_cuda:
                if not buf.is_contiguous():
                    raise ValueError(f"bound buffer {name} must be contiguous")
                self._values[name] = (None, buf)  # bound by pointer on every run (IOBinding has no pointer OrtValue)
            else:
                arr = buf.numpy() if _is_torch(buf) else buf
                self._values[name] = (self._ortvalue(arr), buf)

    def unbind(self):
        super().unbind()
        self._values = {}

    def bound_pointer(self, name: str) -> int:
        """The device/host address ONNX Runtime reads or writes for a bound buffer (for tests and benchmarks)."""
        value, buf = self._values[name]
        return buf.data_ptr() if value is None else value.data_ptr()

    # ------------------------------------------------------------------------------------------------ running
    def _bind_cuda(self, io, name: str, t, output: bool) -> None:
        dt = np.dtype(str(t.dtype).removeprefix("torch."))
        bind = io.bind_output if output else io.bind_input
        bind(name, "cuda", t.device.index or 0, dt, list(t.shape), t.data_ptr())

    def _input(self, name, value):
        """A host array, or (CUDA provider) a contiguous torch CUDA tensor of the declared dtype."""
        want = _NP_DTYPES.get(self.declared.get(name) or "")
        if _is_torch(value):
            if value.is_cuda and self.on_cuda:
                import torch

                return value.to(getattr(torch, np.dtype(want).name) if want else value.dtype).contiguous()
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        return np.ascontiguousarray(arr.astype(want, copy=False) if want is not None else arr)

    def _infer(self, feed):
        self.check_feed(feed, self.input_names, self.path)
        io = self.session.io_binding()
        held = []  # keeps fed tensors alive until the run is done
        for n in self.input_names:
            if n in feed:
                x = self._input(n, feed[n])
                held.append(x)
                if isinstance(x, np.ndarray):
                    io.bind_cpu_input(n, x)  # CPU provider: over x's memory; CUDA provider: one upload
                else:
                    self._bind_cuda(io, n, x, output=False)
            elif self._values[n][0] is None:
                self._bind_cuda(io, n, self._values[n][1], output=False)
            else:
                io.bind_ortvalue_input(n, self._values[n][0])
        for n in self.output_names:
            if n in self._values:
                value, buf = self._values[n]
                self._bind_cuda(io, n, buf, output=True) if value is None else io.bind_ortvalue_output(n, value)
            else:
                io.bind_output(n, "cuda" if self.on_cuda else "cpu")
        self.session.run_with_iobinding(io)
        out = {}
        for n, v in zip(self.output_names, io.get_outputs()):
            if n in self._values:
                out[n] = self._values[n][1]
            elif self.on_cuda:
                out[n] = _cuda_view(v).clone()  # ONNX Runtime's own device output, copied once on the device
            else:
                out[n] = v.numpy()
        return out


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(bool)": "bool"}


class _CudaArray:
    def __init__(self, value):
        self.__cuda_array_interface__ = {"shape": tuple(value.shape()), "version": 3, "strides": None,
                                         "typestr": np.dtype(_ORT_TYPES[value.data_type()]).str,
                                         "data": (value.data_ptr(), False)}


def _cuda_view(value):
    """A torch view of a CUDA OrtValue (``__cuda_array_interface__``, no copy)."""
    import torch

    return torch.as_tensor(_CudaArray(value), device="cuda")


PLUGINS_ONLY_REFUSAL = ("was exported with --plugins-only: its vlmx nodes have no function bodies, which ONNX "
                        "Runtime needs; re-export without --plugins-only, or run it with --backend tensorrt and the "
                        "vlmx plugin library")


def graph_runners(artifacts, providers=None, threads=None, **_) -> dict[str, Runner]:
    """An :class:`OrtRunner` per graph in the export directory (refused for --plugins-only exports)."""
    if artifacts.manifest.get("plugins_only"):
        raise ValueError(f"{artifacts.root} {PLUGINS_ONLY_REFUSAL}")
    return {name: OrtRunner(artifacts.graph_path(name), artifacts.graph(name).get("inputs"), providers, threads,
                            artifacts.graph(name).get("outputs"))
            for name in artifacts.manifest["graphs"]}

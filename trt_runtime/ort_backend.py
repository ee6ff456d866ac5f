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

    def _ortvalue(self, x):
        """An OrtValue over ``x``'s own memory (no copy): numpy on the CPU, a torch CUDA tensor by pointer."""
        import onnxruntime as ort

        if _is_torch(x) and x.is_cuda:
            if not x.is_contiguous():
                raise ValueError("buffers bound to ONNX Runtime must be contiguous")
            return ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.dtype(str(x.dtype).split(".")[-1]),
                                                             "cuda", x.device.index or 0, x.data_ptr())
        arr = x.numpy() if _is_torch(x) else x
        if not arr.flags.c_contiguous:
            raise ValueError("buffers bound to ONNX Runtime must be C-contiguous")
        return ort.OrtValue.ortvalue_from_numpy(arr)

    def bind(self, buffers):
        super().bind(buffers)
        for name, buf in buffers.items():
            self._values[name] = (self._ortvalue(buf), buf)

    def unbind(self):
        super().unbind()
        self._values = {}

    def bound_pointer(self, name: str) -> int:
        """The device/host address ONNX Runtime reads or writes for a bound buffer (for tests and benchmarks)."""
        return self._values[name][0].data_ptr()

    # ------------------------------------------------------------------------------------------------ running
    def _input(self, name, value):
        want = _NP_DTYPES.get(self.declared.get(name) or "")
        if _is_torch(value):
            if value.is_cuda and self.on_cuda:
                return self._ortvalue(value.contiguous() if want is None else value.to(getattr(
                    __import__("torch"), np.dtype(want).name)).contiguous())
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        return np.ascontiguousarray(arr.astype(want, copy=False) if want is not None else arr)

    def _infer(self, feed):
        self.check_feed(feed, self.input_names, self.path)
        io = self.session.io_binding()
        held = []
        for n in self.input_names:
            if n in feed:
                x = self._input(n, feed[n])
                held.append(x)
                if isinstance(x, np.ndarray):
                    io.bind_cpu_input(n, x)  # CPU provider: over x's memory; CUDA provider: one upload
                else:
                    io.bind_ortvalue_input(n, x)
            else:
                io.bind_ortvalue_input(n, self._values[n][0])
        device = "cuda" if self.on_cuda else "cpu"
        for n in self.output_names:
            if n in self._values:
                io.bind_ortvalue_output(n, self._values[n][0])
            else:
                io.bind_output(n, device)
        self.session.run_with_iobinding(io)
        values = io.get_outputs()
        out = {}
        for n, v in zip(self.output_names, values):
            if n in self._values:
                out[n] = self._values[n][1]
            elif self.on_cuda:
                import torch  # ONNX Runtime's own CUDA output, copied once on the device into torch memory

                t = torch.empty(v.shape(), dtype=getattr(torch, np.dtype(_ORT_TYPES[v.data_type()]).name),
                                device="cuda")
                io_copy = self._ortvalue(t)
                _copy_device(v, io_copy)
                out[n] = t
            else:
                out[n] = v.numpy()
        return out


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(bool)": "bool"}


def _copy_device(src, dst) -> None:
    """Device-to-device copy between two CUDA OrtValues (through cuda-python's cudaMemcpy when present)."""
    from cuda.bindings import runtime as cudart  # the [gpu] extra; only reached on the CUDA provider

    nbytes = int(np.prod(src.shape())) * np.dtype(_ORT_TYPES[src.data_type()]).itemsize
    cudart.cudaMemcpy(dst.data_ptr(), src.data_ptr(), nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice)


def graph_runners(artifacts, providers=None, threads=None, **_) -> dict[str, Runner]:
    """An :class:`OrtRunner` per graph in the export directory."""
    return {name: OrtRunner(artifacts.graph_path(name), artifacts.graph(name).get("inputs"), providers, threads,
                            artifacts.graph(name).get("outputs"))
            for name in artifacts.manifest["graphs"]}

# vlmx on the NVIDIA TensorRT container, with the vlmx TensorRT plugin library and Triton kernels built for Turing.
#
#   docker build -t vlmx:trt-sm75 .
#   docker run --gpus all -v $PWD/out:/out vlmx:trt-sm75 \
#       sh -c 'vlm-export --model llava --target trt-sm75 --out /out/llava && vlm-build --artifacts /out/llava'
#
# NOT BUILT IN OUR ENVIRONMENT: the machines this project is developed and tested on have no Docker engine and no
# access to nvcr.io, so this file has never been built or run. What was checked instead (docs/tensorrt.md): the
# plugin library compiles against the public TensorRT 10.8/10.13/10.16/11.0/11.1 headers, its creators pass a
# host-side check, and the engine build path is tested with TensorRT-RTX on the CPU.
#
# Base image: TensorRT still supports Turing (sm_75). Volta (sm_70) support ended with TensorRT 10.5; no release
# notes we found drop Turing, and TensorRT's OSS build lists SM 75 in every 10.x release and again in 11.1 (11.0's
# default list omitted it). vlmx needs TensorRT >= 10.15: the ONNX Attention importer (10.14) and the rule that a
# node's plugin_namespace/plugin_version attributes select a registered plugin over its function body (10.15).
# The default below is the NGC release expected to carry TensorRT 10.16 (CUDA 13.2), the last 10.x; the tag to
# version mapping could not be verified from here, so the first RUN step checks the TensorRT inside and stops with a
# message if it is outside [10.15, 11.0) or [11.1, ...). Override with --build-arg TRT_CONTAINER=<image>.
ARG TRT_CONTAINER=nvcr.io/nvidia/tensorrt:26.04-py3
FROM ${TRT_CONTAINER}

# Compute capability of the target GPU (75 = T4 / RTX 20xx / Quadro RTX). The CUDA kernels get SASS for it plus
# compute_75 PTX; the Triton kernels are compiled ahead of time for it on the host (no GPU needed at build time).
ARG VLMX_SM=75
ARG VLMX_TARGET=trt-sm75
ENV TENSORRT_ROOT=/usr \
    VLMX_HOME=/opt/vlmx \
    PIP_NO_CACHE_DIR=1

RUN python3 - <<'EOF'
import tensorrt
major, minor = (int(x) for x in tensorrt.__version__.split(".")[:2])
ok = (10, 15) <= (major, minor) < (11, 0) or (major, minor) >= (11, 1)
print(f"TensorRT {tensorrt.__version__} in the base image: {'ok' if ok else 'NOT SUPPORTED'}")
if not ok:
    raise SystemExit(f"TensorRT {tensorrt.__version__} is not supported by vlmx: it needs >= 10.15 (plugin "
                     "precedence, ONNX Attention) and not 11.0 (no SM75 in its plugin build); pass "
                     "--build-arg TRT_CONTAINER=<an NGC TensorRT image with TensorRT 10.15-10.x or >= 11.1>")
EOF
RUN nvcc --list-gpu-arch | grep -q "compute_${VLMX_SM}" \
    || (echo "nvcc in ${TRT_CONTAINER} cannot compile for sm_${VLMX_SM}" >&2; exit 1)

WORKDIR ${VLMX_HOME}
COPY pyproject.toml README.md ./
COPY torch_ref ./torch_ref
COPY export ./export
COPY plugins ./plugins
COPY trt_runtime ./trt_runtime
COPY scripts ./scripts

# vlmx and its Python dependencies (torch with CUDA from PyPI; Triton only as the ahead-of-time compiler).
RUN python3 -m pip install --upgrade pip \
    && python3 -m pip install -e ".[export,gpu]" "triton>=3.4,<3.7"

# 1. Triton kernels: cubins + PTX + manifest.json for the target, next to the plugin library (it reads
#    <library dir>/triton/manifest.json).
# 2. The TensorRT plugin library (IPluginV3 creators + CUDA kernels for sm_${VLMX_SM} + compute_75 PTX).
RUN python3 -m vlmx.plugins.triton_aot --target ${VLMX_TARGET} --out ${VLMX_HOME}/lib/triton \
    && python3 -m vlmx.plugins.trt_build --sm ${VLMX_SM} --tensorrt-root ${TENSORRT_ROOT} \
           --build-dir ${VLMX_HOME}/build/trt_plugins \
    && cp ${VLMX_HOME}/build/trt_plugins/libvlmx_trt_plugins.so ${VLMX_HOME}/lib/ \
    && nm -D --defined-only ${VLMX_HOME}/lib/libvlmx_trt_plugins.so | grep -q " getCreators$"

# vlm-build picks this library up; trtexec takes it as
#   trtexec --onnx=vision.onnx --dynamicPlugins=$VLMX_PLUGIN_LIB --enablePluginOverride --saveEngine=vision.plan
ENV VLMX_PLUGIN_LIB=${VLMX_HOME}/lib/libvlmx_trt_plugins.so
CMD ["vlm-build", "--help"]

#!/usr/bin/env bash
# One device call for issue 16 (kernels, plugin glue, GPU tests) on the lent GPU. Everything from compute_75 PTX
# (the driver JIT runs the Turing instruction set) and natively. Work dir /tmp/o; the tables and one log archive
# are copied to $OUT (the device tool brings back at most 8 files).
#   usage (carry .whl and .trt_headers): bash scripts/device_h200.sh
# .whl holds py3.12 wheels the device image lacks (pydantic, onnx-graphsurgeon, polygraphy, transformers 5.24).
set -uo pipefail
RESULTS=${OUT:-$PWD/out}
W=/tmp/o; rm -rf "$W"; mkdir -p "$W" "$RESULTS"
export PYTHONUNBUFFERED=1
OUT=$W/plugins bash scripts/device_plugins.sh >"$W/plugins_log.txt" 2>&1; echo "plugin harness rc=$?"
tail -4 "$W/plugins_log.txt"
OUT=$W/kernels VLMX_BENCH_COMMAND="bash scripts/device_h200.sh" bash scripts/device_kernels.sh \
  >"$W/kernels_log.txt" 2>&1; echo "kernels rc=$?"; grep -E "^target|memcheck rc|passed|failed" "$W/kernels_log.txt"
OUT=$W source scripts/device_env.sh
PTX_LIB=$($PY -m vlmx.plugins.build --target trt-sm75 --ptx-only 2>>"$W/gpu_build.txt" | tail -1)
TRITON_DIR=build/triton/sm75
$PY -m vlmx.plugins.triton_aot --target trt-sm75 --out "$TRITON_DIR" >>"$W/gpu_build.txt" 2>&1
export VLMX_KERNELS_LIB="$PTX_LIB" VLMX_TRITON_DIR="$TRITON_DIR" TENSORRT_INCLUDE_DIR=$PWD/.trt_headers/include
# Every test file with gpu-marked tests, all of it on this GPU (the CPU tests in them run too).
timeout 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_kernels_gpu.py tests/test_triton_gpu.py \
  tests/test_mpt_attention.py tests/test_generation.py tests/test_plugin_enqueue.py tests/test_trt_runtime.py \
  -rs >"$W/pytest_gpu.txt" 2>&1
echo "pytest -m gpu rc=$?"; tail -15 "$W/pytest_gpu.txt"
cp "$W/kernels/kernels_results.json" "$RESULTS/kernels_h200_lm.json" 2>/dev/null
cp "$W/kernels/kernels_results.md" "$RESULTS/kernels_h200_lm.md" 2>/dev/null
cp "$W/plugins/plugins_enqueue.json" "$RESULTS/plugins_enqueue_h200.json" 2>/dev/null
cp "$W/plugins/plugins_enqueue.md" "$RESULTS/plugins_enqueue_h200.md" 2>/dev/null
cp "$W/pytest_gpu.txt" "$RESULTS/pytest_gpu_h200.txt"
tar czf "$RESULTS/device_h200_logs.tgz" -C "$W" --exclude='*.so' --exclude='*.cubin' --exclude='*.ptx' . 2>/dev/null
ls -la "$RESULTS"

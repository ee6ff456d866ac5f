#!/usr/bin/env bash
# One device call for the runtime (issue 6, item 6) and the GPU test files: everything from compute_75 PTX
# (the driver JIT runs the Turing instruction set on the lent H100). Results land in $OUT.
#   usage: bash scripts/device_runtime.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
PTX_LIB=$($PY -m vlmx.plugins.build --target trt-sm75 --ptx-only 2>"$OUT/build.txt" | tail -1)
[ -f "$PTX_LIB" ] || { cat "$OUT/build.txt"; exit 1; }
TRITON_DIR=build/triton/sm75
$PY -m vlmx.plugins.triton_aot --target trt-sm75 --out "$TRITON_DIR" >"$OUT/triton_aot.txt" 2>&1 || {
  tail -20 "$OUT/triton_aot.txt"; exit 1; }
export VLMX_KERNELS_LIB="$PTX_LIB" VLMX_TRITON_DIR="$TRITON_DIR"
# The GPU test files by name: the device has no onnx-graphsurgeon/polygraphy, which other test modules import.
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_kernels_gpu.py tests/test_triton_gpu.py \
  tests/test_mpt_attention.py >"$OUT/pytest_gpu.txt" 2>&1
echo "pytest -m gpu rc=$?"; tail -15 "$OUT/pytest_gpu.txt"
timeout 300 $PY scripts/bench_runtime.py --out "$OUT" --ptx-only --triton-dir "$TRITON_DIR" 2>&1 \
  | tee "$OUT/bench_runtime_log.txt"

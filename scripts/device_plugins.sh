#!/usr/bin/env bash
# One device call (issue 6, plugin glue evidence): build the kernel library (compute_75 PTX only, then native SASS),
# the TensorRT plugin library (CMake, TensorRT headers only: .trt_headers/include, git-ignored, carried) and the
# Triton kernels (sm_75 launched from PTX, then native cubins); run every plugin's creator + enqueue() through
# plugins/trt/tests/plugin_enqueue_check.cpp and compare with vlmx.torch_ref.reference (scripts/plugin_enqueue_check.py);
# compute-sanitizer memcheck over the PTX configuration; then the GPU test file. Results land in $OUT.
#   usage: bash scripts/device_plugins.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
export TENSORRT_INCLUDE_DIR=${TENSORRT_INCLUDE_DIR:-$PWD/.trt_headers/include}
export VLMX_ENQ_COMMAND="bash scripts/device_plugins.sh"
timeout 330 $PY scripts/plugin_enqueue_check.py --out "$OUT" --configs ptx75,native --sanitize 2>&1 \
  | tee "$OUT/plugins_enqueue_log.txt"
RC=${PIPESTATUS[0]}
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_plugin_enqueue.py >"$OUT/pytest_plugin_enqueue.txt" 2>&1
echo "pytest tests/test_plugin_enqueue.py rc=$?"; tail -5 "$OUT/pytest_plugin_enqueue.txt"
exit $RC

#!/usr/bin/env bash
# One device call for the decode kernels (issues 11 + 14): build the kernel library twice (compute_75 PTX only ->
# the driver JIT runs the Turing instruction set; native SASS for this GPU), check + time FlashAttention with kv_len
# and the W8A8 decode GEMM (scripts/bench_decode_kernels.py), compute-sanitizer memcheck on the small checks, the GPU
# test file, and (with .trt_headers carried) the TensorRT plugin enqueue harness incl. the kv_len case.
# Results in $OUT (default ./out): decode_kernels.{json,md}, sanitizer / pytest / build logs, plugins_enqueue.*.
#   usage (carry .whl and .trt_headers): bash scripts/device_decode_kernels.sh [--bench-only]
# --bench-only: builds, bench and memcheck only (scripts/device_h200.sh already runs the GPU test file and the
# plugin harness, both of which include the kv_len / decode-GEMM cases).
set -uo pipefail
BENCH_ONLY=0; [ "${1:-}" = "--bench-only" ] && BENCH_ONLY=1
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/decode_build.txt"
SM=${VLMX_SM:-$($PY -c 'import torch; a,b=torch.cuda.get_device_capability(); print(a*10+b)')}  # VLMX_SM: CPU dry runs
# Both builds at once (one nvcc each); the cache path is the last line of each log.
$PY -m vlmx.plugins.build --target trt-sm75 --ptx-only >"$OUT/build_ptx75.txt" 2>&1 &
P1=$!
$PY -m vlmx.plugins.build --target "trt-sm$SM" >"$OUT/build_native.txt" 2>&1 &
P2=$!
# Tuning variants of the decode GEMM (loads in flight per warp), compute_75 PTX like the main build.
$PY -m vlmx.plugins.build --target trt-sm75 --ptx-only --define VLMX_W8A8_DECODE_UNROLL=1 >"$OUT/build_u1.txt" 2>&1 &
P3=$!
$PY -m vlmx.plugins.build --target trt-sm75 --ptx-only --define VLMX_W8A8_DECODE_UNROLL=4 >"$OUT/build_u4.txt" 2>&1 &
P4=$!
wait $P1 && wait $P2 || { cat "$OUT/build_ptx75.txt" "$OUT/build_native.txt"; exit 1; }
wait $P3; wait $P4
cat "$OUT"/build_ptx75.txt "$OUT"/build_native.txt "$OUT"/build_u1.txt "$OUT"/build_u4.txt >>"$OUT/decode_build.txt"
PTX_LIB=$(tail -1 "$OUT/build_ptx75.txt"); NATIVE_LIB=$(tail -1 "$OUT/build_native.txt")
[ -f "$PTX_LIB" ] && [ -f "$NATIVE_LIB" ] || { cat "$OUT/decode_build.txt"; exit 1; }
VARIANTS=()
for u in 1 4; do L=$(tail -1 "$OUT/build_u$u.txt"); [ -f "$L" ] && VARIANTS+=(--variant-lib "ptx75_unroll$u=$L"); done
echo "ptx lib: $PTX_LIB  native lib: $NATIVE_LIB"
export VLMX_BENCH_COMMAND="bash scripts/device_decode_kernels.sh $*"
timeout 200 $PY scripts/bench_decode_kernels.py --ptx-lib "$PTX_LIB" --native-lib "$NATIVE_LIB" \
  ${VARIANTS[@]+"${VARIANTS[@]}"} --out "$OUT" 2>&1 | tee "$OUT/decode_bench_log.txt"
BENCH_RC=${PIPESTATUS[0]}
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/bench_decode_kernels.py --small \
  --ptx-lib "$PTX_LIB" --native-lib "$NATIVE_LIB" --out "$OUT/sanitize" >"$OUT/decode_sanitizer.txt" 2>&1
echo "compute-sanitizer memcheck rc=$?" | tee -a "$OUT/decode_sanitizer.txt"; tail -3 "$OUT/decode_sanitizer.txt"
[ $BENCH_ONLY = 1 ] && exit $BENCH_RC
VLMX_KERNELS_LIB="$PTX_LIB" timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_kernels_gpu.py \
  -rs >"$OUT/decode_pytest_gpu.txt" 2>&1
echo "pytest -m gpu tests/test_cuda_kernels_gpu.py (compute_75 PTX) rc=$?"; tail -3 "$OUT/decode_pytest_gpu.txt"
if [ -f .trt_headers/include/NvInferRuntime.h ]; then
  TENSORRT_INCLUDE_DIR=$PWD/.trt_headers/include VLMX_ENQ_COMMAND="bash scripts/device_decode_kernels.sh" \
    timeout 150 $PY scripts/plugin_enqueue_check.py --out "$OUT/plugins" --configs ptx75,native \
    >"$OUT/plugins_enqueue_log.txt" 2>&1
  echo "plugin enqueue harness rc=$?"; grep -E "fa_kv_cache|ok|FAIL" "$OUT/plugins_enqueue_log.txt" | tail -6
else
  echo "no .trt_headers carried: plugin enqueue harness skipped"
fi
exit $BENCH_RC

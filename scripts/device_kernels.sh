#!/usr/bin/env bash
# One device call: build (a) compute_75 PTX only -> the driver JIT runs the Turing instruction set on this GPU,
# (b) native SASS for this GPU; check correctness vs fp32 torch references; compute-sanitizer memcheck on a subset;
# GPU pytest; then time everything (scripts/bench_kernels.py). Everything lands in $OUT (default ./out).
#   usage: bash scripts/device_kernels.sh [--skip-timing]
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/build.txt"
SM=$($PY -c 'import torch; a,b=torch.cuda.get_device_capability(); print(a*10+b)')
build() { $PY -m vlmx.plugins.build "$@" 2>&1 | tee -a "$OUT/build.txt" | tail -1; }
PTX_LIB=$(build --target trt-sm75 --ptx-only) && NATIVE_LIB=$(build --target "trt-sm$SM") &&
  MINB3_LIB=$(build --target trt-sm75 --ptx-only --define VLMX_FA_SMALL_D_MIN_BLOCKS=3) ||
  { cat "$OUT/build.txt"; exit 1; }
[ -f "$PTX_LIB" ] && [ -f "$NATIVE_LIB" ] && [ -f "$MINB3_LIB" ] || { cat "$OUT/build.txt"; exit 1; }
echo "ptx lib: $PTX_LIB  native lib: $NATIVE_LIB"
# The PTX-only library has no SASS at all, so every kernel in it goes through the driver JIT for compute_75 code.
$PY -c "import sys; from vlmx.plugins.build import fatbin_entries as f; print('fatbin entries (kind, sm, bytes):', f(sys.argv[1]))" "$PTX_LIB" | tee -a "$OUT/build.txt"
export VLMX_BENCH_COMMAND="bash scripts/device_kernels.sh $*"
timeout 300 $PY scripts/bench_kernels.py --ptx-lib "$PTX_LIB" --native-lib "$NATIVE_LIB" \
  --variant-lib "ptx75_minblocks3=$MINB3_LIB" --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/bench_log.txt"
BENCH_RC=${PIPESTATUS[0]}
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/kernels_sanitize.py "$NATIVE_LIB" \
  "$PTX_LIB" >"$OUT/sanitizer.txt" 2>&1
echo "compute-sanitizer memcheck rc=$?" | tee -a "$OUT/sanitizer.txt"
tail -5 "$OUT/sanitizer.txt"
VLMX_KERNELS_LIB="$PTX_LIB" timeout 120 $PY -m pytest -q -x tests/test_cuda_kernels_gpu.py -p no:cacheprovider \
  >"$OUT/pytest_gpu.txt" 2>&1
echo "pytest gpu rc=$?"; tail -3 "$OUT/pytest_gpu.txt"
exit $BENCH_RC

#!/usr/bin/env bash
# One device call for issue 16 item 1: the gpu-marked generation test, the torch-vs-ONNX Runtime backend check on
# llava-tiny, then `--model llava` (random LLaVA-1.5-7B weights, fp16) exported once and timed through the runtime
# (scripts/bench_decode.py, torch backend: device-resident caches, CUDA-graph decode). Work dir /tmp/r; results
# copied to $OUT.   usage (carry .whl): bash scripts/device_runtime_h200.sh
set -uo pipefail
RESULTS=${OUT:-$PWD/out}
W=/tmp/r; rm -rf "$W"; mkdir -p "$W" "$RESULTS"
export PYTHONUNBUFFERED=1
OUT=$W source scripts/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$W/device.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_generation.py -rs >"$W/pytest_generation.txt" 2>&1
echo "pytest -m gpu tests/test_generation.py rc=$?"; tail -3 "$W/pytest_generation.txt"
OUT=$W/check timeout 120 $PY scripts/gpu_torch_backend_check.py >"$W/torch_backend_check.txt" 2>&1
echo "torch backend check rc=$?"; tail -5 "$W/torch_backend_check.txt"
/usr/bin/time -v timeout 330 $PY -m vlmx.apps.export_cli --model llava --precision fp16 --max-seq-len 2304 \
  --out "$W/llava" --no-report --quiet >"$W/export_llava.txt" 2>&1
echo "export llava rc=$?"; grep -E "Elapsed|Maximum resident" "$W/export_llava.txt"; du -sh "$W/llava"
timeout 280 $PY scripts/bench_decode.py --artifacts "$W/llava" --backend torch --out "$W/bench" \
  >"$W/bench_decode_log.txt" 2>&1
echo "bench_decode rc=$?"; tail -25 "$W/bench_decode_log.txt"
cp "$W/bench/decode_bench.json" "$RESULTS/decode_llava_h200.json" 2>/dev/null
cp "$W/bench/decode_bench.md" "$RESULTS/decode_llava_h200.md" 2>/dev/null
cp "$W/check/torch_backend_check.json" "$RESULTS/torch_backend_check_h200.json" 2>/dev/null
cp "$W/pytest_generation.txt" "$RESULTS/pytest_generation_h200.txt"
tar czf "$RESULTS/device_runtime_h200_logs.tgz" -C "$W" --exclude=llava --exclude='*.so' --exclude='*.onnx*' . 2>/dev/null
ls -la "$RESULTS"

#!/usr/bin/env bash
# Issue 16 on one warm H200, as back-to-back device calls (a call carries at most 64 MiB; the machine stays warm
# ~30 s after a call, and a process started with setsid runs on between calls):
#   start  (carry .whl .trt_headers): wheels into /tmp/site; the LLaVA-1.5-7B exports (random weights, fp16 and
#          W8A8, S_max 2304) start in the background (setsid, /usr/bin/time -v); meanwhile the decode kernels
#          (scripts/device_decode_kernels.sh: build, checks, timings, memcheck, plugin harness) and every
#          gpu-marked test file.
#   stash  (carry build/llava-micro-train/part1): part 1 of the micro-VLM training data stays on the machine.
#   train  (carry build/llava-micro-train/part2): projector training (scripts/train_projector.py train).
#   decode (no carry): waits for the export, records its disk / peak RSS against the fp16 weight bytes, runs
#          vlm-run once end to end and scripts/bench_decode.py (torch backend: our kernels, CUDA-graph decode).
# A budget too small for the 32-layer export (~7 min) takes the two "lite" calls instead: LLaVA-1.5-7B widths with
# $LAYERS LM layers (scripts/depth_variant.py), device's own transformers, small wheels (VLMX_WHEELS=.whl-small):
#   lite-a (carry build/llava-micro-train/part1 .whl-small): part 1 stays; fp16 + W8A8 exports start (setsid).
#   lite-b (carry build/llava-micro-train/part2 .whl-small): projector training where part 1 is still there (else
#          skipped, exports started), then vlm-run and bench_decode on both exports; 8 files back at most.
# CPU dry run of the lite path: PYTHON=.venv/bin/python VLMX_WHEELS=none LITE_BASE=llava-tiny LAYERS=1 SMAX=512
#   OUT=/tmp/dry bash scripts/device_session_h200.sh lite-a, then lite-b.
# usage: bash scripts/device_session_h200.sh PHASE      (results under $OUT)
set -uo pipefail
PHASE=${1:?usage: device_session_h200.sh start|stash|train|decode}
RESULTS=${OUT:-$PWD/out}
mkdir -p "$RESULTS" /tmp/o
E=/tmp/r7b; export PYTHONUNBUFFERED=1
export_state() {
  for prec in fp16 w8a8; do
    if [ -f $E/$prec/export.rc ]; then echo "7B $prec export finished rc=$(cat $E/$prec/export.rc)"
    elif [ -d $E/$prec ]; then echo "7B $prec export running: $(du -sh $E/$prec 2>/dev/null | cut -f1) written"
    else echo "no 7B $prec export"; fi
  done
}
gpu_tests() {  # every other test file with gpu-marked tests, compute_75 PTX library
  local W=$1; mkdir -p $W
  PTX_LIB=$($PY -m vlmx.plugins.build --target trt-sm75 --ptx-only 2>>$W/gpu_build.txt | tail -1)
  $PY -m vlmx.plugins.triton_aot --target trt-sm75 --out build/triton/sm75 >>$W/gpu_build.txt 2>&1
  VLMX_KERNELS_LIB="$PTX_LIB" VLMX_TRITON_DIR=build/triton/sm75 TENSORRT_INCLUDE_DIR=$PWD/.trt_headers/include \
    timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py tests/test_mpt_attention.py \
    tests/test_generation.py tests/test_plugin_enqueue.py tests/test_trt_runtime.py -rs >$W/pytest_gpu.txt 2>&1
  echo "pytest -m gpu rc=$?"; tail -15 $W/pytest_gpu.txt
}
# start_exports MODEL RUN: fp16 and W8A8 exports of MODEL into $E/<prec>/llava in the background (setsid, time -v);
# RUN: the python command that runs a module (a depth variant goes through scripts/depth_variant.py).
start_exports() {
  local model=$1 run=$2; mkdir -p $E
  for prec in fp16 w8a8; do
    mkdir -p $E/$prec
    setsid bash -c "cd '$PWD'; export PYTHONPATH='${PYTHONPATH:-}'; /usr/bin/time -v $run vlmx.apps.export_cli \
      --model $model --precision $prec --max-seq-len ${SMAX:-2304} --out $E/$prec/llava --no-report --quiet \
      >$E/$prec/export.txt 2>&1; echo \$? >$E/$prec/export.rc" </dev/null >/dev/null 2>&1 &
  done
  echo "exports of $model (fp16, w8a8) started"
}
# decode_runs TAG MOD SCRIPT FP16_WAIT_S W8A8_WAIT_S (MOD runs a module, SCRIPT a script): per finished export (fp16 first, then W8A8 if it finishes within its
# wait): footprint, one vlm-run, bench_decode. At most 5 files into $RESULTS (a call returns 8), logs in a tarball.
decode_runs() {
  local tag=$1 mod=$2 script=$3 W=/tmp/o/res_$1; mkdir -p $W
  $PY -c "from PIL import Image; import numpy as np; Image.fromarray((np.random.default_rng(1).random((480, 640, 3))*255).astype('uint8')).save('/tmp/img.png')"
  for prec in fp16 w8a8; do
    local wait=$4; [ $prec = w8a8 ] && wait=$5
    for _ in $(seq 1 $((wait / 5))); do [ -f $E/$prec/export.rc ] && break; sleep 5; done
    [ "$(cat $E/$prec/export.rc 2>/dev/null)" = 0 ] || { echo "$prec export failed/not done"; tail -5 $E/$prec/export.txt; continue; }
    cp $E/$prec/export.txt $W/export_${prec}_time.txt
    $script scripts/export_footprint.py $E/$prec/llava $E/$prec/export.txt >$W/export_footprint_${prec}.json
    timeout 150 $mod vlmx.trt_runtime.run_cli --artifacts $E/$prec/llava --backend torch --image /tmp/img.png \
      --prompt "What is in the image?" --max-new-tokens 32 --json >$W/vlm_run_${prec}.json 2>$W/vlm_run_${prec}.err
    echo "vlm-run $prec rc=$?"; tail -c 600 $W/vlm_run_${prec}.json
    timeout 200 $script scripts/bench_decode.py --artifacts $E/$prec/llava --backend torch --steps 16 --new-tokens 64 \
      --out $W/bench_$prec >$W/bench_decode_${prec}.log 2>&1; echo "bench_decode $prec rc=$?"
    cp $W/bench_$prec/decode_bench.json "$RESULTS/decode_${tag}_${prec}_h200.json" 2>/dev/null
    tail -9 $W/bench_decode_${prec}.log
  done
  cp $W/vlm_run_fp16.json "$RESULTS/vlm_run_${tag}_h200.json" 2>/dev/null
  $PY -c "import json,glob; print(json.dumps({f: json.load(open(f)) for f in sorted(glob.glob('$W/export_footprint_*.json'))}, indent=1))" >"$RESULTS/export_footprint_${tag}_h200.json"
  grep -E "ratio|wall|precision" "$RESULTS/export_footprint_${tag}_h200.json"
  tar czf "$RESULTS/${tag}_logs.tgz" -C $W .
}
case $PHASE in
start|export)
  OUT=/tmp/o source scripts/device_env.sh
  rm -rf $E; mkdir -p $E
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $E/device.txt
  start_exports llava "$PY -m"
  sleep 25; export_state; tail -3 $E/fp16/export.txt
  [ $PHASE = export ] && { ls -la "$RESULTS"; exit 0; }
  W=/tmp/o; mkdir -p $W
  # Decode kernels (kv_len attention, W8A8 decode GEMM): build x2, checks + timings, memcheck, their GPU test file,
  # the plugin enqueue harness (both builds).
  OUT=$W/dk bash scripts/device_decode_kernels.sh >$W/decode_kernels_log.txt 2>&1; echo "decode kernels rc=$?"
  tail -30 $W/decode_kernels_log.txt
  gpu_tests $W
  cp $W/dk/decode_kernels.json "$RESULTS/decode_kernels_h200.json"; cp $W/dk/decode_kernels.md "$RESULTS/decode_kernels_h200.md"
  cp $W/dk/plugins/plugins_enqueue.json "$RESULTS/plugins_enqueue_h200.json" 2>/dev/null
  cp $W/dk/plugins/plugins_enqueue.md "$RESULTS/plugins_enqueue_h200.md" 2>/dev/null
  cat $W/dk/decode_pytest_gpu.txt $W/pytest_gpu.txt >"$RESULTS/pytest_gpu_h200.txt"
  tar czf "$RESULTS/session_start_logs.tgz" -C $W --exclude='*.so' --exclude='*.cubin' --exclude='*.ptx' . 2>/dev/null
  export_state ;;
stash)
  ls -la build/llava-micro-train/part1 | head; export_state ;;
train)
  [ -d build/llava-micro-train/part1 ] || { echo "has no part1/: the machine was recycled; repeat stash"; exit 3; }
  (OUT=/tmp/o source scripts/device_env.sh; gpu_tests /tmp/o >/tmp/o/gpu_tests.log 2>&1
   cp /tmp/o/pytest_gpu.txt "$RESULTS/pytest_gpu_other_h200.txt") &
  timeout 300 python3 scripts/train_projector.py train --data build/llava-micro-train --out "$RESULTS" \
    --max-minutes 3.5 2>&1 | tee "$RESULTS/train.log" | tail -30
  wait; tail -8 "$RESULTS/pytest_gpu_other_h200.txt"
  export_state ;;
decode)
  OUT=/tmp/o source scripts/device_env.sh
  decode_runs llava "$PY -m" "$PY" 300 120 ;;
lite-a|lite-b)
  export VLMX_WHEELS=${VLMX_WHEELS:-.whl-small}; OUT=/tmp/o source scripts/device_env.sh
  L=${LAYERS:-8}; B=${LITE_BASE:-llava}; V="$PY scripts/depth_variant.py $B $L"; E=/tmp/rlite  # LITE_BASE: a CPU dry run
  if [ $PHASE = lite-a ]; then
    mkdir -p /tmp/keep && cp -r build/llava-micro-train/part1 /tmp/keep/ && start_exports $B-${L}l "$V"
    sleep 15; export_state; tail -3 $E/fp16/export.txt; exit 0
  fi
  [ -d $E ] || start_exports $B-${L}l "$V"
  if [ -d /tmp/keep/part1 ]; then
    cp -r /tmp/keep/part1 build/llava-micro-train/
    timeout 220 python3 scripts/train_projector.py train --data build/llava-micro-train --out "$RESULTS" \
      --max-minutes 3 >"$RESULTS/train.log" 2>&1; echo "train rc=$?"; tail -12 "$RESULTS/train.log"
  else echo "part 1 is gone (a fresh machine): no training this call"; fi
  decode_runs $B${L}l "$V" "$V" 300 60 ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
ls -la "$RESULTS"

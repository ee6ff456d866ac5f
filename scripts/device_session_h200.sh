#!/usr/bin/env bash
# Issue 16 on one warm H200, as back-to-back device calls (a call carries at most 64 MiB; the machine stays warm
# ~30 s after a call, and a process started with setsid runs on between calls):
#   start  (carry .whl .trt_headers): wheels into /tmp/site; the LLaVA-1.5-7B export (random weights, fp16,
#          S_max 2304) starts in the background (setsid, /usr/bin/time -v); meanwhile the decode kernels
#          (scripts/device_decode_kernels.sh: build, checks, timings, memcheck, plugin harness) and every
#          gpu-marked test file.
#   stash  (carry build/llava-micro-train/part1): part 1 of the micro-VLM training data stays on the machine.
#   train  (carry build/llava-micro-train/part2): projector training (scripts/train_projector.py train).
#   decode (no carry): waits for the export, records its disk / peak RSS against the fp16 weight bytes, runs
#          vlm-run once end to end and scripts/bench_decode.py (torch backend: our kernels, CUDA-graph decode).
# usage: bash scripts/device_session_h200.sh PHASE      (results under $OUT)
set -uo pipefail
PHASE=${1:?usage: device_session_h200.sh start|stash|train|decode}
RESULTS=${OUT:-$PWD/out}
mkdir -p "$RESULTS"
E=/tmp/r7b; export PYTHONUNBUFFERED=1
export_state() {
  if [ -f $E/export.rc ]; then echo "7B export finished rc=$(cat $E/export.rc)"
  elif [ -d $E ]; then echo "7B export running: $(du -sh $E 2>/dev/null | cut -f1) written"; else echo "no 7B export"; fi
}
case $PHASE in
start)
  OUT=/tmp/o source scripts/device_env.sh
  rm -rf $E; mkdir -p $E
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $E/device.txt
  setsid bash -c "cd '$PWD'; export PYTHONPATH='${PYTHONPATH:-}'; /usr/bin/time -v $PY -m vlmx.apps.export_cli \
    --model llava --precision fp16 --max-seq-len 2304 --out $E/llava --no-report --quiet >$E/export.txt 2>&1; \
    echo \$? >$E/export.rc" </dev/null >/dev/null 2>&1 &
  echo "7B export started in the background"
  W=/tmp/o; mkdir -p $W
  # Decode kernels (kv_len attention, W8A8 decode GEMM): build x2, checks + timings, memcheck, their GPU test file,
  # the plugin enqueue harness (both builds).
  OUT=$W/dk bash scripts/device_decode_kernels.sh >$W/decode_kernels_log.txt 2>&1; echo "decode kernels rc=$?"
  tail -30 $W/decode_kernels_log.txt
  PTX_LIB=$($PY -m vlmx.plugins.build --target trt-sm75 --ptx-only 2>>$W/gpu_build.txt | tail -1)
  $PY -m vlmx.plugins.triton_aot --target trt-sm75 --out build/triton/sm75 >>$W/gpu_build.txt 2>&1
  # Every other test file with gpu-marked tests, on this GPU with the compute_75 PTX library.
  VLMX_KERNELS_LIB="$PTX_LIB" VLMX_TRITON_DIR=build/triton/sm75 TENSORRT_INCLUDE_DIR=$PWD/.trt_headers/include \
    timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py tests/test_mpt_attention.py \
    tests/test_generation.py tests/test_plugin_enqueue.py tests/test_trt_runtime.py -rs >$W/pytest_gpu.txt 2>&1
  echo "pytest -m gpu rc=$?"; tail -15 $W/pytest_gpu.txt
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
  timeout 560 python3 scripts/train_projector.py train --data build/llava-micro-train --out "$RESULTS" \
    --max-minutes 7 2>&1 | tee "$RESULTS/train.log" | tail -30
  export_state ;;
decode)
  OUT=/tmp/o source scripts/device_env.sh
  for _ in $(seq 1 60); do [ -f $E/export.rc ] && break; sleep 5; done
  export_state
  [ "$(cat $E/export.rc 2>/dev/null)" = 0 ] || { tail -20 $E/export.txt; exit 4; }
  grep -E "Elapsed|Maximum resident" $E/export.txt
  $PY - "$E/llava" >"$RESULTS/export_llava_h200.json" <<'EOF'
import json, re, sys
from pathlib import Path
d = Path(sys.argv[1]); m = json.loads((d / "manifest.json").read_text())
t = (d.parent / "export.txt").read_text()
lm = sum(int(v["bytes"]) for k, v in m["files"].items() if k.startswith("lm.onnx"))
total = sum(int(v["bytes"]) for v in m["files"].values())
from vlmx.export.weights import meta_model
_, model = meta_model("llava")
lm_fp16 = sum(p.numel() * 2 for n, p in model.named_parameters() if "vision_tower" not in n
              and "multi_modal_projector" not in n)
all_fp16 = sum(p.numel() * 2 for p in model.parameters())
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) * 1024
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
print(json.dumps({"command": "vlm-export --model llava --precision fp16 --max-seq-len 2304 --no-report --quiet",
                  "wall": wall, "peak_rss_bytes": rss, "model_fp16_bytes": all_fp16, "lm_fp16_bytes": lm_fp16,
                  "lm_onnx_bytes": lm, "export_bytes": total, "lm_disk_ratio": round(lm / lm_fp16, 4),
                  "disk_ratio": round(total / all_fp16, 4), "rss_ratio": round(rss / all_fp16, 4),
                  "graphs": sorted(m["graphs"])}, indent=1))
EOF
  cat "$RESULTS/export_llava_h200.json"
  $PY -c "from PIL import Image; import numpy as np; Image.fromarray((np.random.default_rng(1).random((480, 640, 3))*255).astype('uint8')).save('/tmp/img.png')"
  timeout 240 $PY -m vlmx.trt_runtime.run_cli --artifacts $E/llava --backend torch --image /tmp/img.png \
    --prompt "What is in the image?" --max-new-tokens 48 --json >"$RESULTS/vlm_run_llava_h200.json" \
    2>"$RESULTS/vlm_run_llava_h200.err"; echo "vlm-run rc=$?"; tail -c 1500 "$RESULTS/vlm_run_llava_h200.json"
  timeout 300 $PY scripts/bench_decode.py --artifacts $E/llava --backend torch --steps 16 --new-tokens 64 \
    --out /tmp/bench >"$RESULTS/bench_decode_llava_h200.log" 2>&1; echo "bench_decode rc=$?"
  cp /tmp/bench/decode_bench.json "$RESULTS/decode_llava_h200.json" 2>/dev/null
  cp /tmp/bench/decode_bench.md "$RESULTS/decode_llava_h200.md" 2>/dev/null
  tail -25 "$RESULTS/bench_decode_llava_h200.log" ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
ls -la "$RESULTS"

"""Decode benchmark of the one LM graph through the runtime's own runners (bound KV cache, as vlm-run does).

Per context length 64 .. S_max: milliseconds per decode token (median of ``--steps`` steps) and the slope of a
linear fit (ms per 1k context tokens: it should be the attention's cache read only, no O(S) copies); time to first
token and tokens/s of a whole vlm-run generation; tokens/s against the weight-read floor (LM weight bytes / measured
copy bandwidth); peak memory against the memory plan. CPU now (ONNX Runtime); on the GPU machine run it with
``--backend torch`` (CUDA graph decode) or ``onnxruntime`` with the CUDA provider.

Writes ``decode_bench.json`` and ``decode_bench.md`` under ``--out``. Usage:
    python scripts/bench_decode.py --model llava-tiny --out bench/results/decode_cpu            # exports first
    python scripts/bench_decode.py --artifacts EXPORT_DIR --backend torch --out $OUT             # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written."""
    if device == "cuda":
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize()
        return 2 * nbytes * 10 / (time.perf_counter() - t)
    a = np.ones(nbytes, np.uint8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def peak_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def decode_curve(pipe, contexts, steps: int) -> list[dict]:
    """ms per decode token at each context length, through the LM runner with bound buffers."""
    from vlmx.trt_runtime.sampling import Sampling

    lm, info, arrays = pipe.lm, pipe.artifacts.info, pipe.arrays
    hidden = int(info["lm_hidden"])
    rows = []
    bufs = pipe._bind_lm()
    mask = bufs["mask"]
    step = pipe._decode_fn(hidden)
    greedy = arrays.sampler(Sampling())
    rng = np.random.default_rng(0)
    for c in contexts:
        c = min(c, pipe.max_seq_len - steps)
        prompt = (rng.standard_normal((1, c, hidden)) * 0.5).astype(pipe.kv_dtype)
        if arrays.name == "torch":
            prompt = torch.from_numpy(prompt).to(arrays.device)
        lm.infer({"inputs_embeds": prompt, "attention_mask": mask[:, :c]})
        token = arrays.tokens([5]).reshape(1)
        if arrays.name == "torch":
            token = token.to(arrays.device)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            logits = step(token, c + i + 1, mask)
            token = greedy(logits[:, -1])
            int(token[0])  # the per-token host sync vlm-run also pays
            times.append(1e3 * (time.perf_counter() - t))
        rows.append({"context": c, "ms_per_token": statistics.median(times), "min_ms": min(times)})
    lm.unbind()
    pipe.runners["embed"].unbind()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifacts", help="an export directory")
    src.add_argument("--model", help="export this (tiny) preset first, fp32, plugin attention")
    ap.add_argument("--max-seq-len", type=int, default=None, help="with --model: the export's S_max")
    ap.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"))
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per context length")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens of the whole-generation run")
    ap.add_argument("--contexts", default="64,128,256,512,600,1024,2000,2048,4096",
                    help="decode context lengths (below S_max; S_max - steps is always added)")
    ap.add_argument("--keeps", default="1.0,0.25", help="keep ratios whose prefill / first token are timed")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from PIL import Image

    from vlmx.trt_runtime.memory_plan import GIB, export_weight_bytes, plan
    from vlmx.trt_runtime.pipeline import VLMPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts
    if args.model:
        from vlmx.export.cli import main as export_main

        artifacts = str(Path(tempfile.mkdtemp()) / args.model)
        extra = ["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else []
        if export_main(["--model", args.model, "--precision", "fp32", "--out", artifacts, "--quiet",
                        "--no-report", *extra]) != 0:
            return 1
    image = Path(tempfile.mkdtemp()) / "image.png"
    Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8)).save(image)
    with VLMPipeline(artifacts, backend=args.backend) as pipe:
        device = torch.device(pipe.arrays.device).type
        s_max = pipe.max_seq_len
        contexts = sorted({c for c in map(int, args.contexts.split(",")) if c < s_max - args.steps}
                          | {s_max - args.steps})
        pipe.generate(image, "Describe the image.", max_new_tokens=2)  # warm-up
        res = pipe.generate(image, "Describe the image.", max_new_tokens=min(args.new_tokens,
                                                                             s_max - 64 - pipe.artifacts.info[
                                                                                 "num_image_tokens"]))
        keeps = []
        for keep in map(float, args.keeps.split(",")):
            runs = [pipe.generate(image, "Describe the image.", keep=keep, max_new_tokens=1).timings
                    for _ in range(3)]
            keeps.append({"keep": keep, "prefill_ms": min(t.prefill_ms for t in runs),
                          "ttft_ms": min(t.ttft_ms for t in runs)})
        curve = decode_curve(pipe, contexts, args.steps)
        manifest = pipe.artifacts.manifest
    xs, ys = np.array([r["context"] for r in curve]), np.array([r["ms_per_token"] for r in curve])
    slope, intercept = np.polyfit(xs, ys, 1)
    lm_bytes = sum(int(m["bytes"]) for rel, m in manifest["files"].items() if rel.startswith("lm.onnx"))
    peak = peak_memory(device)  # before the bandwidth probe's own 2 x 256 MiB buffers
    bw = copy_bandwidth(device)
    floor_ms = 1e3 * lm_bytes / (bw / 2)  # one read of every LM weight per token (copy bandwidth counts r + w)
    mem_plan = plan(manifest, export_weight_bytes(manifest), 1 << 60, device)
    info = manifest["model_info"]
    kv_token = mem_plan.kv_per_token
    record = {
        "command": "python scripts/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or
                    platform.machine(), "backend": args.backend, "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "model": manifest["model"], "max_seq_len": s_max, "num_layers": info["num_layers"],
        "decode_curve": curve,
        "slope_ms_per_1k_tokens": round(1e3 * slope, 4), "intercept_ms": round(float(intercept), 4),
        "kv_read_floor_ms_per_1k_tokens": round(1e3 * kv_token * 1000 / (bw / 2), 4),
        "keep_prefill": keeps, "ttft_ms": res.timings.ttft_ms, "prefill_ms": res.timings.prefill_ms, "prompt_tokens": res.prompt_tokens,
        "generation_tokens_per_s": res.timings.tokens_per_s, "generation_decode_tokens": res.timings.decode_tokens,
        "generation_median_step_ms": round(statistics.median(res.timings.step_ms), 4) if res.timings.step_ms else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "lm_weight_bytes": lm_bytes, "copy_bandwidth_gbps": round(bw / 1e9, 2),
        "weight_read_floor_ms": round(floor_ms, 4), "floor_tokens_per_s": round(1e3 / floor_ms, 1),
        "fraction_of_floor": round(res.timings.tokens_per_s / (1e3 / floor_ms), 4),
        "peak_memory_bytes": peak,
        "plan": {k: v for k, v in vars(mem_plan).items() if isinstance(v, int)} | {"total": mem_plan.total},
    }
    (out / "decode_bench.json").write_text(json.dumps(record, indent=1) + "\n")
    md = [f"# Decode benchmark: {record['model']} on {record['machine']['device']} ({args.backend})", "",
          f"Command: `{record['command']}`", "",
          "| context | ms / token (median) | min ms |", "|---|---|---|"]
    md += [f"| {r['context']} | {r['ms_per_token']:.3f} | {r['min_ms']:.3f} |" for r in curve]
    md += ["", f"- slope: {record['slope_ms_per_1k_tokens']:.4f} ms per 1k context tokens (intercept "
               f"{record['intercept_ms']:.3f} ms); KV-read floor {record['kv_read_floor_ms_per_1k_tokens']:.4f} "
               "ms per 1k tokens",
           f"- time to first token {record['ttft_ms']:.1f} ms ({record['prompt_tokens']} prompt tokens, prefill "
           f"{record['prefill_ms']:.1f} ms); generation {record['generation_tokens_per_s']:.1f} tokens/s (mean over "
           f"{record['generation_decode_tokens']} steps; median step {record['generation_median_step_ms']} ms; "
           f"1-min load average {record['load_average']})",
           "- prefill / time to first token by keep (best of 3): " + "; ".join(
               f"keep {k['keep']}: prefill {k['prefill_ms']:.1f} ms, TTFT {k['ttft_ms']:.1f} ms" for k in keeps),
           f"- weight-read floor: {lm_bytes / 1e6:.1f} MB LM weights / {record['copy_bandwidth_gbps']} GB/s copy "
           f"bandwidth = {floor_ms:.3f} ms/token ({record['floor_tokens_per_s']} tokens/s); measured "
           f"{100 * record['fraction_of_floor']:.1f} % of it",
           f"- peak memory {record['peak_memory_bytes'] / GIB:.3f} GiB "
           f"({'process RSS, including Python, torch and transformers' if device == 'cpu' else 'torch allocator'}) "
           f"vs plan {mem_plan.total / GIB:.3f} GiB "
           f"(weights {mem_plan.weights / GIB:.3f}, KV {mem_plan.kv_cache / GIB:.4f}, activations "
           f"{mem_plan.activations / GIB:.3f}, workspace {mem_plan.workspace / GIB:.3f})", ""]
    (out / "decode_bench.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

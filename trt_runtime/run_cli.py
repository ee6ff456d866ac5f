"""``vlm-run``: run an export directory on an image and a prompt; tokens stream to stdout as they are produced,
then a timing breakdown (or, with ``--json``, one final JSON record). A thin layer over
:meth:`vlmx.trt_runtime.pipeline.VLMPipeline.stream`.

Before anything loads, the GPU memory plan (weights + KV cache at S_max + activations) is checked against the
GPU's free memory. The export is checked first (manifest, digests, graph I/O; ``--verify`` re-hashes every file). An export whose
accuracy report FAILED is refused unless ``--force``. Exit 2: bad input (one line naming it); 130/143: interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys

from vlmx.torch_ref.outdir import run_cli

from .runner import BACKENDS, DEFAULT_BACKEND

#: Longest prompt accepted before tokenizing (the model's context is the real limit, checked after tokenizing).
MAX_PROMPT_CHARS = 8000


def parse_keep(text: str) -> float | int:
    """``--keep``: a ratio in (0, 1] (``0.25``) or a whole token budget (``64``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep {text!r} is not a number; pass a ratio in (0, 1] or a token "
                                         "count >= 1") from None
    if value > 1 and value.is_integer():
        return int(value)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--keep {text} is outside (0, 1]; pass a ratio in (0, 1] or a whole "
                                         "token count")
    return value


def parse_new_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-new-tokens {text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-new-tokens {value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from vlmx.torch_ref.contract import PRUNE_METHODS

    p = argparse.ArgumentParser(prog="vlm-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, help="directory written by vlm-export --out")
    p.add_argument("--image", required=True, help="image file (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help=f"the user's question about the image (<= {MAX_PROMPT_CHARS} "
                                                    "characters, and it must fit the model's context)")
    p.add_argument("--keep", type=parse_keep, default=None,
                   help="visual tokens to keep: ratio in (0, 1] or a token budget (default: the export's --keep)")
    p.add_argument("--prune", choices=PRUNE_METHODS, default=None,
                   help="token scoring: text (text queries vs visual keys) or cls ([CLS] attention, CLIP only); "
                        "default: the export's --prune")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                   help="onnxruntime (the exported ONNX files, CPU or CUDA), tensorrt (engines from vlm-build, GPU) "
                        "or torch (the export's own weights loaded into PyTorch modules; vlmx CUDA kernels on a GPU); "
                        f"default {DEFAULT_BACKEND}")
    p.add_argument("--max-new-tokens", type=parse_new_tokens, default=32,
                   help="most tokens to generate (default 32; prompt + visual tokens + this must fit the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same tokens)")
    p.add_argument("--stop", action="append", default=[], help="stop when this string is generated (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON record at the end instead of streaming text")
    p.add_argument("--no-memory-check", action="store_true", help="skip the GPU memory plan check")
    p.add_argument("--force", action="store_true", help="run even though the export's accuracy report failed")
    p.add_argument("--verify", action="store_true", help="re-hash every file of the export (default: size + mtime)")
    p.add_argument("--verbose", action="store_true", help="show library warnings")
    return p


def _run(args) -> int:
    if len(args.prompt) > MAX_PROMPT_CHARS:
        print(f"vlm-run: error: --prompt is {len(args.prompt)} characters; pass at most {MAX_PROMPT_CHARS}",
              file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    from .artifacts import ArtifactError, load_artifacts
    from .memory_plan import check_runtime_memory
    from .pipeline import PipelineError, VLMPipeline
    from .sampling import Sampling
    from .trt_backend import EngineMismatch
    from .trt_import import PluginLibraryError, TensorRTUnavailable

    console = Console(stderr=False)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    started = False
    try:
        sampling.check()
        art = load_artifacts(args.artifacts, verify=args.verify)
        art.refuse_failed_report(args.force)
        if not args.no_memory_check:
            check_runtime_memory(art.root, args.backend, verbose=not args.json)
        with VLMPipeline(art, backend=args.backend, prune=args.prune) as pipe:
            gen = pipe.stream(args.image, args.prompt, keep=args.keep, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, stop=tuple(args.stop))
            for tok in gen:
                if not args.json:
                    sys.stdout.write(("" if started else "text: ") + tok.text)
                    sys.stdout.flush()
                    started = True
            res = gen.result
    except (ArtifactError, PipelineError, ValueError, FileNotFoundError, TensorRTUnavailable, EngineMismatch,
            PluginLibraryError) as e:
        print(("\n" if started else "") + f"vlm-run: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**res.as_dict(), "backend": args.backend, "prune": pipe.prune}))
        return 0
    print(flush=True)
    console.print(f"tokens: {res.tokens} (stopped: {res.finish_reason})")
    console.print(f"visual tokens kept: {res.kept} of {res.num_visual_tokens} ({pipe.prune} scoring, "
                  f"backend {args.backend})")
    table = Table(title="timing")
    table.add_column("stage")
    table.add_column("time")
    for stage, value in res.timings.rows():
        table.add_row(stage, value)
    console.print(table)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("vlm-run", lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

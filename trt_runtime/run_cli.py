"""``vlm-run``: run an export directory on an image and a prompt; tokens stream to stdout as they are produced,
then a timing breakdown (or, with ``--json``, one final JSON record). A thin layer over
:meth:`vlmx.trt_runtime.pipeline.VLMPipeline.stream`."""
from __future__ import annotations

import argparse
import json
import sys

from vlmx.torch_ref.contract import PRUNE_METHODS

from .artifacts import ArtifactError
from .memory_plan import MemoryPlanError, check_runtime_memory
from .pipeline import PipelineError, VLMPipeline
from .runner import BACKENDS, DEFAULT_BACKEND
from .sampling import Sampling


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-run", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, help="directory written by vlm-export --out")
    p.add_argument("--image", required=True, help="image file (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help="the user's question about the image")
    p.add_argument("--keep", type=parse_keep, default=None,
                   help="visual tokens to keep: ratio in (0, 1] or a token budget (default: the export's --keep)")
    p.add_argument("--prune", choices=PRUNE_METHODS, default="text",
                   help="token scoring: text (text queries vs visual keys) or cls ([CLS] attention, CLIP only)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same tokens)")
    p.add_argument("--stop", action="append", default=[], help="stop when this string is generated (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON record at the end instead of streaming text")
    p.add_argument("--no-memory-check", action="store_true", help="skip the GPU memory plan check")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    try:
        sampling.check()
        if not args.no_memory_check:
            check_runtime_memory(args.artifacts, args.backend, verbose=not args.json)
        with VLMPipeline(args.artifacts, backend=args.backend, prune=args.prune) as pipe:
            gen = pipe.stream(args.image, args.prompt, keep=args.keep, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, stop=tuple(args.stop))
            for tok in gen:
                if not args.json:
                    sys.stdout.write(tok.text)
                    sys.stdout.flush()
            res = gen.result
    except (ArtifactError, PipelineError, MemoryPlanError, ValueError, FileNotFoundError) as e:
        print(f"vlm-run: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**res.as_dict(), "backend": args.backend, "prune": args.prune}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    console.print()
    console.print(f"tokens: {res.tokens} (stopped: {res.finish_reason})")
    console.print(f"visual tokens kept: {res.kept} of {res.num_visual_tokens} ({args.prune} scoring, "
                  f"backend {args.backend})")
    table = Table(title="timing")
    table.add_column("stage")
    table.add_column("time")
    for stage, value in res.timings.rows():
        table.add_row(stage, value)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

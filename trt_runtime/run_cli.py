"""``vlm-run``: run an export directory on an image and a prompt, print the text and a timing breakdown."""
from __future__ import annotations

import argparse
import sys

from .artifacts import ArtifactError
from .pipeline import PRUNE_METHODS, PipelineError, VLMPipeline
from .runner import BACKENDS, DEFAULT_BACKEND


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
    p = argparse.ArgumentParser(prog="vlm-run", description=__doc__)
    p.add_argument("--artifacts", required=True, help="directory written by vlm-export --out")
    p.add_argument("--image", required=True, help="image file (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help="the user's question about the image")
    p.add_argument("--keep", type=parse_keep, default=None,
                   help="visual tokens to keep: ratio in (0, 1] or a token budget (default: the export's --keep)")
    p.add_argument("--prune", choices=PRUNE_METHODS, default="text",
                   help="token scoring: text (text queries vs visual keys) or cls ([CLS] attention, CLIP only)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND)
    p.add_argument("--max-new-tokens", type=int, default=32)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    try:
        with VLMPipeline(args.artifacts, backend=args.backend, prune=args.prune) as pipe:
            res = pipe.generate(args.image, args.prompt, keep=args.keep, max_new_tokens=args.max_new_tokens)
    except (ArtifactError, PipelineError, ValueError, FileNotFoundError) as e:
        print(f"vlm-run: error: {e}", file=sys.stderr)
        return 2
    from rich.markup import escape

    console.print(f"[bold]text:[/bold] {escape(res.text)}")
    console.print(f"tokens: {res.tokens}")
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

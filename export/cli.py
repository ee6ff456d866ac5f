"""``vlm-export``: export a LLaVA-family preset to ONNX (graphs vision, embed, score, prune and the language model)
with the vlmx custom ops, plus manifest.json, the torch reference and an accuracy report, into one new directory.

Every bad argument or unsupported combination gives one clear error, exit status 2, and no output directory; the
cheap checks run before torch is imported. Exit 1: the export failed (nothing is left behind); exit 3: the export
was written but its accuracy report FAILED (vlm-run / vlm-build then refuse it without --force); 130/143:
interrupted by Ctrl-C / SIGTERM (nothing is left behind).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from vlmx.torch_ref.contract import ATTENTION_MODES, PRECISIONS, PRUNE_METHODS, is_export_dir
from vlmx.torch_ref.outdir import OutputError, check_out, run_cli
from vlmx.torch_ref.targets import DEFAULT_TARGET, TARGETS, get_target

from .options import MAX_OPSET, MIN_OPSET, NATIVE_ATTENTION_OPSET, STATIC_QDQ_OPSET, ExportOptions


class UsageError(ValueError):
    """A bad argument or combination; the message says what was wrong and what to do."""


def parser(prog: str = "vlm-export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset name (llava, llava-tiny, llava-siglip, llava-mpt, ...)")
    p.add_argument("--checkpoint", default=None, help="local checkpoint directory (default: seeded random weights)")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"deployment target: {', '.join(TARGETS)} "
                                                            f"(default {DEFAULT_TARGET})")
    p.add_argument("--precision", default="fp16", help=f"one of {', '.join(PRECISIONS)} (default fp16)")
    p.add_argument("--attention", default="plugin", help=f"one of {', '.join(ATTENTION_MODES)} (default plugin)")
    p.add_argument("--out", required=True, help="new output directory (written atomically; one writer at a time)")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset {MIN_OPSET}..{MAX_OPSET} (default 18; {NATIVE_ATTENTION_OPSET} for --attention "
                        "native)")
    p.add_argument("--calib", type=int, default=0, help="w8a8 only: calibrate static Q/DQ on N random inputs")
    p.add_argument("--keep", type=float, default=1.0, help="default visual-token keep ratio in (0, 1] for the runtime")
    p.add_argument("--prune", default="text", help=f"default pruning method: {', '.join(PRUNE_METHODS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and synthetic inputs")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache length S_max of the language-model graph: prompt + image tokens + new tokens must "
                        "fit (default: the preset's context length; smaller saves GPU memory)")
    p.add_argument("--plugins-only", action="store_true",
                   help="strip the vlmx function bodies (bare plugin nodes: TensorRT with the vlmx plugin library only; "
                        "ONNX Runtime cannot run such an export and no accuracy report is made)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous vlmx export (never anything else)")
    p.add_argument("--no-report", action="store_true", help="skip the accuracy report")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--verbose", action="store_true", help="show library warnings (transformers, torch.onnx)")
    return p


def check_arguments(args) -> None:
    """The checks that need no torch: names, ranges, combinations and the output path."""
    try:
        get_target(args.target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.precision not in PRECISIONS:
        raise UsageError(f"--precision {args.precision} is not known; choose one of {', '.join(PRECISIONS)}")
    if args.attention not in ATTENTION_MODES:
        raise UsageError(f"--attention {args.attention} is not known; choose one of {', '.join(ATTENTION_MODES)}")
    if args.opset is not None and not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise UsageError(f"--opset {args.opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    if args.attention == "native" and args.opset is not None and args.opset < NATIVE_ATTENTION_OPSET:
        raise UsageError(f"--attention native needs the ONNX Attention op (opset {NATIVE_ATTENTION_OPSET}); "
                         f"pass --opset {NATIVE_ATTENTION_OPSET} or use --attention plugin/decomposed")
    if args.calib < 0:
        raise UsageError(f"--calib {args.calib} must be >= 0 (number of calibration inputs)")
    if args.calib and args.precision != "w8a8":
        raise UsageError(f"--calib calibrates static int8 Q/DQ and needs --precision w8a8 (got {args.precision})")
    if args.calib and args.opset is not None and args.opset < STATIC_QDQ_OPSET:
        raise UsageError(f"--calib on a float16 graph needs float16 Q/DQ scales (opset {STATIC_QDQ_OPSET}); pass "
                         f"--opset {STATIC_QDQ_OPSET} or later")
    if not 0.0 < args.keep <= 1.0:  # also refuses nan
        raise UsageError(f"--keep {args.keep} is outside (0, 1]; pass a keep ratio such as 0.25")
    if args.prune not in PRUNE_METHODS:
        raise UsageError(f"--prune {args.prune} is not known; choose one of {', '.join(PRUNE_METHODS)}")
    if args.checkpoint is not None and Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} is a file; pass the checkpoint directory (the folder "
                         "holding config.json and model.safetensors)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist; pass a checkpoint directory or omit "
                         "--checkpoint for seeded random weights")
    try:
        check_out(args.out, args.overwrite, is_export_dir, "a vlmx export")
    except OutputError as e:
        raise UsageError(str(e)) from None


def validate(args) -> ExportOptions:
    """Check every argument and combination (cheap ones first); raises :class:`UsageError` with what to do."""
    check_arguments(args)
    from vlmx.torch_ref import models
    from vlmx.torch_ref.pruning import keep_count

    try:
        spec = models.get_preset(args.model)
    except models.PresetError as e:
        raise UsageError(f"--model: {e}") from None
    if args.checkpoint is not None:
        from transformers import LlavaConfig

        from .processor_files import ProcessorFilesError, check_checkpoint_files

        try:
            models.check_checkpoint(spec, args.checkpoint)
            check_checkpoint_files(args.checkpoint, LlavaConfig.from_pretrained(args.checkpoint))
        except models.PresetError as e:
            raise UsageError(f"--checkpoint: {e}") from None
        except ProcessorFilesError as e:
            raise UsageError(str(e)) from None
    keep_count(spec.num_image_tokens, float(args.keep))
    if args.prune == "cls" and not spec.has_cls:
        raise UsageError(f"--prune cls needs a [CLS] token, but the {spec.vision} tower of {spec.name} has none; "
                         "use --prune text")
    if args.max_seq_len is not None and not 2 <= args.max_seq_len <= spec.max_seq_len:
        raise UsageError(f"--max-seq-len {args.max_seq_len} is outside 2..{spec.max_seq_len} (the context length of "
                         f"{spec.name}); pass a KV-cache length in that range")
    if args.max_seq_len is not None and args.max_seq_len <= spec.num_image_tokens:
        raise UsageError(f"--max-seq-len {args.max_seq_len} leaves no room for text: one image alone is "
                         f"{spec.num_image_tokens} tokens; pass more than that")
    return ExportOptions(model=spec.name, out=Path(args.out), checkpoint=args.checkpoint, target=args.target,
                         precision=args.precision, attention=args.attention, opset=args.opset, calib=args.calib,
                         keep=float(args.keep), prune=args.prune, seed=args.seed, plugins_only=args.plugins_only,
                         overwrite=args.overwrite, report=not args.no_report, max_seq_len=args.max_seq_len)


class Progress:
    """One rich progress line per stage (spinner while running, elapsed time when done)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        if not self.enabled:
            yield
            return
        from rich.progress import Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=self.console, transient=True) as bar:
            bar.add_task(name, total=None)
            yield
        self.console.print(f"[green]✓[/green] {name} ({time.perf_counter() - t0:.1f} s)")


def run_export(args, prog: str = "vlm-export") -> int:
    """Validate, export and print the summary; returns the exit status (see the module docstring)."""
    try:
        opts = validate(args)
    except (UsageError, ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from .driver import export_model

    try:
        manifest = export_model(opts, Progress(not args.quiet))
    except OutputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line; the temporary directory is already gone
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    from .report import summary

    print(f"{prog}: wrote {opts.out} ({manifest['model']}, {manifest['precision']}, {manifest['attention']} "
          f"attention, opset {manifest['opset']}, ops {', '.join(manifest['ops_used']) or 'none'})")
    for note in manifest.get("notes", []):
        print(f"{prog}: note: {note}")
    report_path = Path(opts.out) / "report.json"
    if report_path.is_file():
        import json

        report = json.loads(report_path.read_text())
        print(summary(report))
        if not report["passed"]:
            print(f"{prog}: error: the accuracy report FAILED ({report_path}); vlm-run and vlm-build refuse this "
                  "export without --force", file=sys.stderr)
            return 3
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("vlm-export", lambda: run_export(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

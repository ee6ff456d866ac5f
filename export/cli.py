"""``vlm-export``: export a LLaVA-family preset to ONNX (vision, embed, score, prune and one language-model graph
with an in-place KV cache) with the vlmx custom ops, a manifest, the torch reference and an accuracy report.

Every bad argument or unsupported combination gives one clear error, exit status 2, and no output directory.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .driver import PRECISIONS, PRUNE_METHODS, ExportOptions, export_model
from .exporter import MAX_OPSET, MIN_OPSET
from .hf_attention import ATTENTION_MODES, NATIVE_ATTENTION_OPSET


class UsageError(ValueError):
    """A bad argument or combination; the message says what was wrong and what to do."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="preset name (llava, llava-tiny, llava-siglip, llava-mpt, ...)")
    p.add_argument("--checkpoint", default=None, help="local checkpoint directory (default: seeded random weights)")
    p.add_argument("--target", default="trt-sm75", help="deployment target (trt-sm75 default; trt-sm80/86/87/89/90)")
    p.add_argument("--precision", default="fp16", help=f"one of {', '.join(PRECISIONS)} (default fp16)")
    p.add_argument("--attention", default="plugin", help=f"one of {', '.join(ATTENTION_MODES)} (default plugin)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset {MIN_OPSET}..{MAX_OPSET} (default 18; 23 for --attention native)")
    p.add_argument("--calib", type=int, default=0, help="w8a8 only: calibrate static Q/DQ on N random inputs")
    p.add_argument("--keep", type=float, default=1.0, help="default visual-token keep ratio in (0, 1] for the runtime")
    p.add_argument("--prune", default="text", help=f"default pruning method: {', '.join(PRUNE_METHODS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and synthetic inputs")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache length S_max of the language-model graph: prompt + image tokens + new tokens must "
                        "fit (default: the preset's context length; smaller saves GPU memory)")
    p.add_argument("--plugins-only", action="store_true", help="strip the vlmx function bodies (bare plugin nodes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--no-report", action="store_true", help="skip the accuracy report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--build-engines", action="store_true",
                   help="after the export, build TensorRT / TensorRT-RTX engines into <out>/engines (vlm-build)")
    p.add_argument("--engine-backend", default="auto",
                   help="with --build-engines: auto, tensorrt (GPU, plugins) or tensorrt-rtx (CPU builder)")
    p.add_argument("--plugin-lib", default=None, help="with --build-engines: libvlmx_trt_plugins.so (TensorRT only)")
    return p


def check_engine_backend(args) -> None:
    """With --build-engines, fail before exporting when the engine builder cannot be imported."""
    if not args.build_engines:
        if args.engine_backend != "auto" or args.plugin_lib:
            raise UsageError("--engine-backend/--plugin-lib only apply with --build-engines")
        return
    from vlmx.trt_runtime.trt_import import BACKEND_CHOICES, TensorRTUnavailable, import_tensorrt

    if args.engine_backend not in BACKEND_CHOICES:
        raise UsageError(f"--engine-backend {args.engine_backend} is not known; choose one of "
                         f"{', '.join(BACKEND_CHOICES)}")
    try:
        import_tensorrt(args.engine_backend)
    except TensorRTUnavailable as e:
        raise UsageError(f"--build-engines: {e}") from None


def validate(args) -> ExportOptions:
    """Check every argument and combination; raises :class:`UsageError` with what to do."""
    from vlmx.torch_ref import models
    from vlmx.torch_ref.pruning import keep_count
    from vlmx.torch_ref.targets import get_target

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
    if args.calib and args.precision == "w8a8" and args.opset is not None and args.opset < 19:
        raise UsageError("--calib on a float16 graph needs float16 Q/DQ scales (opset 19); pass --opset 19 or later")
    if not 0.0 < args.keep <= 1.0:
        raise UsageError(f"--keep {args.keep} is outside (0, 1]; pass a keep ratio such as 0.25")
    keep_count(spec.num_image_tokens, float(args.keep))
    if args.prune not in PRUNE_METHODS:
        raise UsageError(f"--prune {args.prune} is not known; choose one of {', '.join(PRUNE_METHODS)}")
    if args.prune == "cls" and not spec.has_cls:
        raise UsageError(f"--prune cls needs a [CLS] token, but the {spec.vision} tower of {spec.name} has none; "
                         "use --prune text")
    if args.max_seq_len is not None and not 2 <= args.max_seq_len <= spec.max_seq_len:
        raise UsageError(f"--max-seq-len {args.max_seq_len} is outside 2..{spec.max_seq_len} (the context length of "
                         f"{spec.name}); pass a KV-cache length in that range")
    if args.max_seq_len is not None and args.max_seq_len <= spec.num_image_tokens:
        raise UsageError(f"--max-seq-len {args.max_seq_len} leaves no room for text: one image alone is "
                         f"{spec.num_image_tokens} tokens; pass more than that")
    check_engine_backend(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it or choose another directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another path")
    return ExportOptions(model=spec.name, out=out, checkpoint=args.checkpoint, target=args.target,
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


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        opts = validate(args)
    except (UsageError, ValueError, TypeError) as e:
        print(f"vlm-export: error: {e}", file=sys.stderr)
        return 2
    try:
        manifest = export_model(opts, Progress(not args.quiet))
    except Exception as e:  # noqa: BLE001 - one clear line; the temporary directory is already gone
        print(f"vlm-export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    from .report import summary

    print(f"vlm-export: wrote {opts.out} ({manifest['model']}, {manifest['precision']}, {manifest['attention']} "
          f"attention, opset {manifest['opset']}, ops {', '.join(manifest['ops_used']) or 'none'})")
    for note in manifest.get("notes", []):
        print(f"vlm-export: note: {note}")
    report_path = Path(opts.out) / "report.json"
    if report_path.is_file():
        import json

        report = json.loads(report_path.read_text())
        print(summary(report))
        if not report["passed"]:
            return 3
    if args.build_engines:
        # Hand the finished export to the next stage (vlm-build); the export itself is complete either way.
        from vlmx.trt_runtime.build_cli import main as build_main

        build_args = ["--artifacts", str(opts.out), "--backend", args.engine_backend]
        build_args += ["--plugin-lib", args.plugin_lib] if args.plugin_lib else []
        return build_main(build_args + (["--quiet"] if args.quiet else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())

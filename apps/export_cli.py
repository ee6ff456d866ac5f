"""``vlm-export`` (the console script): :mod:`vlmx.export.cli` plus ``--build-engines``, which hands the finished
export to vlm-build (:mod:`vlmx.trt_runtime.build_cli`). It lives above both parts so neither imports the other
against the flow. Combinations the chosen engine backend cannot build are refused before the export starts.
"""
from __future__ import annotations

import sys

from vlmx.export import cli as export_cli
from vlmx.torch_ref.outdir import run_cli


def parser():
    from vlmx.trt_runtime.trt_import import BACKEND_CHOICES

    p = export_cli.parser()
    p.description = (p.description or "") + ("\nWith --build-engines the export is then built into <out>/engines "
                                             "(vlm-build); the export stays complete if that build fails.")
    p.add_argument("--build-engines", action="store_true",
                   help="after the export, build TensorRT / TensorRT-RTX engines into <out>/engines (vlm-build)")
    p.add_argument("--engine-backend", default="auto",
                   help=f"with --build-engines: {', '.join(BACKEND_CHOICES)} (tensorrt: GPU, plugins; tensorrt-rtx: "
                        "CPU builder)")
    p.add_argument("--plugin-lib", default=None, help="with --build-engines: libvlmx_trt_plugins.so (TensorRT only)")
    return p


def check_engine_arguments(args) -> None:
    """With --build-engines, refuse before exporting what the engine builder cannot do."""
    from vlmx.torch_ref.targets import get_target
    from vlmx.trt_runtime.engine_build import EngineBuildError, check_build_combination
    from vlmx.trt_runtime.trt_import import BACKEND_CHOICES, TensorRTUnavailable, import_tensorrt

    UsageError = export_cli.UsageError
    if not args.build_engines:
        if args.engine_backend != "auto" or args.plugin_lib:
            raise UsageError("--engine-backend/--plugin-lib only apply with --build-engines")
        return
    if args.engine_backend not in BACKEND_CHOICES:
        raise UsageError(f"--engine-backend {args.engine_backend} is not known; choose one of "
                         f"{', '.join(BACKEND_CHOICES)}")
    try:
        trt = import_tensorrt(args.engine_backend)
    except TensorRTUnavailable as e:
        raise UsageError(f"--build-engines: {e}") from None
    try:
        check_build_combination(trt, {"precision": args.precision, "plugins_only": args.plugins_only},
                                get_target(args.target).sm, args.plugin_lib)
    except EngineBuildError as e:
        raise UsageError(f"--build-engines --engine-backend {args.engine_backend}: {e}") from None


def _main(args) -> int:
    try:
        export_cli.check_arguments(args)
        check_engine_arguments(args)
    except (export_cli.UsageError, ValueError) as e:
        print(f"vlm-export: error: {e}", file=sys.stderr)
        return 2
    rc = export_cli.run_export(args)
    if rc != 0 or not args.build_engines:
        return rc
    from vlmx.trt_runtime.build_cli import main as build_main

    build_args = ["--artifacts", str(args.out), "--backend", args.engine_backend]
    build_args += ["--plugin-lib", args.plugin_lib] if args.plugin_lib else []
    rc = build_main(build_args + (["--quiet"] if args.quiet else []) + (["--verbose"] if args.verbose else []))
    if rc != 0:
        print(f"vlm-export: the export in {args.out} is complete; only the engine build failed (re-run vlm-build)",
              file=sys.stderr)
    return rc


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("vlm-export", lambda: _main(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

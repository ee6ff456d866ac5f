"""``vlm-build``: build TensorRT / TensorRT-RTX engines for every graph of an export directory.

The engine directory (default ``<artifacts>/engines``) follows vlm-export's rule: an existing one is replaced only
with ``--overwrite`` and only when it holds vlm-build engines; it is written atomically, one writer at a time.
An export whose accuracy report FAILED is refused unless ``--force``. Exit 2: bad input (one line, nothing
written); 130/143: interrupted (nothing left behind).
"""
from __future__ import annotations

import argparse
import os
import sys

from vlmx.torch_ref.outdir import run_cli

from .trt_import import BACKEND_CHOICES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, help="directory written by vlm-export --out")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="tensorrt (GPU, plugins), tensorrt-rtx (CPU builder, targets a compute capability, no "
                        "plugins) or auto (tensorrt if importable, else tensorrt-rtx)")
    p.add_argument("--plugin-lib", default=None,
                   help="libvlmx_trt_plugins.so, TensorRT only (default: $VLMX_PLUGIN_LIB, set in the Dockerfile)")
    p.add_argument("--target", default=None, help="compute capability, e.g. trt-sm75 or 75 (default: the export's)")
    p.add_argument("--out", default=None, help="engine directory (default: <artifacts>/engines)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine directory")
    p.add_argument("--force", action="store_true", help="build even though the export's accuracy report failed")
    p.add_argument("--verify", action="store_true", help="re-hash every file of the export (default: size + mtime)")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: <out>/timing.cache)")
    p.add_argument("--graph", action="append", default=None, help="build only this graph (repeatable)")
    p.add_argument("--card", default=None, help="plan GPU memory for this card: t4, rtx2080, rtx2060 (default: t4 "
                   "for sm75); the build is refused when weights + KV cache + activations do not fit")
    p.add_argument("--quiet", action="store_true", help="no build progress")
    p.add_argument("--verbose", action="store_true", help="show library warnings")
    p.add_argument("--print-layers", action="store_true", help="print each engine's layer list after the build")
    return p


def _build(args) -> int:
    from .artifacts import ArtifactError
    from .engine_build import EngineBuildError, build_engines
    from .trt_import import TensorRTUnavailable

    plugin_lib = args.plugin_lib
    if plugin_lib is None and args.backend != "tensorrt-rtx":
        plugin_lib = os.environ.get("VLMX_PLUGIN_LIB") or None
    try:
        paths = build_engines(args.artifacts, out_dir=args.out, backend=args.backend, plugin_lib=plugin_lib,
                              timing_cache=args.timing_cache, target=args.target, graphs=args.graph,
                              progress=not args.quiet, verify=args.verify, overwrite=args.overwrite,
                              force=args.force, card=args.card)
    except (ArtifactError, EngineBuildError, TensorRTUnavailable, ValueError) as e:
        print(f"vlm-build: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only or full disk, --out under a file, ...
        print(f"vlm-build: error: cannot write the engines ({e.strerror or e}: {e.filename or args.out}); choose "
              "another --out", file=sys.stderr)
        return 2
    for graph, path in paths.items():
        print(f"{graph}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
        if args.print_layers:
            from .trt_backend import engine_layers

            source, lines = engine_layers(path)
            print(f"  {len(lines)} layers ({source}):")
            for line in lines:
                print(f"    {line}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("vlm-build", lambda: _build(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""Build TensorRT (or TensorRT-RTX) engines from an export directory, with polygraphy's loaders.

One engine per graph of ``manifest.json``: ``NetworkFromOnnxPath`` (strongly typed), ``CreateConfig`` /
``CreateConfigRTX`` (optimization profiles from ``graphs[<graph>].profile(s)``, detailed profiling, progress, the
target compute capability on TensorRT-RTX, a timing cache on TensorRT), ``EngineBytesFromNetwork``. With a plugin
library every vlmx node is parsed as our plugin (bodies stripped, ``ENABLE_PLUGIN_OVERRIDE``); the library is
registered with :func:`~vlmx.trt_runtime.trt_import.load_plugin_library` first. Writes ``<out>/<graph>.plan`` and
``<out>/engines.json`` (default ``<export>/engines``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from vlmx.torch_ref.op_table import DOMAIN
from vlmx.torch_ref.targets import get_target

from vlmx.torch_ref.contract import sha256_file
from vlmx.torch_ref.outdir import atomic_output, check_out

from .artifacts import load_artifacts
from .trt_import import TensorRT, import_tensorrt, load_plugin_library, polygraphy_trt, quiet_polygraphy

ENGINES_FORMAT = "vlmx-engines"
ENGINES_FORMAT_VERSION = 1
ENGINES_JSON = "engines.json"


class EngineBuildError(RuntimeError):
    """The engine cannot be built as asked; the message says what was wrong and what to do."""


def resolve_target_sm(target, manifest: dict | None = None) -> int:
    """``trt-sm75`` / ``sm75`` / ``75`` / 75 → 75; None → the export's ``sm`` (default 75)."""
    if target is None:
        return int((manifest or {}).get("sm") or 75)
    if isinstance(target, int):
        return target
    text = str(target)
    if text.startswith("trt-"):
        return get_target(text).sm
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})", text)
    if not m:
        raise EngineBuildError(f"--target {text} is not a target; pass e.g. trt-sm75, sm75 or 75")
    return int(m.group(1))


def vlmx_nodes(onnx_path: Path) -> tuple[list[str], list[str]]:
    """(vlmx nodes without a function body, vlmx nodes backed by a model-local function), as ``op:name``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    bodies = {(f.domain, f.name) for f in model.functions}
    bare, backed = [], []
    for node in model.graph.node:
        if node.domain == DOMAIN:
            (backed if (node.domain, node.op_type) in bodies else bare).append(f"{node.op_type}:{node.name}")
    return bare, backed


def _plugin_copy(onnx_path: Path) -> Path:
    """A copy of the graph with bare vlmx nodes named after their op (no bodies), next to the original so external
    weights resolve: with a plugin library every node becomes our plugin, including variant nodes
    (``FlashAttention_v1``: vlmx.export.functions), whose op_type names no creator."""
    import onnx

    from vlmx.export.functions import strip_vlmx_functions

    model = strip_vlmx_functions(onnx.load(str(onnx_path), load_external_data=False))
    out = onnx_path.with_name(f".{onnx_path.stem}.plugin-nodes.onnx")
    onnx.save(model, str(out))
    return out


def _progress_monitor(trt, label: str):
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            print(f"[build {label}] {phase_name} ({num_steps} steps)", file=sys.stderr)

        def step_complete(self, phase_name, step):
            now = time.monotonic()
            if now - self.last > 2.0:
                self.last = now
                print(f"[build {label}] {phase_name}: step {step + 1}", file=sys.stderr)
            return True

        def phase_finish(self, phase_name):
            pass

    return Progress()


def _current_device():
    """(name, sm) of CUDA device 0, or None when no GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), 10 * major + minor
    except ImportError:
        pass
    return None


class _BuildLog:
    """A TensorRT logger for one build that keeps the errors and the engine's layer list (the builder logs it at
    VERBOSE with DETAILED profiling); installed as polygraphy's TensorRT logger while the build runs."""

    def __new__(cls, mod, verbose: bool):
        class Log(mod.ILogger):
            def __init__(self):
                mod.ILogger.__init__(self)
                self.errors: list[str] = []
                self.layers: list[str] = []

            def log(self, severity, msg):
                if msg.startswith("Layers:"):
                    self.layers = [ln for ln in msg.splitlines()[1:] if ln.startswith("Name:")]
                if severity <= mod.ILogger.Severity.ERROR:
                    self.errors.append(" ".join(msg.split()))  # one line per error
                if severity <= mod.ILogger.Severity.ERROR or (verbose and severity <= mod.ILogger.Severity.WARNING):
                    print(f"[TensorRT] {msg}", file=sys.stderr)

        return Log()


@contextlib.contextmanager
def _polygraphy_logging_to(log):
    import polygraphy.backend.trt.util as trt_util

    old, trt_util.TRT_LOGGER = trt_util.TRT_LOGGER, log
    try:
        with quiet_polygraphy():
            yield
    finally:
        trt_util.TRT_LOGGER = old


def _profiles(pg, network, named: dict, graph: str, default_value: int) -> list:
    """polygraphy Profiles, one per named profile of the graph entry (the LM graph: prefill, then decode; the runner
    picks one per call), else its single ``profile``. Shape-tensor inputs take ``values`` or [1, d, d]."""
    out = []
    for spec in named.values():
        prof = pg.Profile()
        for t in (network.get_input(i) for i in range(network.num_inputs)):
            entry = (spec or {}).get(t.name)
            if t.is_shape_tensor:
                v = (entry or {}).get("values") or {"min": [1], "opt": [default_value], "max": [default_value]}
                prof.add(t.name, v["min"], v["opt"], v["max"])
            elif any(d < 0 for d in t.shape):
                if entry is None:
                    raise EngineBuildError(f"graph {graph}: input {t.name} has dynamic shape {tuple(t.shape)} but "
                                           "manifest.json gives it no profile (min/opt/max); re-run vlm-export")
                prof.add(t.name, entry["min"], entry["opt"], entry["max"])
        out.append(prof)
    return out


def build_engine(trt: TensorRT, onnx_path, plan_path, profile: dict | None = None, plugin_lib=None,
                 timing_cache=None, target_sm: int = 75, graph: str | None = None, progress: bool = True,
                 default_shape_value: int = 1, profiles: dict | None = None) -> dict:
    """Parse ``onnx_path``, build one engine and write it to ``plan_path``; returns its engines.json entry.

    ``profiles``: named optimization profiles of one engine (the LM graph's prefill and decode), else ``profile``.
    The entry carries ``layers`` (the engine's layer lines from the builder log), ``network_layers`` and
    ``profiles`` (profile names in index order).
    """
    from polygraphy.exception import PolygraphyException

    mod = trt.module
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    label = graph or onnx_path.stem
    bare, backed = vlmx_nodes(onnx_path)
    if bare and not plugin_lib:
        raise EngineBuildError(f"{onnx_path.name} has vlmx nodes without function bodies ({', '.join(bare[:4])}"
                               f"{', ...' if len(bare) > 4 else ''}); pass --plugin-lib libvlmx_trt_plugins.so, or "
                               "re-export without --plugins-only (the bodies then build natively)")
    if plugin_lib:
        check_plugin_parser(trt)
        load_plugin_library(trt, plugin_lib)
    pg = polygraphy_trt(trt)
    override = getattr(getattr(mod, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    flags = [override] if plugin_lib and override is not None else None  # our creators, not the bodies
    parse_path = _plugin_copy(onnx_path) if plugin_lib and backed else onnx_path
    log = _BuildLog(mod, verbose=False)
    try:
        with _polygraphy_logging_to(log):
            builder, network, parser = pg.NetworkFromOnnxPath(str(parse_path), flags=flags, strongly_typed=True)()
    except PolygraphyException:
        errs = log.errors or ["no error was logged"]
        hint = ""
        if trt.is_rtx and any("MatMulInteger" in e for e in errs):
            hint = (" (TensorRT-RTX cannot import MatMulInteger, the body of vlmx W8A8Linear: build W8A8 exports "
                    "with the vlmx plugin library (--plugin-lib), or export with --precision fp16)")
        raise EngineBuildError(f"{trt.flavour} {trt.version} could not parse {onnx_path}: " + " | ".join(errs)
                               + hint) from None
    finally:
        if parse_path != onnx_path:
            parse_path.unlink(missing_ok=True)
    network_layers = [f"{network.get_layer(i).name} [{str(network.get_layer(i).type).split('.')[-1]}]"
                      for i in range(network.num_layers)]
    named = profiles or {"default": profile or {}}
    dynamic = any(any(d < 0 for d in network.get_input(i).shape) or network.get_input(i).is_shape_tensor
                  for i in range(network.num_inputs))
    options = {"profiles": _profiles(pg, network, named, label, default_shape_value) if dynamic else None,
               "profiling_verbosity": mod.ProfilingVerbosity.DETAILED,
               "progress_monitor": _progress_monitor(mod, label) if progress else None}
    cache = None
    if trt.is_rtx:  # TensorRT-RTX: a compute capability to target; timing caches are deprecated no-ops
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX as Config

        check_rtx_target(trt, target_sm)
        options["compute_capabilities"] = [(target_sm // 10, target_sm % 10)]
    else:
        Config = pg.CreateConfig
        if timing_cache is not None:
            cache = Path(timing_cache)
            options["load_timing_cache"] = str(cache) if cache.is_file() else None
    t0 = time.perf_counter()
    try:
        with _polygraphy_logging_to(log):
            serialized = pg.EngineBytesFromNetwork((builder, network, parser), Config(**options),
                                                   save_timing_cache=str(cache) if cache else None)()
    except PolygraphyException:
        raise EngineBuildError(f"{trt.flavour} {trt.version} failed to build {onnx_path.name}: "
                               + (" | ".join(log.errors) or "no error was logged")) from None
    seconds = time.perf_counter() - t0
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return {"file": plan_path.name, "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
            "bytes": plan_path.stat().st_size, "sha256": sha256_file(plan_path), "build_seconds": round(seconds, 3),
            "vlmx_nodes": {"plugin_or_body": backed, "plugin_only": bare},
            "layers": log.layers, "network_layers": network_layers, "profiles": list(named) if dynamic else []}

ENGINES_DIR = "engines"


def is_engines_dir(path) -> bool:
    """Whether ``path`` holds engines written by vlm-build (an engines.json of our format)."""
    try:
        return json.loads((Path(path) / ENGINES_JSON).read_text()).get("format") == ENGINES_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class SonameLinkNeeded(EngineBuildError):
    """TensorRT-RTX's parser needs ``libtensorrt_rtx.so`` on the loader path; ``link_dir`` holds that link (the
    loader path is read at process start: vlm-build re-runs itself with it)."""

    def __init__(self, message: str, link_dir: Path):
        super().__init__(message)
        self.link_dir = link_dir


def _rtx_library() -> Path | None:
    """The libtensorrt_rtx.so.1 this process loaded (after importing the bindings), from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return next((Path(ln.split()[-1]) for ln in maps if ln.endswith("/libtensorrt_rtx.so.1")), None)


def check_plugin_parser(trt: TensorRT) -> None:
    """Refuse, with the fix, a TensorRT whose ONNX parser cannot build vlmx plugin layers.

    TensorRT-RTX 1.6 refuses custom ops in its static check; 1.7's parser ``dlopen``s the unversioned
    ``libtensorrt_rtx.so`` when it creates a plugin and calls ``std::terminate`` when that fails, and the pip wheel
    ships only ``libtensorrt_rtx.so.1`` (docs/tensorrt.md). So before any parse: if ``libtensorrt_rtx.so`` does not
    load here, make the link in a private cache directory and raise :class:`SonameLinkNeeded` naming it.
    """
    if not trt.is_rtx:
        return
    if not trt.parses_plugins:
        raise EngineBuildError(f"TensorRT-RTX {trt.version}'s ONNX parser has no plugin layers (it refuses vlmx "
                               "nodes); drop --plugin-lib to build the function bodies, or install TensorRT-RTX >= "
                               "1.7 (pip install tensorrt-rtx-cu12-libs==1.7.1.116 "
                               "tensorrt-rtx-cu12-bindings==1.7.1.116) for plugin layers")
    import ctypes

    try:
        ctypes.CDLL("libtensorrt_rtx.so")
        return
    except OSError:
        pass
    lib = _rtx_library()
    if lib is None:
        raise EngineBuildError(f"TensorRT-RTX {trt.version}: cannot find the libtensorrt_rtx.so.1 it loaded, for "
                               "the libtensorrt_rtx.so link its parser needs; put such a link on LD_LIBRARY_PATH")
    from vlmx.plugins.trt_build import cache_dir

    link_dir = cache_dir() / f"tensorrt-rtx-{trt.version}-solink"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "libtensorrt_rtx.so"
    if not (link.is_symlink() and Path(os.readlink(link)) == lib):
        tmp = link_dir / f".libtensorrt_rtx.so.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(lib)
        tmp.replace(link)
    raise SonameLinkNeeded(f"TensorRT-RTX {trt.version}'s ONNX parser loads libtensorrt_rtx.so for plugin layers "
                           f"and its wheel ships only libtensorrt_rtx.so.1: run with LD_LIBRARY_PATH={link_dir}"
                           f"{os.pathsep}$LD_LIBRARY_PATH (the link is made; vlm-build does this itself)", link_dir)


def check_rtx_target(trt: TensorRT, sm: int) -> None:
    caps = getattr(trt.module, "ComputeCapability", None)
    if caps is not None and getattr(caps, f"SM{sm}", None) is None:
        names = [n for n in caps.__members__ if n.startswith("SM")]
        raise EngineBuildError(f"TensorRT-RTX {trt.version} cannot target sm_{sm}; it offers {names}: export or "
                               "build for one of those (--target), or use --backend tensorrt on an sm_"
                               f"{sm} GPU")


def check_build_combination(trt: TensorRT, manifest: dict, sm: int, plugin_lib=None) -> None:
    """Refuse, before any work, what this TensorRT flavour cannot build from an export with these fields
    (``precision``, ``plugins_only``) for compute capability ``sm``; with ``plugin_lib``, a parser without plugin
    layers (or, TensorRT-RTX 1.7, without its soname link: :class:`SonameLinkNeeded`)."""
    if not trt.is_rtx:
        return
    check_rtx_target(trt, sm)
    if plugin_lib:
        check_plugin_parser(trt)
        return
    if manifest.get("precision") == "w8a8":
        raise EngineBuildError("TensorRT-RTX cannot build --precision w8a8 exports from their function bodies: it "
                               "cannot import MatMulInteger (the body of vlmx W8A8Linear); pass --plugin-lib "
                               "(TensorRT-RTX >= 1.7 or TensorRT), or export with --precision fp16")
    if manifest.get("plugins_only"):
        raise EngineBuildError("TensorRT-RTX cannot build --plugins-only exports (bare vlmx nodes) without "
                               "--plugin-lib libvlmx_trt_plugins.so (TensorRT-RTX >= 1.7); or re-export without "
                               "--plugins-only")

def build_engines(export_dir, out_dir=None, backend: str = "auto", plugin_lib=None, timing_cache=None,
                  target=None, graphs=None, progress: bool = True, verify: bool = False, overwrite: bool = False,
                  force: bool = False, card: str | None = None) -> dict[str, Path]:
    """Build one engine per graph of an export directory; returns {graph: plan path}.

    ``backend``: ``auto`` | ``tensorrt`` | ``tensorrt-rtx``. ``target``: compute capability (``trt-sm75``, 75;
    default: the export's). ``timing_cache``: a file read before and written after the builds (default
    ``<out>/timing.cache``; TensorRT only: TensorRT-RTX has none). Writes ``engines.json`` (TensorRT version,
    device or target, plugin library sha256). An existing engine directory is replaced only with ``overwrite``;
    an export whose accuracy report failed is refused unless ``force``. ``card``: plan memory against this card
    (:data:`memory_plan.CARDS`; default the target's usual card, e.g. a T4 for sm75) and refuse before building when
    the model does not fit.
    """
    from .memory_plan import check_build_memory

    art = load_artifacts(export_dir, verify=verify)
    art.refuse_failed_report(force)
    names = list(graphs or art.manifest["graphs"])
    unknown = [g for g in names if g not in art.manifest["graphs"]]
    if unknown:
        raise EngineBuildError(f"graphs {unknown} are not in the export; it has {sorted(art.manifest['graphs'])}")
    sm = resolve_target_sm(target, art.manifest)
    check_build_memory(art.manifest, card, sm, verbose=progress)
    trt = import_tensorrt(backend)
    check_build_combination(trt, art.manifest, sm, plugin_lib)
    device = None if trt.is_rtx else _current_device()
    if not trt.is_rtx:
        if device is None:
            raise EngineBuildError("TensorRT builds engines for the GPU it runs on and none is visible; run on the "
                                   "target GPU (e.g. the Dockerfile's container on a T4) or use --backend tensorrt-rtx "
                                   "to target a compute capability from the CPU")
        if device[1] != sm:
            raise EngineBuildError(f"TensorRT builds for this GPU ({device[0]}, sm_{device[1]}) but the target is "
                                   f"sm_{sm}; build on an sm_{sm} GPU, pass --target sm{device[1]}, or use "
                                   "--backend tensorrt-rtx")
    final = check_out(out_dir if out_dir else art.root / ENGINES_DIR, overwrite, is_engines_dir,
                      "a vlm-build engine directory")
    # Engines are built in a temporary directory renamed when every graph is done: no half-written directory.
    recheck = partial(check_out, final, overwrite, is_engines_dir, "a vlm-build engine directory")
    with atomic_output(final, recheck=recheck) as out:
        if not trt.is_rtx and not timing_cache and (final / "timing.cache").is_file():
            shutil.copy2(final / "timing.cache", out / "timing.cache")  # reuse the last build's tactics
        cache = None if trt.is_rtx else Path(timing_cache) if timing_cache else out / "timing.cache"
        default_keep = int(art.info.get("num_image_tokens") or 1)
        entries, paths = {}, {}
        for g in names:
            if progress:
                print(f"[vlm-build] {g}: {art.graph_path(g).name} -> {final / (g + '.plan')}", file=sys.stderr)
            entries[g] = build_engine(trt, art.graph_path(g), out / f"{g}.plan", art.graph(g).get("profile"),
                                      plugin_lib, cache, sm, g, progress, default_keep, art.graph(g).get("profiles"))
            paths[g] = final / f"{g}.plan"
        lib = Path(plugin_lib).resolve() if plugin_lib else None
        meta = {
            "format": ENGINES_FORMAT, "format_version": ENGINES_FORMAT_VERSION, "backend": trt.flavour,
            "tensorrt_version": trt.version, "target_sm": sm,
            "built_on": {"device": device[0] if device else None, "sm": device[1] if device else None},
            "plugin_lib": {"path": str(lib), "sha256": sha256_file(lib)} if lib else None,
            "export": {"root": str(art.root.resolve()), "model": art.model,
                       "manifest_sha256": art.manifest["manifest_sha256"]},
            "timing_cache": (str(final / cache.name) if cache.parent == out else str(cache)) if cache else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "engines": entries,
        }
        (out / ENGINES_JSON).write_text(json.dumps(meta, indent=1))
    return paths

"""Build TensorRT (or TensorRT-RTX) engines from an export directory.

One engine per graph of ``manifest.json``: a strongly typed network parsed from the ONNX file, one optimization
profile from ``graphs[<graph>].profile``, the vlmx plugin library loaded (TensorRT only) with
``ENABLE_PLUGIN_OVERRIDE`` so vlmx nodes become our plugins rather than their function bodies, the target compute
capability where the API offers it (TensorRT-RTX: ``ComputeCapability.SM75``; TensorRT builds for the GPU it runs
on), a timing cache, and build progress. Writes ``<out>/<graph>.plan`` and ``<out>/engines.json`` (default
``<export>/engines``).
"""
from __future__ import annotations

import json
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
from .trt_import import TensorRT, import_tensorrt

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


def _logger(trt, verbose: bool):
    """A TensorRT logger that keeps every message (the engine layer list arrives as a verbose message)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            if severity <= trt.ILogger.Severity.ERROR or (verbose and severity <= trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s <= trt.ILogger.Severity.ERROR]

        def engine_layers(self) -> list[str]:
            """Layer lines of the built engine (the builder logs them at VERBOSE with DETAILED profiling)."""
            for _, msg in reversed(self.messages):
                if msg.startswith("Layers:"):
                    return [ln for ln in msg.splitlines()[1:] if ln.startswith("Name:")]
            return []

    return Logger()


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


def _network_flags(trt) -> int:
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    return flags


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


def _apply_profiles(trt, builder, config, network, entry: dict, graph: str, default_value: int) -> list[str]:
    """One optimization profile per named profile of the graph entry (the LM graph: prefill, then decode), else
    its single ``profile``. Returns the profile names in index order (the runner selects by index)."""
    named = entry.get("profiles") or {"default": entry.get("profile") or {}}
    for prof in named.values():
        _apply_profile(trt, builder, config, network, prof, graph, default_value)
    return list(named)


def _apply_profile(trt, builder, config, network, profile: dict, graph: str, default_value: int):
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        spec = profile.get(t.name)
        if t.is_shape_tensor:
            vals = (spec or {}).get("values") or {"min": [1], "opt": [default_value], "max": [default_value]}
            prof.set_shape_input(t.name, vals["min"], vals["opt"], vals["max"])
        if any(d < 0 for d in t.shape):
            if spec is None:
                raise EngineBuildError(f"graph {graph}: input {t.name} has dynamic shape {tuple(t.shape)} but "
                                       "manifest.json gives it no profile (min/opt/max); re-run vlm-export")
            prof.set_shape(t.name, spec["min"], spec["opt"], spec["max"])
    config.add_optimization_profile(prof)


def build_engine(trt: TensorRT, onnx_path, plan_path, profile: dict | None = None, plugin_lib=None,
                 timing_cache=None, target_sm: int = 75, graph: str | None = None, progress: bool = True,
                 default_shape_value: int = 1, profiles: dict | None = None) -> dict:
    """Parse ``onnx_path``, build one engine and write it to ``plan_path``; returns its engines.json entry.

    ``profiles``: named optimization profiles of one engine (the LM graph's prefill and decode), else ``profile``.
    The entry carries ``layers`` (the engine's layer lines from the builder log), ``network_layers`` and
    ``profiles`` (profile names in index order).
    """
    mod = trt.module
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    label = graph or onnx_path.stem
    bare, backed = vlmx_nodes(onnx_path)
    if trt.is_rtx and bare:
        raise EngineBuildError(f"{onnx_path.name} has vlmx custom nodes without function bodies ({', '.join(bare[:4])}"
                               f"{', ...' if len(bare) > 4 else ''}); TensorRT-RTX has no plugin layers. Re-export "
                               "without --plugins-only (the bodies then build natively), use --attention native or "
                               "decomposed, or build with --backend tensorrt and the plugin library")
    if trt.is_rtx and plugin_lib:
        raise EngineBuildError("TensorRT-RTX cannot load plugin libraries; drop --plugin-lib or use --backend tensorrt")
    logger = _logger(mod, verbose=False)
    builder = mod.Builder(logger)
    if plugin_lib:
        lib = Path(plugin_lib)
        if not lib.is_file():
            raise EngineBuildError(f"--plugin-lib {lib} does not exist; build it with `python -m "
                                   "vlmx.plugins.trt_build` (see docs/tensorrt.md)")
        if builder.get_plugin_registry().load_library(str(lib.resolve())) is None:
            raise EngineBuildError(f"TensorRT could not load the plugin library {lib}: {logger.errors()}")
    elif bare:
        raise EngineBuildError(f"{onnx_path.name} has vlmx nodes without function bodies ({', '.join(bare[:4])}); "
                               "pass --plugin-lib libvlmx_trt_plugins.so")
    network = builder.create_network(_network_flags(mod))
    parser = mod.OnnxParser(network, logger)
    override = getattr(getattr(mod, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    if plugin_lib and override is not None:
        parser.set_flag(override)  # our creators win over the vlmx function bodies (DESIGN: precedence rule)
    parse_path = _plugin_copy(onnx_path) if plugin_lib and backed else onnx_path
    try:
        parsed = parser.parse_from_file(str(parse_path))
    finally:
        if parse_path != onnx_path:
            parse_path.unlink(missing_ok=True)
    if not parsed:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        hint = ""
        if trt.is_rtx and any("MatMulInteger" in e for e in errs):
            hint = (" (TensorRT-RTX cannot import MatMulInteger, the body of vlmx W8A8Linear: build W8A8 exports "
                    "with --backend tensorrt and the vlmx plugin library, or export with --precision fp16)")
        raise EngineBuildError(f"{trt.flavour} {trt.version} could not parse {onnx_path}: " + " | ".join(errs) + hint)
    network_layers = [f"{network.get_layer(i).name} [{str(network.get_layer(i).type).split('.')[-1]}]"
                      for i in range(network.num_layers)]
    config = builder.create_builder_config()
    config.profiling_verbosity = mod.ProfilingVerbosity.DETAILED
    if trt.is_rtx:
        member = getattr(mod.ComputeCapability, f"SM{target_sm}", None)
        if member is None:
            names = [n for n in mod.ComputeCapability.__members__ if n.startswith("SM")]
            raise EngineBuildError(f"TensorRT-RTX {trt.version} cannot target sm_{target_sm}; it offers {names}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(member, 0)
    if any(any(d < 0 for d in network.get_input(i).shape) or network.get_input(i).is_shape_tensor
           for i in range(network.num_inputs)):
        profile_names = _apply_profiles(mod, builder, config, network, {"profile": profile, "profiles": profiles},
                                        label, default_shape_value)
    else:
        profile_names = []
    cache = None
    if timing_cache is not None and not trt.is_rtx:  # TensorRT-RTX: timing caches are deprecated no-ops
        tc = Path(timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(mod, label) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"{trt.flavour} {trt.version} failed to build {onnx_path.name}: "
                               + (" | ".join(logger.errors()) or "no error was logged"))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": plan_path.name, "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
            "bytes": plan_path.stat().st_size, "sha256": sha256_file(plan_path), "build_seconds": round(seconds, 3),
            "vlmx_nodes": {"plugin_or_body": backed, "plugin_only": bare},
            "layers": logger.engine_layers(), "network_layers": network_layers, "profiles": profile_names}


ENGINES_DIR = "engines"


def is_engines_dir(path) -> bool:
    """Whether ``path`` holds engines written by vlm-build (an engines.json of our format)."""
    try:
        return json.loads((Path(path) / ENGINES_JSON).read_text()).get("format") == ENGINES_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_build_combination(trt: TensorRT, manifest: dict, sm: int, plugin_lib=None) -> None:
    """Refuse, before any work, what this TensorRT flavour cannot build from an export with these fields
    (``precision``, ``plugins_only``) for compute capability ``sm``."""
    if not trt.is_rtx:
        return
    if manifest.get("precision") == "w8a8":
        raise EngineBuildError("TensorRT-RTX cannot build --precision w8a8 exports: it cannot import MatMulInteger "
                               "(the body of vlmx W8A8Linear) and loads no plugins; build with --backend tensorrt and "
                               "the vlmx plugin library, or export with --precision fp16")
    if manifest.get("plugins_only"):
        raise EngineBuildError("TensorRT-RTX cannot build --plugins-only exports (bare vlmx nodes, and it has no plugin "
                               "layers); re-export without --plugins-only or build with --backend tensorrt")
    if plugin_lib:
        raise EngineBuildError("TensorRT-RTX cannot load plugin libraries; drop --plugin-lib or use --backend tensorrt")
    caps = getattr(trt.module, "ComputeCapability", None)
    if caps is not None and getattr(caps, f"SM{sm}", None) is None:
        names = [n for n in caps.__members__ if n.startswith("SM")]
        raise EngineBuildError(f"TensorRT-RTX {trt.version} cannot target sm_{sm}; it offers {names}: export or "
                               "build for one of those (--target), or use --backend tensorrt on an sm_"
                               f"{sm} GPU")


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

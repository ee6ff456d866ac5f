"""Bad inputs to the four CLIs, driven by one table: command, input, expected exit, expected message fragment.

Every case must give exactly one ``<prog>: error:`` line (or argparse's usage error), the expected exit status, no
traceback, and leave the working area exactly as it was (no output, temporary, lock or parent directory). The
cheap vlm-export cases run as subprocesses (they must fail before torch is imported); the cases against an export
directory run in-process on edited copies of the session's tiny export (``tests/conftest.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vlmx.torch_ref.contract import manifest_digest
from vlmx.trt_runtime.trt_import import available_flavours

MODULES = {"vlm-export": "vlmx.apps.export_cli", "vlm-run": "vlmx.trt_runtime.run_cli",
           "vlm-compare": "vlmx.trt_runtime.compare", "vlm-build": "vlmx.trt_runtime.build_cli"}
HAS_RTX = "tensorrt-rtx" in available_flavours()


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size (directories as -1)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def run_cli(prog: str, args: list[str], cwd: Path, timeout: float = 240) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", MODULES[prog], *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_clear_error(prog: str, out: str, err: str, fragment: str) -> None:
    text = out + err
    assert "Traceback" not in text, text
    assert fragment in err, err
    assert err.count(f"{prog}: error:") == 1 or "usage:" in err, err


# ------------------------------------------------------------------------------- vlm-export, before any work
def _user_dir(ws: Path) -> str:
    d = ws / "mine"
    d.mkdir()
    (d / "thesis.txt").write_text("irreplaceable")
    return "mine"


def _file(ws: Path) -> str:
    (ws / "a_file").write_text("x")
    return "a_file"


#: (id, argv after --model llava-tiny (a callable gets the workspace and returns the --out value), exit, fragment)
EXPORT_CASES = [
    ("empty-out", ["--out", ""], 2, "--out is empty"),
    ("out-cwd", ["--out", "."], 2, "working directory"),
    ("out-root", ["--out", "/", "--overwrite"], 2, "root, home or working directory"),
    ("out-home", ["--out", str(Path.home()), "--overwrite"], 2, "root, home or working directory"),
    ("out-parent", ["--out", "..", "--overwrite"], 2, "root, home or working directory"),
    ("out-is-file", ["--out", _file], 2, "exists and is not a directory"),
    ("out-exists", ["--out", _user_dir], 2, "already exists; pass --overwrite"),
    ("overwrite-user-dir", ["--out", _user_dir, "--overwrite"], 2, "is not a vlmx export"),
    ("checkpoint-file", ["--out", "o", "--checkpoint", _file], 2, "is a file; pass the checkpoint directory"),
    ("checkpoint-missing", ["--out", "o", "--checkpoint", "nope"], 2, "does not exist"),
    ("precision", ["--out", "o", "--precision", "int4"], 2, "--precision int4 is not known"),
    ("keep-nan", ["--out", "o", "--keep", "nan"], 2, "outside (0, 1]"),
    ("opset", ["--out", "o", "--opset", "99"], 2, "--opset 99 is not supported"),
    ("engine-args-alone", ["--out", "o", "--plugin-lib", "x.so"], 2, "only apply with --build-engines"),
    ("engine-backend", ["--out", "o", "--build-engines", "--engine-backend", "trt9"], 2, "is not known"),
]
RTX_CASES = [
    ("rtx-w8a8", ["--out", "o", "--precision", "w8a8"], 2, "cannot build --precision w8a8"),
    ("rtx-sm90", ["--out", "o", "--target", "trt-sm90"], 2, "cannot target sm_90"),
    ("rtx-plugins-only", ["--out", "o", "--plugins-only"], 2, "cannot build --plugins-only"),
]


def _resolve(ws: Path, argv: list) -> list[str]:
    return [a(ws) if callable(a) else a for a in argv]


@pytest.mark.parametrize("case", EXPORT_CASES + [
    pytest.param(c, marks=pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not importable")) for c in RTX_CASES
], ids=lambda c: c[0])
def test_vlm_export_refuses_before_any_work(tmp_path, case):
    name, argv, code, fragment = case
    ws = tmp_path / "ws"
    ws.mkdir()
    argv = _resolve(ws, argv)
    if name.startswith("rtx-"):
        argv += ["--build-engines", "--engine-backend", "tensorrt-rtx"]
    before = snapshot(ws)
    t0 = time.perf_counter()
    rc, out, err = run_cli("vlm-export", ["--model", "llava-tiny", "--quiet", *argv], ws)
    print(f"{name}: exit {rc} in {time.perf_counter() - t0:.1f} s: {err.strip()}")
    assert rc == code
    assert_one_clear_error("vlm-export", out, err, fragment)
    assert snapshot(ws) == before
    if "mine" in before:
        assert (ws / "mine" / "thesis.txt").read_text() == "irreplaceable"


def test_cheap_errors_come_before_torch(tmp_path):
    """An argument error never imports torch (the check runs in a fresh interpreter)."""
    code = ("import sys; from vlmx.apps.export_cli import main; rc = main(['--model', 'llava-tiny', '--out', 'o', "
            "'--precision', 'int4']); assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    code = "import sys; from vlmx.trt_runtime import run_cli; run_cli.build_parser(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


# ------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vlmx.torch_ref import models

    d = tmp_path_factory.mktemp("ckpt") / "llava-tiny"
    models.save_checkpoint(models.build_model("llava-tiny", seed=1), d)
    return d


def _bert(d: Path):
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))


def _truncated(d: Path):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _wrong_shape(d: Path):
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if k.endswith("embed_tokens.weight"))
    sd[key] = torch.zeros(7, 7)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, fragment", [(_bert, "model_type 'bert', not 'llava'"),
                                            (_truncated, "is truncated or corrupt"),
                                            (_wrong_shape, "embed_tokens.weight has shape [7, 7]")],
                         ids=["bert-config", "truncated-safetensors", "wrong-tensor-shape"])
def test_bad_checkpoints_are_named(checkpoint, tmp_path, capsys, edit, fragment):
    from vlmx.apps.export_cli import main

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    edit(ck)
    ws = tmp_path / "ws"
    ws.mkdir()
    assert main(["--model", "llava-tiny", "--checkpoint", str(ck), "--out", str(ws / "o"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert_one_clear_error("vlm-export", captured.out, captured.err, fragment)
    assert snapshot(ws) == {}


# ------------------------------------------------------------------------------- data safety
def test_failed_export_leaves_no_parents_and_no_temp(tmp_path, capsys, monkeypatch):
    from vlmx.apps.export_cli import main
    from vlmx.export import driver

    def broken(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(driver, "export_graph", broken)
    assert main(["--model", "llava-tiny", "--out", str(tmp_path / "p1" / "p2" / "out"), "--quiet"]) == 1
    assert "simulated failure" in capsys.readouterr().err
    assert snapshot(tmp_path) == {}


def test_second_writer_fails_clearly(tmp_path, capsys):
    from vlmx.apps.export_cli import main
    from vlmx.torch_ref.outdir import atomic_output

    with atomic_output(tmp_path / "out"):  # another writer holds --out
        assert main(["--model", "llava-tiny", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert_one_clear_error("vlm-export", captured.out, captured.err, "is being written by another vlmx process")
    assert snapshot(tmp_path) == {"out": -1}  # the first writer's (empty) result, nothing of the second


def test_writer_rechecks_out_under_the_lock(tmp_path):
    """An export that appeared after the CLI's check (a writer that just finished) is not replaced silently."""
    from vlmx.export.driver import export_model
    from vlmx.export.options import ExportOptions
    from vlmx.torch_ref.outdir import OutputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "vlmx-export"}))
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        export_model(ExportOptions(model="llava-tiny", out=out))
    assert snapshot(tmp_path) == before


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    from vlmx.torch_ref.outdir import atomic_output

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"out.vlmx-tmp-{dead.pid}"
    (stale / "big").mkdir(parents=True)
    alive = tmp_path / f"out.vlmx-tmp-{os.getppid()}"  # a live process's: left alone
    alive.mkdir()
    unrelated = tmp_path / "out.tmp-backup"
    unrelated.mkdir()
    with atomic_output(tmp_path / "out") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not stale.exists() and unrelated.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "out.tmp-backup", alive.name])


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signals_clean_up_with_one_line(tmp_path, sig, code, word):
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", MODULES["vlm-export"], "--model", "llava-tiny", "--out", "sub/out",
                             "--quiet"], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((ws / "sub").glob("out.vlmx-tmp-*")):
        time.sleep(0.05)
    assert list((ws / "sub").glob("out.vlmx-tmp-*")), "the export never started"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in out + err and err.strip().count("\n") == 0 and word in err, err
    assert snapshot(ws) == {}


# ------------------------------------------------------------------------------- edited export directories
def resign(m: dict) -> dict:
    m["manifest_sha256"] = manifest_digest(m)
    return m


def _edit_unsigned(d, m):
    m["model_info"]["eos_token_id"] = 5


def _edit_layers(d, m):
    m["model_info"]["num_layers"] = 3
    resign(m)


def _edit_target(d, m):
    m["target"] = "trt-sm12"
    resign(m)


def _swap_graph(d, m):
    from vlmx.torch_ref.contract import file_record

    shutil.copy2(d / "embed.onnx", d / "prune.onnx")
    m["files"]["prune.onnx"] = file_record(d / "prune.onnx")
    resign(m)


def _failed_report(d, m):
    m["report"]["passed"] = False
    resign(m)


def _plugins_only(d, m):
    m["plugins_only"] = True
    resign(m)


def _no_weight_map(d, m):
    m["weights"] = None
    resign(m)


def _truncate_graph(d, m):
    p = d / "vision.onnx"
    p.write_bytes(p.read_bytes()[:-10])


def _not_json(d, m):
    return "{ not json"


def _big_image(ws: Path) -> str:
    from PIL import Image

    Image.new("1", (20000, 20000)).save(ws / "big.png")
    return str(ws / "big.png")


def _text_image(ws: Path) -> str:
    (ws / "fake.png").write_text("not an image")
    return str(ws / "fake.png")


PROMPT = ["--prompt", "What is this?"]
#: (id, prog, manifest edit or None, extra argv, exit, fragment)
EXPORT_DIR_CASES = [
    ("unsigned-edit", "vlm-run", _edit_unsigned, PROMPT, 2, "modified after the export"),
    ("num-layers", "vlm-run", _edit_layers, PROMPT, 2, "graph lm inputs lack ['past.2.key'"),
    ("target", "vlm-run", _edit_target, PROMPT, 2, "field target"),
    ("swapped-graph", "vlm-run", _swap_graph, PROMPT, 2, "the graph was replaced"),
    ("truncated-graph", "vlm-run", _truncate_graph, PROMPT, 2, "checksum mismatch"),
    ("not-json", "vlm-run", _not_json, PROMPT, 2, "is not valid JSON"),
    ("failed-report", "vlm-run", _failed_report, PROMPT, 2, "accuracy report FAILED"),
    ("failed-report-build", "vlm-build", _failed_report, ["--backend", "tensorrt-rtx"], 2, "accuracy report FAILED"),
    ("plugins-only-ort", "vlm-run", _plugins_only, PROMPT, 2, "was exported with --plugins-only"),
    ("plugins-only-compare", "vlm-compare", _plugins_only, [], 2, "was exported with --plugins-only"),
    ("torch-no-weight-map", "vlm-run", _no_weight_map, PROMPT + ["--backend", "torch"], 2,
     "records no map of its weights (exported by an older vlmx)"),
    ("context", "vlm-run", None, PROMPT + ["--max-new-tokens", "3000"], 2, "> the export's KV-cache length 512"),
    ("new-tokens-zero", "vlm-run", None, PROMPT + ["--max-new-tokens", "0"], 2, "must be >= 1"),
    ("long-prompt", "vlm-run", None, ["--prompt", "why " * 2500], 2, "pass at most 8000"),
    ("huge-image", "vlm-run", None, PROMPT + ["--image", _big_image], 2, "resize it first"),
    ("text-image", "vlm-run", None, PROMPT + ["--image", _text_image], 2, "is not a readable image"),
    ("keep-budget", "vlm-run", None, PROMPT + ["--keep", "100"], 2, "--keep 100"),
    ("tensorrt-no-engines", "vlm-run", None, PROMPT + ["--backend", "tensorrt"], 2, "vlm-build"),
    ("threshold-negative", "vlm-compare", None, ["--threshold", "-1"], 2, "must be a finite relative error > 0"),
    ("threshold-nan", "vlm-compare", None, ["--threshold", "nan"], 2, "must be a finite relative error > 0"),
    ("build-out-file", "vlm-build", None, ["--backend", "tensorrt-rtx", "--out", "@ws/a_file"], 2,
     "exists and is not a directory"),
    ("build-out-user-dir", "vlm-build", None, ["--backend", "tensorrt-rtx", "--out", "@ws/mine", "--overwrite"], 2,
     "is not a vlm-build engine directory"),
]


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng().random((40, 50, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _mod(prog):
    import importlib

    return importlib.import_module(MODULES[prog])


@pytest.mark.parametrize("case", EXPORT_DIR_CASES, ids=lambda c: c[0])
def test_bad_export_dirs_and_run_arguments(tiny_export, tmp_path, image, capsys, case):
    name, prog, edit, extra, code, fragment = case
    if prog == "vlm-build" and not HAS_RTX:
        pytest.skip("TensorRT-RTX is not importable")
    d = tmp_path / "export"
    shutil.copytree(tiny_export, d)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a_file").write_text("x")
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("keep me")
    if edit is not None:
        m = json.loads((d / "manifest.json").read_text())
        text = edit(d, m)
        (d / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(m))
    argv = ["--artifacts", str(d)] + [a(ws) if callable(a) else a.replace("@ws", str(ws)) for a in extra]
    if prog == "vlm-run":
        argv = (["--image", str(image)] if "--image" not in argv else []) + argv + (
            ["--max-new-tokens", "2"] if "--max-new-tokens" not in argv else [])
    before = snapshot(tmp_path)
    try:
        rc = _mod(prog).main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    print(f"{name}: exit {rc}: {captured.err.strip()[:300]}")
    assert rc == code
    assert_one_clear_error(prog, captured.out, captured.err, fragment)
    assert snapshot(tmp_path) == before
    if name == "failed-report":  # carried forward, but --force still runs it
        assert _mod(prog).main(argv + ["--force"]) == 0


def test_compare_json_is_only_json(tiny_export, tmp_path):
    rc, out, err = run_cli("vlm-compare", ["--artifacts", str(tiny_export), "--json"], tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    res = json.loads(out)
    assert res["passed"] and res["threshold"] == 1e-5 and res["graphs"]


def test_vlm_build_refuses_to_replace_engines_without_overwrite(tiny_export, tmp_path, capsys):
    from vlmx.trt_runtime import build_cli

    d = tmp_path / "export"
    shutil.copytree(tiny_export, d)
    engines = d / "engines"
    engines.mkdir()
    (engines / "engines.json").write_text(json.dumps({"format": "vlmx-engines"}))
    assert build_cli.main(["--artifacts", str(d), "--backend", "tensorrt-rtx", "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (engines / "engines.json").read_text() == json.dumps({"format": "vlmx-engines"})


def test_fast_verification_trusts_unchanged_files_and_verify_rehashes(tiny_export, tmp_path):
    from vlmx.trt_runtime.artifacts import ArtifactError, load_artifacts

    d = tmp_path / "export"
    shutil.copytree(tiny_export, d)
    path = d / "reference.npz"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only a re-hash can tell
    load_artifacts(d)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifacts(d, verify=True)

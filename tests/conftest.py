"""Shared fixtures: one tiny export per test session (llava-tiny, fp32, vlmx plugin attention, seed 3)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A complete llava-tiny export, built once per session. Tests must not modify it: copy it first."""
    from vlmx.export.cli import main as export_main

    out = tmp_path_factory.mktemp("artifacts") / "llava-tiny"
    assert export_main(["--model", "llava-tiny", "--precision", "fp32", "--out", str(out), "--quiet",
                        "--seed", "3"]) == 0
    return out

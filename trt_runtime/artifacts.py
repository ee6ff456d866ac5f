"""Open and validate an export directory (``vlm-export --out DIR``) before anything runs from it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vlmx.torch_ref.op_table import OPS

FORMAT = "vlmx-export"
FORMAT_VERSION = 1
REQUIRED_GRAPHS = ("vision", "embed", "score", "prune", "prefill", "decode")


class ArtifactError(ValueError):
    """The export directory is missing, incomplete, corrupt, or not what the caller asked for."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifacts:
    """A validated export directory: its manifest plus resolved graph paths."""

    root: Path
    manifest: dict

    @property
    def info(self) -> dict:
        return self.manifest["model_info"]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    def graph(self, name: str) -> dict:
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise ArtifactError(f"{self.root}: manifest has no graph {name!r}; it has "
                                f"{sorted(self.manifest['graphs'])}") from None

    def graph_path(self, name: str) -> Path:
        return self.root / self.graph(name)["file"]

    def input_names(self, name: str) -> list[str]:
        return [i["name"] for i in self.graph(name)["inputs"]]

    def output_names(self, name: str) -> list[str]:
        return [o["name"] for o in self.graph(name)["outputs"]]

    @property
    def reference_path(self) -> Path | None:
        ref = self.manifest.get("reference")
        return self.root / ref if ref else None


def load_artifacts(directory: str | Path, verify_checksums: bool = True) -> Artifacts:
    """Read ``manifest.json``, check its format, graphs, ops and (by default) every file's sha256.

    Raises :class:`ArtifactError` naming the problem and what to do.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"--artifacts {root} is not a directory; pass the --out directory of vlm-export")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{root} has no manifest.json; it is not a vlm-export output (re-run vlm-export)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the export is corrupt: re-run vlm-export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a {FORMAT} manifest (format={manifest.get('format')!r} if a dict)"
                            if isinstance(manifest, dict) else f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this vlmx reads {FORMAT_VERSION}); re-export with this vlmx version")
    for key in ("model", "graphs", "files", "model_info"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks the {key!r} entry; the export is corrupt: re-run vlm-export")
    missing = [g for g in REQUIRED_GRAPHS if g not in manifest["graphs"]]
    if missing:
        raise ArtifactError(f"{mpath} lacks graphs {missing}; re-run vlm-export")
    unknown_ops = sorted(set(manifest.get("ops_used", [])) - set(OPS))
    if unknown_ops:
        raise ArtifactError(f"{mpath} uses ops {unknown_ops} unknown to this vlmx (knows {sorted(OPS)})")
    art = Artifacts(root, manifest)
    for name in REQUIRED_GRAPHS:
        if not art.graph_path(name).is_file():
            raise ArtifactError(f"{art.graph_path(name)} is missing; the export is incomplete: re-run vlm-export")
    if verify_checksums:
        verify_files(art)
    return art


def verify_files(art: Artifacts) -> None:
    """Check size and sha256 of every file the manifest lists."""
    for rel, meta in art.manifest["files"].items():
        path = art.root / rel
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in manifest.json but missing; re-run vlm-export")
        if "bytes" in meta and path.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{path}: size {path.stat().st_size} != {meta['bytes']} in manifest.json "
                                "(checksum mismatch: the file was modified or truncated); re-run vlm-export")
        if sha256_file(path) != meta.get("sha256"):
            raise ArtifactError(f"{path}: sha256 does not match manifest.json (checksum mismatch: the file was "
                                "modified); re-run vlm-export")

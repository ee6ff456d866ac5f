"""Open and validate an export directory (``vlm-export --out DIR``) before anything runs from it.

All checks are the export contract's (:mod:`vlmx.torch_ref.contract`): schema and version of manifest.json, its
own digest, the declared I/O of every graph against the manifest and against the ONNX file itself, and every
file's size and digest (the recorded digest when the file's mtime is unchanged; a full re-hash with ``verify``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmx.torch_ref.contract import ArtifactError, check_export, report_failure

__all__ = ["ArtifactError", "Artifacts", "load_artifacts"]


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

    @property
    def report_failure(self) -> str | None:
        """Why the export's own accuracy report failed, or None."""
        return report_failure(self.manifest)

    def refuse_failed_report(self, force: bool = False) -> None:
        """Raise unless the export's accuracy report passed (or was not run), or ``force``."""
        why = self.report_failure
        if why and not force:
            raise ArtifactError(f"{self.root}: {why}; re-export (e.g. another --precision or checkpoint) or pass "
                                "--force to use it anyway")


def load_artifacts(directory: str | Path, verify: bool = False) -> Artifacts:
    """Check an export directory (fast by default; ``verify`` re-hashes every file) and return it.

    Raises :class:`ArtifactError` naming the problem and what to do.
    """
    root = Path(directory)
    return Artifacts(root, check_export(root, verify=verify))

"""The engine repository: ``<root>/<model>/<version>/<precision>/<target-key>/``.

Each leaf holds one artifact plus ``manifest.json``. Artifacts are written into a
staging directory on the same filesystem and renamed into place, so a reader
never sees half an artifact; loads verify the sha256 recorded in the manifest.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from workers.errors import ArtifactCorrupt, ModelNotFound
from workers.manifest import MANIFEST_NAME, Manifest, validate_model_ref, verify_artifact, version_sort_key

STAGING = ".staging"
CALIBRATION = "_calibration"  # int8 calibrations, by source sha256 + data sha256 + method


@dataclass(frozen=True)
class StoredArtifact:
    manifest: Manifest
    directory: Path


class Repository:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def artifact_dir(self, manifest: Manifest) -> Path:
        return self.root / manifest.model / manifest.version / manifest.precision / manifest.target.key()

    def new_staging_dir(self) -> Path:
        path = self.root / STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def publish(self, staging_dir: str | Path) -> StoredArtifact:
        """Check the staged artifact, then rename it into place (replacing an older build)."""
        staging = Path(staging_dir)
        manifest = Manifest.read(staging)
        verify_artifact(staging, manifest)
        final = self.artifact_dir(manifest)
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        os.rename(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return StoredArtifact(manifest, final)

    def discard(self, staging_dir: str | Path) -> None:
        shutil.rmtree(staging_dir, ignore_errors=True)

    def artifacts(self, model: str | None = None) -> list[StoredArtifact]:
        """Every published artifact (of one model), skipping staging and broken entries."""
        if not self.root.is_dir():
            return []
        found = []
        model_dirs = [self.root / model] if model else sorted(self.root.iterdir())
        for model_dir in model_dirs:
            if not model_dir.is_dir() or model_dir.name.startswith((".", "_")):
                continue
            for manifest_path in sorted(model_dir.glob(f"*/*/*/{MANIFEST_NAME}")):
                leaf = manifest_path.parent
                if any(part.startswith(".") for part in leaf.relative_to(self.root).parts):
                    continue
                try:
                    found.append(StoredArtifact(Manifest.read(leaf), leaf))
                except ArtifactCorrupt:
                    continue  # reported by `fleet models --check`; never served
        return found

    def models(self) -> dict[str, list[str]]:
        """Model name -> versions, newest last."""
        result: dict[str, set[str]] = {}
        for art in self.artifacts():
            result.setdefault(art.manifest.model, set()).add(art.manifest.version)
        return {m: sorted(v, key=version_sort_key) for m, v in sorted(result.items())}

    def resolve_version(self, model: str, version: str | None) -> str:
        validate_model_ref(model, version)
        versions = self.models().get(model)
        if not versions:
            raise ModelNotFound(f"model '{model}' is not in the repository {self.root}")
        if version is None:
            return versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model '{model}' has no version '{version}' (versions: {', '.join(versions)})")
        return version

    def check(self, model: str | None = None) -> list[str]:
        """Problems found by re-hashing every artifact (empty when all is well)."""
        problems = []
        for art in self.artifacts(model):
            try:
                verify_artifact(art.directory, art.manifest)
            except ArtifactCorrupt as exc:
                problems.append(str(exc))
        return problems

    # ---- int8 calibrations -------------------------------------------------------
    def calibration_dir(self, key: str) -> Path:
        return self.root / CALIBRATION / key

    def store_calibration(self, key: str, result) -> Path:
        """Write a calibration (ranges, Q/DQ model, TensorRT cache) atomically under its key."""
        from workers.precision import write_calibration

        staging = self.new_staging_dir()
        write_calibration(result, staging)
        final = self.calibration_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        return final

    def find_calibration(self, source_sha256: str, method: str | None = None):
        """The newest calibration of this source model (any data, the given method), or None."""
        from workers.precision import parse_calibration_key, read_calibration

        base = self.root / CALIBRATION
        if not base.is_dir():
            return None
        found = []
        for d in base.iterdir():
            try:
                src, _, m = parse_calibration_key(d.name)
            except ValueError:
                continue
            if src == source_sha256 and (method is None or m == method):
                found.append((d.stat().st_mtime, d, m))
        if not found:
            return None
        _, directory, m = max(found)
        return read_calibration(directory, m)

    def remove(self, model: str, version: str | None = None) -> None:
        validate_model_ref(model, version)
        path = self.root / model / version if version else self.root / model
        shutil.rmtree(path, ignore_errors=True)


"""Builds: which targets to build for, and building them (locally or on the fleet)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import onnxruntime as ort

from workers.build import BuildRequest, build_artifact
from workers.errors import FleetError
from workers.targets import Target

from cluster.repository import Repository, StoredArtifact


@dataclass
class BuildOutcome:
    target: Target
    artifact: StoredArtifact | None = None
    error: str | None = None
    cached: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def local_target(precision: str = "float32") -> Target:
    """What this process can build for without a fleet: ONNX Runtime on the CPU."""
    return Target("onnxruntime", ort.__version__, provider="cpu", precision=precision)


def find_cached(repo: Repository, request: BuildRequest, source_sha256: str) -> StoredArtifact | None:
    """An artifact already built from the same source, precision, target and options."""
    for art in repo.artifacts(request.model):
        m = art.manifest
        if (
            m.version == request.version
            and m.source_sha256 == source_sha256
            and m.target == request.target
            and m.max_batch == request.max_batch
            and m.build_options == dict(request.options)
        ):
            return art
    return None


def build_locally(repo: Repository, request: BuildRequest, source_sha256: str, progress=sys.stderr) -> BuildOutcome:
    t0 = time.monotonic()
    cached = find_cached(repo, request, source_sha256)
    if cached is not None:
        print(f"  {request.target.describe()}: cached ({cached.directory})", file=progress, flush=True)
        return BuildOutcome(request.target, cached, cached=True)
    staging = repo.new_staging_dir()
    try:
        build_artifact(request, staging)
        stored = repo.publish(staging)
    except FleetError as exc:
        repo.discard(staging)
        print(f"  {request.target.describe()}: FAILED: {exc.message}", file=progress, flush=True)
        return BuildOutcome(request.target, error=exc.message, seconds=time.monotonic() - t0)
    except BaseException:
        repo.discard(staging)
        raise
    seconds = time.monotonic() - t0
    print(f"  {request.target.describe()}: built in {seconds:.1f} s -> {stored.directory}", file=progress, flush=True)
    return BuildOutcome(request.target, stored, seconds=seconds)

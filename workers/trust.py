"""Trust by content: artifacts that carry code of their own load only when their sha256 is pinned.

A version-compatible TensorRT plan embeds host code (its lean runtime) that runs inside the
worker, and an artifact with native libraries (custom operators, plugins) is code outright.
Naming the model in the config is not enough: whoever can write the repository could put
other bytes under that name (with a manifest to match). The fleet config pins the exact
artifacts (``models.<m>.trusted_sha256``); the worker checks the manifest's sha256 against the
pins before it fetches a byte, and the artifact cache checks the bytes against the manifest.
"""

from __future__ import annotations

from workers.errors import IncompatibleArtifact
from workers.manifest import Manifest
from workers.messages import LoadOptions


def host_code(manifest: Manifest) -> str | None:
    """What in this artifact would run as code in the worker, or None."""
    if manifest.target.version_compatible:
        return "a version-compatible TensorRT plan, which carries host code"
    libraries = getattr(manifest, "native_libraries", None) or manifest.build_options.get("native_libraries")
    if libraries:
        return f"an artifact with native libraries ({', '.join(map(str, libraries))})"
    return None


def check_trusted(manifest: Manifest, options: LoadOptions) -> None:
    """IncompatibleArtifact unless an artifact with host code is pinned by its sha256."""
    what = host_code(manifest)
    if what is None or manifest.artifact_sha256 in options.trusted_sha256:
        return
    sha = manifest.artifact_sha256
    if options.trusted_sha256:
        raise IncompatibleArtifact(
            f"{manifest.model} version {manifest.version} ({manifest.target.key()}) is {what}, and its sha256 "
            f"{sha} is not one pinned in models.{manifest.model}.trusted_sha256 "
            f"({', '.join(p[:12] + '...' for p in options.trusted_sha256)}): refused, it may have been swapped in the "
            f"repository. If you built it, pin it: add {sha} to models.{manifest.model}.trusted_sha256")
    raise IncompatibleArtifact(
        f"{manifest.model} version {manifest.version} ({manifest.target.key()}) is {what} that would run in this "
        f"worker; it loads only when pinned by content: after checking it is the artifact you built "
        f"(`fleet models --json`), set models.{manifest.model}.trusted_sha256: [{sha}] in the fleet config")

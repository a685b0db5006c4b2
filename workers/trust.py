"""Trust by content: artifacts that carry code of their own load only when that code is pinned.

A version-compatible TensorRT plan embeds host code (its lean runtime) that runs inside the
worker, and a model's custom-op / plugin libraries are native code outright. Naming the model in
the config is not enough: whoever can write the repository could put other bytes under that
name (with a manifest to match). The fleet config pins the exact bytes
(``models.<m>.trusted_sha256``: the plan's sha256, or each library's); the worker checks the
manifest's digests against the pins before it fetches a byte, and the artifact cache checks the
bytes against the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.errors import IncompatibleArtifact
from workers.manifest import Manifest
from workers.messages import LoadOptions


def code_to_pin(manifest: Manifest) -> tuple[str, tuple[str, ...]] | None:
    """(what in this artifact would run as code in the worker, the sha256 digests that must be pinned), or None."""
    if manifest.target.version_compatible:
        return "a version-compatible TensorRT plan, which carries host code", (manifest.artifact_sha256,)
    if manifest.custom_ops:
        libraries = ", ".join(lib.describe() for lib in manifest.custom_ops)
        return f"a model with custom-op libraries ({libraries}), native code", \
            tuple(lib.sha256 for lib in manifest.custom_ops)
    return None


def is_trusted(manifest: Manifest, pins: Iterable[str]) -> bool:
    """Whether every piece of code the artifact carries is pinned (always, for an artifact without any)."""
    need = code_to_pin(manifest)
    return need is None or set(need[1]) <= set(pins)


def check_trusted(manifest: Manifest, options: LoadOptions) -> None:
    """IncompatibleArtifact unless the code an artifact carries is pinned by its sha256."""
    need = code_to_pin(manifest)
    if need is None or is_trusted(manifest, options.trusted_sha256):
        return
    what, digests = need
    missing = [d for d in digests if d not in options.trusted_sha256]
    field = f"models.{manifest.model}.trusted_sha256"
    subject = f"{manifest.model} version {manifest.version} ({manifest.target.key()})"
    if options.trusted_sha256:
        raise IncompatibleArtifact(
            f"{subject} is {what}, and sha256 {', '.join(missing)} is not pinned in {field} "
            f"({', '.join(p[:12] + '...' for p in options.trusted_sha256)}): refused, it may have been swapped in the "
            f"repository. If you built it, pin it: add {', '.join(missing)} to {field}")
    raise IncompatibleArtifact(
        f"{subject} is {what} that would run in this worker; it loads only when pinned by content: after checking "
        f"it is what you built (`fleet models --json`), set {field}: [{', '.join(missing)}] in the fleet config")

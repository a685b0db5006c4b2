"""``manifest.json``: what an artifact is, how it was built, how to check it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import ArtifactCorrupt, InvalidInput
from workers.targets import Target, parse_version
from workers.tensors import TensorSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Model names and versions become directory names: keep them boring.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def version_sort_key(version: str):
    """Numeric versions ("2" < "10") after non-numeric ones; the largest is the latest."""
    try:
        return (1, parse_version(version), version)
    except ValueError:
        return (0, (), version)


def check_name(kind: str, value: str) -> str:
    """Validate a model name or version; no path separators, no '..'."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value) or ".." in value:
        raise ValueError(
            f"{kind} {value!r} is not valid: use letters, digits, '.', '_' and '-' "
            f"(at most 128, not starting with '.' or '-', no '..')"
        )
    return value


def validate_model_ref(model: str, version: str | None = None) -> None:
    """400 for names that could escape the repository (``../../etc/passwd``)."""
    try:
        check_name("model name", model)
        if version is not None:
            check_name("model version", version)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    model: str
    version: str
    precision: str
    target: Target
    artifact_file: str  # name inside the artifact directory
    artifact_sha256: str
    source_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    footprint_bytes: int
    max_batch: int = 64
    build_time: str = ""
    build_host: str = ""
    build_options: dict = field(default_factory=dict, hash=False, compare=False)
    accuracy: dict = field(default_factory=dict, hash=False, compare=False)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_name("model name", self.model)
        check_name("model version", self.version)
        if self.precision != self.target.precision:
            raise ValueError(f"precision {self.precision!r} differs from the target's {self.target.precision!r}")
        if self.footprint_bytes < 0:
            raise ValueError("footprint_bytes must be >= 0")
        if not self.inputs or not self.outputs:
            raise ValueError("a manifest needs at least one input and one output")

    @property
    def engine_key(self) -> str:
        """What a worker's ledger calls this engine: model:version:precision:target."""
        return f"{self.model}:{self.version}:{self.precision}:{self.target.key()}"

    @property
    def simulated(self) -> bool:
        return self.target.simulated

    @property
    def batched(self) -> bool:
        """Every input and output has the batch as its first dimension (-1), and no input may be left
        out (requests with and without an optional input cannot be merged): requests can be merged."""
        return all(s.shape and s.shape[0] < 0 and not s.optional for s in self.inputs + self.outputs)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "version": self.version,
            "precision": self.precision,
            "target": self.target.to_dict(),
            "target_key": self.target.key(),
            "artifact_file": self.artifact_file,
            "artifact_sha256": self.artifact_sha256,
            "source_sha256": self.source_sha256,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "footprint_bytes": self.footprint_bytes,
            "max_batch": self.max_batch,
            "build_time": self.build_time,
            "build_host": self.build_host,
            "build_options": dict(self.build_options),
            "accuracy": dict(self.accuracy),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"manifest schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        return cls(
            model=d["model"],
            version=str(d["version"]),
            precision=d["precision"],
            target=Target.from_dict(d["target"]),
            artifact_file=d["artifact_file"],
            artifact_sha256=d["artifact_sha256"],
            source_sha256=d["source_sha256"],
            inputs=tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(s) for s in d["outputs"]),
            footprint_bytes=int(d["footprint_bytes"]),
            max_batch=int(d.get("max_batch", 64)),
            build_time=d.get("build_time", ""),
            build_host=d.get("build_host", ""),
            build_options=dict(d.get("build_options", {})),
            accuracy=dict(d.get("accuracy", {})),
        )

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactCorrupt(f"manifest {path} is invalid: {exc}") from exc


def verify_artifact(directory: str | Path, manifest: Manifest) -> Path:
    """Return the artifact's path after checking its sha256 against the manifest."""
    path = Path(directory) / manifest.artifact_file
    if not path.is_file():
        raise ArtifactCorrupt(f"artifact {path} is missing")
    actual = sha256_file(path)
    if actual != manifest.artifact_sha256:
        raise ArtifactCorrupt(
            f"artifact {path} is corrupt: sha256 {actual[:12]}... does not match the manifest's "
            f"{manifest.artifact_sha256[:12]}...; rebuild it with `fleet build`"
        )
    return path

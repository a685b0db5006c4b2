"""Building an artifact from a source ONNX model, for one target, into a directory.

Runs where the artifact will run (a TensorRT plan must be built on its target),
so it lives in ``workers``. It writes into a staging directory; publishing into
the repository (atomic rename) is the cluster's job.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from workers.engines.onnxruntime import describe_model, estimate_footprint
from workers.errors import BuildError
from workers.manifest import MANIFEST_NAME, Manifest, check_name, sha256_file
from workers.targets import Target

DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class BuildRequest:
    source_path: str
    model: str
    target: Target
    version: str = "1"
    max_batch: int = DEFAULT_MAX_BATCH
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        check_name("model name", self.model)
        check_name("model version", self.version)
        if not 1 <= self.max_batch <= 1 << 20:
            raise ValueError(f"max_batch must be between 1 and {1 << 20}, got {self.max_batch}")


def build_artifact(request: BuildRequest, out_dir: str | Path) -> Manifest:
    """Write the artifact and its manifest.json into ``out_dir``; return the manifest."""
    target = request.target
    source = Path(request.source_path)
    if not source.is_file():
        raise BuildError(f"source model {source} does not exist")
    if target.precision != "float32":
        raise BuildError(f"precision {target.precision} is not supported by this build yet; use float32")
    if target.backend == "tensorrt" and not target.simulated:
        raise BuildError(
            f"building a TensorRT plan for compute capability {target.compute_capability} needs "
            f"TensorRT on this worker; it is not installed here"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # ONNX Runtime artifacts (and simulated plans, which ONNX Runtime executes) are
    # the validated source model itself.
    artifact = out / "model.onnx"
    shutil.copyfile(source, artifact)
    try:
        inputs, outputs = describe_model(artifact)
    except Exception as exc:  # ONNX Runtime raises several unrelated types here
        raise BuildError(f"ONNX Runtime cannot load {source.name}: {exc}") from exc
    manifest = Manifest(
        model=request.model,
        version=request.version,
        precision=target.precision,
        target=target,
        artifact_file=artifact.name,
        artifact_sha256=sha256_file(artifact),
        source_sha256=sha256_file(source),
        inputs=inputs,
        outputs=outputs,
        footprint_bytes=int(request.options.get("footprint_bytes") or estimate_footprint(artifact, inputs + outputs, request.max_batch)),
        max_batch=request.max_batch,
        build_time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        build_host=socket.gethostname(),
        build_options=dict(request.options),
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest

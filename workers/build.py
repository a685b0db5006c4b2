"""Building an artifact from a source ONNX model, for one target, into a directory.

Runs where the artifact will run (a TensorRT plan must be built on its target),
so it lives in ``workers``. It writes into a staging directory; publishing into
the repository (atomic rename) is the cluster's job.

Every build is checked against the float32 source on held-out samples (the user's
``--eval-data`` or, without it, fixed random inputs); the numbers go into the
manifest and a loss over the precision's threshold fails the build unless
``accept_accuracy_loss`` is set.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import onnxruntime as ort

from workers import precision
from workers.custom_ops import ONNXRUNTIME, TENSORRT, LibraryFile, describe_library, for_backend
from workers.engines import open_engine
from workers.engines.onnxruntime import cuda_provider_available, describe_model, estimate_footprint
from workers.engines.tensorrt import OnnxParserFailed, TrtBuildOptions, build_plan, plan_footprint
from workers.errors import BuildError, FleetError
from workers.manifest import MANIFEST_NAME, Manifest, check_name, sha256_file
from workers.onnx_source import check_source
from workers.targets import Target
from workers.tensors import TensorSpec

DEFAULT_MAX_BATCH = 64
EVAL_ROWS = 32
DEFAULT_BUILD_WORKSPACE = 1 << 30  # TensorRT's builder workspace, when the fleet config sets no bound


@dataclass(frozen=True)
class BuildRequest:
    source_path: str
    model: str
    target: Target
    version: str = "1"
    max_batch: int = DEFAULT_MAX_BATCH
    options: dict = field(default_factory=dict, hash=False, compare=False)  # recorded in the manifest
    accept_accuracy_loss: bool = False
    fallback: str = "none"  # "onnxruntime": serve with ONNX Runtime if TensorRT's parser refuses the model
    custom_ops: tuple[str, ...] = ()  # paths of the custom-op / plugin libraries the model needs (like source_path)
    workspace_bytes: int | None = None  # bound on TensorRT's builder workspace (None: DEFAULT_BUILD_WORKSPACE)

    def __post_init__(self) -> None:
        check_name("model name", self.model)
        check_name("model version", self.version)
        if not 1 <= self.max_batch <= 1 << 20:
            raise ValueError(f"max_batch must be between 1 and {1 << 20}, got {self.max_batch}")
        if self.target.precision == "int8_calib":
            raise ValueError("int8_calib calibrates and then builds int8: ask for an int8 target")


RANDOM_INPUTS = "random inputs"
WEAK_VERDICT = ("judged on random inputs: a weak verdict, real inputs may differ a lot; pass --eval-data (or "
                "--calib-data for int8) with real rows")


@dataclass
class EvalData:
    """Held-out samples: feeds, labels where the user has them (for test accuracy), and what they are
    (``judged_on``: the user's --eval-data, held-out calibration rows, or random inputs)."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    judged_on: str = "--eval-data"

    @property
    def weak(self) -> bool:
        """Random inputs say little about a model whose real inputs look nothing like them."""
        return self.judged_on == RANDOM_INPUTS

    @classmethod
    def synthetic(cls, inputs: tuple[TensorSpec, ...], rows: int) -> "EvalData":
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in inputs:
            if spec.optional:
                continue  # judged with the model's default
            shape = tuple(rows if d < 0 else d for d in spec.shape)
            dtype = spec.numpy_dtype
            feeds[spec.name] = (rng.integers(0, 10, shape) if dtype.kind in "iu" else rng.standard_normal(shape)).astype(dtype)
        return cls(feeds, judged_on=RANDOM_INPUTS)


def _prepare_onnx(source: Path, target: Target, out: Path, calibration: precision.CalibrationResult | None,
                  custom_ops: tuple[str, ...] = ()) -> Path:
    """The ONNX model ONNX Runtime (or a simulated plan) will execute for this precision."""
    artifact = out / "model.onnx"
    if target.precision == "float32":
        shutil.copyfile(source, artifact)
    elif target.precision == "float16":
        precision.convert_float16(source, artifact, custom_ops)
    elif target.precision == "int8":
        if calibration is None:
            raise BuildError(
                f"int8 needs the calibration of this source model (sha256 {sha256_file(source)[:12]}...), and there is "
                f"none; run `fleet build {source.name} --name NAME --precision int8_calib --calib-data DATA` first"
            )
        artifact.write_bytes(calibration.qdq_model)
    return artifact


def _run_artifact(path: Path, target: Target, feeds: dict[str, np.ndarray], trt_api: Any,
                  libraries: tuple[LibraryFile, ...] = ()) -> dict[str, np.ndarray]:
    if target.provider == "cuda" and not cuda_provider_available():  # judged on the CPU where CUDA is missing
        target = dataclasses.replace(target, provider="cpu")
    with open_engine(path, target, intra_op_threads=1, lean=False, trt_api=trt_api, custom_ops=libraries) as engine:
        return engine.infer(feeds)


def _top1(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    for array in outputs.values():  # a label output, else the first class-score output
        if array.dtype.kind in "iu" and array.ndim == 1:
            return array
    for array in outputs.values():
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1:
            return np.argmax(array, axis=1)
    return None


def check_build_accuracy(source: Path, artifact: Path, request: BuildRequest, target: Target,
                         evaluation: EvalData, trt_api: Any = None, libraries: tuple[LibraryFile, ...] = ()) -> dict:
    """Compare the artifact with the float32 source; raise BuildError over the threshold.

    Judged on random inputs (no data was given), a float16 or int8 verdict is only advice:
    it is recorded, with a note that it is weak, and never fails the build (real data might
    pass it). A float32 artifact must equal its source on any inputs."""
    # custom ops run in both, from the same libraries: the check covers what the precision did around them
    reference = precision.run_model(source, evaluation.feeds, for_backend(libraries, ONNXRUNTIME))
    candidate = _run_artifact(artifact, target, evaluation.feeds, trt_api, libraries)
    metrics = precision.compare_outputs(reference, candidate)
    advisory = evaluation.weak and target.precision != "float32"
    try:
        verdict = precision.check_accuracy(target.precision, metrics, request.accept_accuracy_loss or advisory)
    except BuildError as exc:
        raise BuildError(f"{exc.message} (judged on {evaluation.judged_on})") from None
    if advisory and not verdict["passed"] and not request.accept_accuracy_loss:
        verdict["accepted_loss"] = False
        verdict["advisory"] = True  # over the bound on random inputs: not enough to refuse the build
    if advisory:
        verdict["note"] = WEAK_VERDICT  # float32 must equal its source on any input: random ones judge it well
    record = {k: v for k, v in metrics.items() if k != "outputs"}
    record["check"] = verdict
    record["eval_data"] = evaluation.judged_on
    if evaluation.labels is not None:
        ref_top1, cand_top1 = _top1(reference), _top1(candidate)
        if ref_top1 is not None and cand_top1 is not None:
            record["reference_accuracy"] = float(np.mean(ref_top1 == evaluation.labels))
            record["test_accuracy"] = float(np.mean(cand_top1 == evaluation.labels))
    return record


def onnx_opset(path: str | Path) -> int:
    """The ai.onnx opset an ONNX model imports (0 when it cannot be read)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return 0
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
def build_memory_bytes(request: BuildRequest) -> int:
    """Device memory a build may hold at its peak, reserved in the device's ledger before it starts: the
    engine its accuracy check opens, the reference it is compared with, and for TensorRT (simulated
    targets too, so they count as the real ones would) the builder's workspace, which the build bounds."""
    source = Path(request.source_path)
    libraries = tuple(LibraryFile(str(p), describe_library(p)) for p in request.custom_ops)
    try:
        inputs, outputs = describe_model(source, custom_ops=for_backend(libraries, ONNXRUNTIME))
        engine = estimate_footprint(source, inputs + outputs, request.max_batch)
    except Exception:  # ONNX Runtime raises several unrelated types here
        # This process's ONNX Runtime cannot open it (a newer opset, say): the build says why in its
        # own words; until then, reserve for weights and activations as large as the file itself.
        engine = 2 * source.stat().st_size
    workspace = (request.workspace_bytes or DEFAULT_BUILD_WORKSPACE) if request.target.backend == "tensorrt" else 0
    return 2 * engine + workspace


def build_artifact(
    request: BuildRequest,
    out_dir: str | Path,
    *,
    calibration: precision.CalibrationResult | None = None,
    evaluation: EvalData | None = None,
    trt_api: Any = None,
) -> Manifest:
    """Write the artifact and its manifest.json into ``out_dir``; return the manifest."""
    target = request.target
    source = Path(request.source_path)
    if not source.is_file():
        raise BuildError(f"source model {source} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    libraries = tuple(LibraryFile(str(p), describe_library(p)) for p in request.custom_ops)
    ort_libraries = for_backend(libraries, ONNXRUNTIME)
    # an ONNX model whose every node can run, or a BuildError saying what to do
    check_source(source, custom_ops=ort_libraries)
    try:
        inputs, outputs = describe_model(source, request.options.get("optional_inputs", ()), custom_ops=ort_libraries)
    except FleetError:
        raise
    except Exception as exc:  # ONNX Runtime raises several unrelated types here
        raise BuildError(f"ONNX Runtime cannot load {source.name}: {exc}") from exc
    evaluation = evaluation or EvalData.synthetic(inputs, min(EVAL_ROWS, request.max_batch))
    options = dict(request.options)
    if target.needs_tensorrt:
        artifact = out / "model.plan"
        try:
            info = build_plan(source, artifact, TrtBuildOptions(inputs=inputs, precision=target.precision, max_batch=request.max_batch,
                                                                workspace_bytes=request.workspace_bytes or DEFAULT_BUILD_WORKSPACE,
                                                                hardware_compatibility=target.hardware_compatibility,
                                                                version_compatible=target.version_compatible,
                                                                plugin_libraries=for_backend(libraries, TENSORRT),
                                                                custom_ops=ort_libraries),
                              calibration=calibration, api=trt_api)
        except OnnxParserFailed as exc:
            if request.fallback != "onnxruntime":
                raise
            # The model config asked for it: serve this model with ONNX Runtime instead.
            options.update(fallback_from=target.key(), fallback_reason=exc.message)
            provider = "cuda" if cuda_provider_available() else "cpu"
            target = Target("onnxruntime", ort.__version__, provider=provider, precision=target.precision)
            artifact = _prepare_onnx(source, target, out, calibration, ort_libraries)
            footprint = estimate_footprint(artifact, inputs + outputs, request.max_batch)
        else:
            footprint = plan_footprint(0, 1, info.plan_bytes, 0)  # the worker measures the real one on load
    else:
        artifact = _prepare_onnx(source, target, out, calibration, ort_libraries)
        footprint = estimate_footprint(artifact, inputs + outputs, request.max_batch)
    if target.executed_by_onnxruntime:  # workers whose ONNX Runtime cannot load this opset refuse it (can_run)
        target = dataclasses.replace(target, opset=onnx_opset(artifact))
    accuracy = check_build_accuracy(source, artifact, request, target, evaluation, trt_api, libraries)
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
        footprint_bytes=int(options.get("footprint_bytes") or footprint),
        max_batch=request.max_batch,
        build_time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        build_host=socket.gethostname(),
        build_options=options,
        accuracy=accuracy,
        custom_ops=tuple(f.library for f in libraries),
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest

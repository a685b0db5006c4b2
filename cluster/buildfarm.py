"""Builds: which targets to build for, and building them (locally or on the fleet).

While a fleet runs, its controller is the repository's only writer: a build on the
workers sends its artifact back as bytes (``FleetWorker.build_from_bytes``), straight to
the controller, which publishes it; a build on this machine publishes through the
controller too (``FleetRepository``). Without a fleet, ``build_locally`` writes a
``Repository`` itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import ray

from workers import precision as precision_mod
from workers.build import BuildRequest, EvalData, build_artifact
from workers.custom_ops import ONNXRUNTIME, LibraryFile, describe_library, for_backend
from workers.engines.onnxruntime import describe_model
from workers.errors import BuildError, FleetError, InvalidInput
from workers.manifest import Manifest, sha256_file
from workers.onnx_source import check_source
from workers.targets import Target, WorkerCaps

from cluster.calls import get, unwrap
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


@dataclass
class BuildInputs:
    """What precision preparation hands to every target's build."""

    precision: str  # int8_calib has become int8 here
    calibration: precision_mod.CalibrationResult | None = None
    evaluation: EvalData | None = None
    options: dict = field(default_factory=dict)  # recorded in manifests, part of the cache key


def load_eval_data(path: str | Path, inputs) -> EvalData:
    """Held-out samples from a .npz: one array per input (any key for one input), optional 'labels'."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    labels = arrays.pop("labels", None)
    names = [s.name for s in inputs]
    if len(names) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidInput(f"--eval-data {path} has no array for input(s) {missing}; it holds {sorted(arrays)}")
    feeds = {s.name: arrays[s.name].astype(s.numpy_dtype) for s in inputs}
    return EvalData(feeds, labels)


class FleetRepository:
    """The running fleet's repository, through its controller: what a build on any host needs of it."""

    def __init__(self, controller) -> None:
        self.controller = controller

    def describe(self) -> str:
        return get(self.controller.describe.remote())["repository"]

    def artifacts(self, model: str | None = None) -> list[StoredArtifact]:
        return get(self.controller.artifacts.remote(model))

    def publish(self, manifest: Manifest, data: bytes, libraries: dict[str, bytes] | None = None) -> StoredArtifact:
        return get(self.controller.publish.remote(manifest.to_dict(), data, libraries))

    def store_calibration(self, key: str, result: precision_mod.CalibrationResult) -> str:
        return get(self.controller.store_calibration.remote(key, result))

    def store_source(self, data: bytes) -> str:
        return get(self.controller.store_source.remote(data))

    def find_calibration(self, source_sha256: str, method: str | None = None) -> precision_mod.CalibrationResult | None:
        return get(self.controller.find_calibration.remote(source_sha256, method))

    def read_artifact(self, manifest: Manifest) -> bytes:
        return get(self.controller.read_artifact.remote(manifest.to_dict()))

    def store_triton_config(self, model: str, files: dict[str, bytes]) -> str:
        return get(self.controller.store_triton_config.remote(model, files))

    def triton_configs(self) -> dict[str, dict[str, bytes]]:
        return get(self.controller.triton_configs.remote())

    def remove(self, model: str, version: str) -> None:
        get(self.controller.remove.remote(model, version))


AnyRepository = Repository | FleetRepository


def library_files(paths: "tuple[str, ...] | list[str]") -> tuple[LibraryFile, ...]:
    """The custom-op libraries named for a build, described (read, not loaded)."""
    return tuple(LibraryFile(str(Path(p).resolve()), describe_library(p)) for p in paths)


def library_bytes(paths: "tuple[str, ...] | list[str]") -> dict[str, bytes]:
    """The libraries' bytes by sha256, for the controller to publish beside the artifact."""
    return {f.library.sha256: Path(f.path).read_bytes() for f in library_files(paths)}


def prepare_build(repo: AnyRepository, source: Path, precision: str, *, calib_data: str | None = None,
                  calib_method: str | None = None, eval_data: str | None = None, progress=None,
                  custom_ops: "tuple[str, ...]" = ()) -> BuildInputs:
    """Calibrate (int8_calib), find the stored calibration (int8), load held-out samples. ``custom_ops``:
    paths of the libraries the model's custom operators need (loaded here, by the user's own build)."""
    progress = progress or sys.stderr
    ort_libraries = for_backend(library_files(custom_ops), ONNXRUNTIME)
    # before anything else: a clear error for a file that is not ONNX or cannot run
    check_source(source, custom_ops=ort_libraries)
    inputs, _ = describe_model(source, custom_ops=ort_libraries)
    source_sha = sha256_file(source)
    result = BuildInputs(precision)
    if eval_data:
        result.evaluation = load_eval_data(eval_data, inputs)
        result.options["eval_data"] = sha256_file(eval_data)[:16]
    if precision == "int8_calib":
        if not calib_data:
            raise InvalidInput("--precision int8_calib needs --calib-data (a .npz, a directory of .npy, or module:function)")
        calib_method = calib_method or precision_mod.DEFAULT_CALIBRATION_METHOD
        data = precision_mod.load_calibration_data(calib_data, inputs, keep_out=not eval_data)
        kept = f", {data.heldout_rows} more kept out to judge the build on" if data.heldout is not None else ""
        print(f"calibrating {source.name} ({calib_method}) on {data.samples} samples{kept} ...", file=progress, flush=True)
        calibration = precision_mod.calibrate(source, data.batches, calib_method, ort_libraries)
        calibration = dataclasses.replace(calibration, heldout=data.heldout)
        key = precision_mod.calibration_key(source_sha, precision_mod.calibration_data_sha256(data.batches), calib_method)
        where = repo.store_calibration(key, calibration)
        print(f"  stored calibration ({len(calibration.amax)} tensor ranges) in {where}", file=progress, flush=True)
        result.precision = "int8"
    elif precision == "int8":
        found = repo.find_calibration(source_sha, calib_method)
        if found is None:
            raise BuildError(
                f"int8 needs a calibration of {source.name} (sha256 {source_sha[:12]}...) and the repository has none; "
                f"run `fleet build {source} --name NAME --precision int8_calib --calib-data DATA` first"
            )
        calibration = found
    else:
        return result
    if result.evaluation is None and calibration.heldout is not None:
        rows = len(next(iter(calibration.heldout.values())))
        result.evaluation = EvalData(calibration.heldout, judged_on=f"{rows} calibration rows kept out of the calibration")
    result.calibration = calibration
    result.options["calibration"] = hashlib.sha256(calibration.qdq_model).hexdigest()[:16] + "-" + calibration.method
    return result


def local_target(precision: str = "float32") -> Target:
    """What this process can build for without a fleet: ONNX Runtime on the CPU."""
    return Target("onnxruntime", ort.__version__, provider="cpu", precision=precision)


def _accuracy_note(manifest) -> str:
    acc = manifest.accuracy
    parts = [f"{k} {acc[k]:.4g}" for k in ("rel_l2_error", "top1_agreement", "test_accuracy") if k in acc]
    if acc.get("eval_data"):
        parts.append(f"judged on {acc['eval_data']}")
    check = acc.get("check") or {}
    note = f" ({', '.join(parts)})" if parts else ""
    if check.get("advisory"):
        note += f" [over the {check['metric']} bound {check['bound']:g} on random inputs: kept, the verdict is weak]"
    elif check.get("note"):
        note += " [a weak verdict: pass --eval-data with real rows]"
    fallback = manifest.build_options.get("fallback_from")
    note += " [served by ONNX Runtime: TensorRT's parser refused it]" if fallback else ""
    if manifest.custom_ops:
        note += f" [custom ops: {', '.join(lib.file_name for lib in manifest.custom_ops)}; loaded only with " \
                f"their sha256 in models.{manifest.model}.trusted_sha256]"
    return note


def find_cached(stored: list[StoredArtifact], request: BuildRequest, source_sha256: str) -> StoredArtifact | None:
    """An artifact already built from the same source, precision, target, options and custom-op libraries."""
    libraries = sorted(f.library.sha256 for f in library_files(request.custom_ops))
    for art in stored:
        m = art.manifest
        if (
            m.version == request.version
            and m.source_sha256 == source_sha256
            # the build records the artifact's opset in its target; the request does not know it yet
            and (dataclasses.replace(m.target, opset=request.target.opset) == request.target
                 or m.build_options.get("fallback_from") == request.target.key())
            and m.max_batch == request.max_batch
            and {k: v for k, v in m.build_options.items() if not k.startswith("fallback_")} == dict(request.options)
            and sorted(lib.sha256 for lib in m.custom_ops) == libraries
        ):
            return art
    return None


def build_locally(repo: AnyRepository, request: BuildRequest, source_sha256: str, progress=None,
                  prepared: BuildInputs | None = None) -> BuildOutcome:
    """Build on this machine (in a temporary directory), then publish: into ``repo`` itself, or through
    the running fleet's controller (``FleetRepository``). Nothing half-written ever becomes visible."""
    progress = progress or sys.stderr
    prepared = prepared or BuildInputs(request.target.precision)
    t0 = time.monotonic()
    try:
        cached = find_cached(repo.artifacts(request.model), request, source_sha256)
        if cached is not None:
            repo.store_source(Path(request.source_path).read_bytes())  # kept (once): fleet upgrade rebuilds from it
            print(f"  {request.target.describe()}: cached ({cached.location})", file=progress, flush=True)
            return BuildOutcome(request.target, cached, cached=True)
        with tempfile.TemporaryDirectory(prefix="fleet-build-") as tmp:
            manifest = build_artifact(request, tmp, calibration=prepared.calibration, evaluation=prepared.evaluation)
            data = (Path(tmp) / manifest.artifact_file).read_bytes()
        repo.store_source(Path(request.source_path).read_bytes())  # before the manifest: fleet upgrade rebuilds from it
        stored = repo.publish(manifest, data, library_bytes(request.custom_ops))
    except (FleetError, OSError) as exc:  # OSError: disk full, file too large, permissions
        message = exc.message if isinstance(exc, FleetError) else f"could not write the artifact: {exc}"
        print(f"  {request.target.describe()}: FAILED: {message}", file=progress, flush=True)
        return BuildOutcome(request.target, error=message, seconds=time.monotonic() - t0)
    seconds = time.monotonic() - t0
    print(f"  {request.target.describe()}: built in {seconds:.1f} s{_accuracy_note(stored.manifest)} -> {stored.location}",
          file=progress, flush=True)
    return BuildOutcome(request.target, stored, seconds=seconds)


# ---- the build farm: one artifact per distinct target, built where it runs ----------

@dataclass(frozen=True)
class PlannedBuild:
    target: Target
    worker_id: str


@dataclass(frozen=True)
class SkippedTarget:
    what: str
    reason: str


def preferred_target(caps: WorkerCaps, precision: str) -> Target:
    """The best artifact a worker can build for itself: TensorRT, else ORT CUDA, else ORT CPU."""
    device = caps.device
    by_backend = {(r.backend, r.provider): r for r in caps.runtimes}
    trt = next((r for r in caps.runtimes if r.backend == "tensorrt" and not r.lean), None)
    if trt is not None and device.compute_capability:
        return Target("tensorrt", trt.version, device.compute_capability, provider="tensorrt",
                      precision=precision, simulated=trt.simulated)
    cuda = by_backend.get(("onnxruntime", "cuda"))
    if cuda is not None:
        return Target("onnxruntime", cuda.version, provider="cuda", precision=precision)
    cpu = by_backend[("onnxruntime", "cpu")]
    return Target("onnxruntime", cpu.version, provider="cpu", precision=precision)


def _matches(selector: str, caps: WorkerCaps) -> bool:
    device = caps.device
    if selector.lower() == "cpu":
        return not device.is_gpu
    if device.compute_capability and selector == device.compute_capability:
        return True
    words = device.name.upper().replace("-", " ").split()
    return selector.upper() in words or selector.upper() == device.name.upper()


def plan_builds(workers: list[WorkerCaps], targets: str, precision: str) -> tuple[list[PlannedBuild], list[SkippedTarget]]:
    """Which targets to build, each on a worker that has it.

    ``targets``: ``auto`` (every distinct target in the fleet) or a comma-separated list
    of compute capabilities ("7.5"), GPU model names ("T4", "V100") or ``cpu``.
    """
    explicit = targets.strip().lower() != "auto"
    selectors = [s.strip() for s in targets.split(",") if s.strip()] if explicit else []
    if explicit and not selectors:
        raise InvalidInput("--targets is empty; use auto or e.g. 7.5,T4,cpu")
    chosen: dict[str, PlannedBuild] = {}
    skipped: list[SkippedTarget] = []
    for selector in selectors or ["auto"]:
        matched = [w for w in workers if selector == "auto" or _matches(selector, w)]
        if not matched:
            names = sorted({f"{w.device.name} ({w.device.compute_capability or 'cpu'})" for w in workers})
            skipped.append(SkippedTarget(selector, f"no worker in the fleet matches it; the fleet has {', '.join(names)}"))
            continue
        for caps in matched:
            if selector.lower() == "cpu":
                target = Target("onnxruntime", next(r.version for r in caps.runtimes if r.backend == "onnxruntime"), precision=precision)
            else:
                target = preferred_target(caps, precision)
            if precision == "float16" and caps.device.is_gpu and not caps.device.has_fast_fp16 and not explicit:
                skipped.append(SkippedTarget(
                    f"{caps.device.name} ({caps.device.compute_capability})",
                    f"{caps.device.describe()} has no fast FP16; name it in --targets to build float16 anyway",
                ))
                continue
            chosen.setdefault(target.key(), PlannedBuild(target, caps.worker_id))
    unique_skips = list({(s.what, s.reason): s for s in skipped}.values())
    return list(chosen.values()), unique_skips


def build_on_fleet(
    controller,
    source: Path,
    *,
    model: str,
    version: str = "1",
    targets: str = "auto",
    precision: str = "float32",
    max_batch: int = 64,
    options: dict | None = None,
    progress=None,
    prepared: BuildInputs | None = None,
    accept_accuracy_loss: bool = False,
    fallback: str = "none",
    custom_ops: "tuple[str, ...]" = (),
) -> list[BuildOutcome]:
    """Build on the workers in parallel; each sends its artifact to the controller, which publishes it
    (with the custom-op libraries at the paths ``custom_ops``, sent to both as bytes). Reports every target."""
    progress = progress or sys.stderr
    prepared = prepared or BuildInputs(precision)
    precision = prepared.precision
    options = {**(options or {}), **prepared.options}

    inventory = get(controller.inventory.remote())
    handles = inventory.handles
    planned, skipped = plan_builds([w.info.caps for w in inventory.live_workers()], targets, precision)
    source_sha = sha256_file(source)
    say = lambda msg: print(msg, file=progress, flush=True)  # noqa: E731
    say(f"building {model} v{version} ({precision}) from {source.name} for {len(planned)} target(s):")
    for s in skipped:
        say(f"  {s.what}: skipped: {s.reason}")
    outcomes: list[BuildOutcome] = []
    pending = {}
    source_ref = ray.put(source.read_bytes())
    libraries = {Path(p).name: Path(p).read_bytes() for p in custom_ops}
    libraries_ref = ray.put(libraries) if planned and libraries else None
    by_sha = ray.put(library_bytes(custom_ops)) if planned and libraries else None
    stored_now = get(controller.artifacts.remote(model)) if planned else []
    get(controller.store_source.remote(source_ref))  # kept (once) before any manifest: fleet upgrade rebuilds from it
    for plan in planned:
        # the source travels as bytes; its name is only a name on the worker
        request = BuildRequest(source.name, model, plan.target, version=version, max_batch=max_batch, options=dict(options),
                               accept_accuracy_loss=accept_accuracy_loss, fallback=fallback, custom_ops=tuple(custom_ops))
        cached = find_cached(stored_now, request, source_sha)
        if cached is not None:
            say(f"  {plan.target.describe()}: cached ({cached.location})")
            outcomes.append(BuildOutcome(plan.target, cached, cached=True))
            continue
        manifest_ref, data_ref = handles[plan.worker_id].build_from_bytes.options(num_returns=2).remote(
            source_ref, request, prepared.calibration, prepared.evaluation, libraries_ref)
        pending[manifest_ref] = (plan, data_ref, time.monotonic())
        say(f"  {plan.target.describe()}: building on {plan.worker_id} ...")
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        plan, data_ref, t0 = pending.pop(done[0])
        try:
            # the bytes go from the worker to the controller; only the manifest comes here
            stored = get(controller.publish.remote(get(done[0]), data_ref, by_sha))
        except Exception as exc:  # one failing target never stops the others
            cause = unwrap(exc)
            message = cause.message if isinstance(cause, FleetError) else f"{type(cause).__name__}: {cause}"
            say(f"  {plan.target.describe()}: FAILED on {plan.worker_id}: {message}")
            outcomes.append(BuildOutcome(plan.target, error=message, seconds=time.monotonic() - t0))
            continue
        seconds = time.monotonic() - t0
        say(f"  {plan.target.describe()}: built on {plan.worker_id} in {seconds:.1f} s{_accuracy_note(stored.manifest)}")
        outcomes.append(BuildOutcome(plan.target, stored, seconds=seconds))
    outcomes += [BuildOutcome(Target("onnxruntime", "0"), error=f"{s.what}: {s.reason}") for s in skipped]
    get(controller.rescan.remote())
    built = sum(1 for o in outcomes if o.ok and not o.cached)
    cached_n = sum(1 for o in outcomes if o.cached)
    failed = sum(1 for o in outcomes if not o.ok)
    say(f"done: {built} built, {cached_n} cached, {failed} failed or skipped")
    return outcomes

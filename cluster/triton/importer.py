"""``fleet import-triton``: a Triton model repository into the fleet's repository, as it is.

For each model directory (``cluster.triton.source``), its ``config.pbtxt`` is read with
Triton's own message (``cluster.triton.mapping``), then:

- an ONNX model (``onnxruntime_onnx``) is checked against its configuration, edited where
  the configuration reshapes its inputs or outputs (``cluster.triton.reshape``), and built
  for the fleet's targets as ``fleet build`` does (on the workers of a running fleet, else
  for this machine's CPU);
- plan files (``tensorrt_plan``) are published as they are, one artifact per compute
  capability of ``cc_model_filenames`` (and ``default_model_filename``), with the TensorRT
  version the parameters state, so ``can_run`` routes each only to GPUs that can run it; a
  "plan" that is an ONNX model is what a simulated fleet executes in its place;
- the configuration itself is stored as imported (``_triton/<model>/``): the controller
  serves the model with it and its config endpoint shows it.

A model the fleet cannot serve as configured is skipped with one message naming every
reason; the others are imported. Versions the version policy no longer selects, imported
before, are removed. With a running fleet, each imported version is then loaded (its
warm-up requests run first), as Triton loads its models at start.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from workers.build import BuildRequest
from workers.engines.onnxruntime import describe_model, estimate_footprint
from workers.engines.tensorrt import plan_footprint
from workers.errors import FleetError, ImportRefused, InvalidInput
from workers.manifest import Manifest, sha256_file
from workers.targets import Target

from cluster.buildfarm import AnyRepository, build_locally, build_on_fleet, local_target
from cluster.calls import get
from cluster.repository import TRITON_CONFIG
from cluster.triton.mapping import (
    ONNX, WARMUP_DIR, DEFAULT_FILES, ModelImport, complete, plan_files, read_model, refuse, served_specs,
    tensor_problems, tensorrt_version, warmup_problems,
)
from cluster.triton.reshape import edited_source, is_onnx
from cluster.triton.source import ModelDir, TritonRepository

IMPORTED = {"imported_from": "triton"}  # in every imported artifact's build options


@dataclass
class ImportReport:
    source: str
    imported: dict[str, list[str]] = field(default_factory=dict)  # model -> versions
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why, in one message
    notes: dict[str, list[str]] = field(default_factory=dict)  # model -> what is reported and not obeyed
    loaded: dict[str, str] = field(default_factory=dict)  # model -> where it loaded, or why not

    @property
    def ok(self) -> bool:
        return not self.skipped


class Importer:
    def __init__(self, source: TritonRepository, repo: AnyRepository, *, controller=None, targets: str = "auto",
                 progress=None) -> None:
        """``controller``: the running fleet's (ONNX models build on its workers and the imported
        models are loaded); None: build for this machine's CPU into ``repo``."""
        self.source = source
        self.repo = repo
        self.controller = controller
        self.targets = targets
        self.progress = progress or sys.stderr
        self.report = ImportReport(source.describe())

    def say(self, message: str) -> None:
        print(message, file=self.progress, flush=True)

    def run(self) -> ImportReport:
        models = self.source.models()
        self.say(f"importing the Triton model repository {self.source.describe()} ({len(models)} model(s)) into "
                 f"{self.repo.describe()}")
        for model in models:
            try:
                self._import(model)
            except ImportRefused as exc:
                self.report.skipped[model.name] = exc.message
                self.say(f"SKIPPED: {exc.message}")
        if self.controller is not None:
            get(self.controller.rescan.remote())
            self._load()
        self._summary()
        return self.report

    def _import(self, model: ModelDir) -> None:
        plan = read_model(model.name, model.config_text, model.versions)
        warmup = self.source.warmup_files(model)
        self.say(f"{plan.name}: {plan.config.platform or plan.config.backend or plan.kind}, version(s) "
                 f"{', '.join(plan.versions)} of {', '.join(sorted(model.versions, key=int)) or 'none'}")
        done, served, problems = [], None, []
        with tempfile.TemporaryDirectory(prefix="fleet-triton-") as tmp:
            for version in plan.versions:
                work = Path(tmp) / version
                work.mkdir()
                try:
                    io = (self._onnx_version if plan.kind == ONNX else self._plan_version)(plan, model, version, work, warmup)
                except ImportRefused as exc:
                    problems.append(f"version {version}: {exc.message}")
                    self.say(f"{plan.name}: version {version} skipped: {exc.message}")
                    continue
                served = served or io
                done.append(version)
        if not done:
            raise refuse(plan.name, problems or ["nothing to import"])
        config = complete(plan.config, *served)
        files = {TRITON_CONFIG: text_format.MessageToString(config).encode()}
        files.update({f"{WARMUP_DIR}/{name}": data for name, data in warmup.items()})
        self.repo.store_triton_config(plan.name, files)
        self._remove_unselected(plan.name, done)
        self.report.imported[plan.name] = done
        notes = plan.notes + problems
        if notes:
            self.report.notes[plan.name] = notes
            self.say(f"{plan.name}: not obeyed or not imported: {'; '.join(notes)}")

    def _checked_io(self, plan: ModelImport, path: Path):
        """The model's own inputs and outputs, checked against the configuration (ImportRefused naming each difference)."""
        optional = [t.name for t in plan.config.input if t.optional]
        try:
            inputs, outputs = describe_model(path, optional)
        except InvalidInput as exc:
            raise refuse(plan.name, [exc.message]) from None
        except Exception as exc:  # ONNX Runtime cannot load it
            raise refuse(plan.name, [f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}"]) from None
        problems = tensor_problems(plan.config, inputs, outputs)
        if problems:
            raise refuse(plan.name, ["its configuration does not match the model: " + "; ".join(problems)])
        return inputs, outputs

    def _onnx_version(self, plan: ModelImport, model: ModelDir, version: str, work: Path, warmup: dict[str, bytes]):
        filename = plan.config.default_model_filename or DEFAULT_FILES[ONNX]
        if filename not in model.versions[version]:
            raise refuse(plan.name, [f"{version}/{filename} is not there"])
        source = work / "model.onnx"
        source.write_bytes(self.source.read(model, version, filename))
        self._checked_io(plan, source)
        edited = edited_source(source.read_bytes(), plan.config)
        if edited is not None:  # reshapes, or outputs the configuration leaves out
            source.write_bytes(edited)
        optional = [t.name for t in plan.config.input if t.optional]
        served = describe_model(source, optional)
        problems = warmup_problems(plan.config, warmup, served[0])
        if problems:
            raise refuse(plan.name, problems)
        options = {**IMPORTED, **({"optional_inputs": optional} if optional else {})}
        max_batch = plan.config.max_batch_size or 1
        if self.controller is not None:
            outcomes = build_on_fleet(self.controller, source, model=plan.name, version=version, targets=self.targets,
                                      precision=plan.precision, max_batch=max_batch, options=options, progress=self.progress)
            if not any(o.ok for o in outcomes):
                raise refuse(plan.name, [f"no target could be built: {'; '.join(o.error or '' for o in outcomes)}"])
        else:
            request = BuildRequest(str(source), plan.name, local_target(plan.precision), version=version,
                                   max_batch=max_batch, options=options)
            self.say(f"  building {plan.name} v{version} ({plan.precision}) on this machine:")
            outcome = build_locally(self.repo, request, sha256_file(source), progress=self.progress)
            if not outcome.ok:
                raise refuse(plan.name, [f"the build failed: {outcome.error}"])
        return served

    def _plan_version(self, plan: ModelImport, model: ModelDir, version: str, work: Path, warmup: dict[str, bytes]):
        chosen, problems = plan_files(plan.config, model.versions[version])
        served = None
        for cc, filename in chosen.items():
            try:
                trt = tensorrt_version(plan.config, cc)
            except ValueError as exc:
                problems.append(f"{filename}: {exc}")
                continue
            if trt is None:
                problems.append(f"{filename} ({cc}): no TensorRT version stated (parameters {{ key: \"tensorrt_version\" "
                                f"value {{ string_value: \"10.16.1\" }} }}, or \"tensorrt_version:{cc}\" for this file alone)")
                continue
            data = self.source.read(model, version, filename)
            path = work / f"{cc}.plan"
            path.write_bytes(data)
            simulated = is_onnx(data)
            if simulated:
                io = self._checked_io(plan, path)
            elif not plan.config.input or not plan.config.output:
                raise refuse(plan.name, [f"{filename} is a TensorRT plan: declare its inputs and outputs in {TRITON_CONFIG}"])
            else:
                io = served_specs(plan.config)
            bad_warmup = warmup_problems(plan.config, warmup, io[0])
            if bad_warmup:
                raise refuse(plan.name, bad_warmup)
            manifest = plan_manifest(plan, version, Target("tensorrt", trt, cc, provider="tensorrt", simulated=simulated),
                                     path, io, filename)
            stored = self.repo.publish(manifest, data)
            kind = ": an ONNX model standing in for a plan" if simulated else ""
            self.say(f"  {filename} -> {manifest.target.describe()}{kind} -> {stored.location}")
            served = served or io
        if served is None:
            raise refuse(plan.name, problems or ["no plan file"])
        if problems:
            self.say(f"  {plan.name} v{version}: " + "; ".join(problems))
        return served

    def _remove_unselected(self, model: str, versions: list[str]) -> None:
        """Versions imported before that the version policy no longer selects."""
        old = {a.manifest.version for a in self.repo.artifacts(model)
               if a.manifest.build_options.get("imported_from") == IMPORTED["imported_from"]}
        for version in sorted(old - set(versions)):
            self.repo.remove(model, version)
            self.say(f"{model}: version {version} removed (its version policy no longer selects it)")

    def _load(self) -> None:
        """Load every imported version (warm-up first), as Triton does at start."""
        for model, versions in self.report.imported.items():
            for version in versions:
                try:
                    placement = get(self.controller.ensure_loaded.remote(model, version, explicit=True))
                    where = ", ".join(sorted(placement.engines))
                    self.report.loaded[f"{model}:{version}"] = where
                    self.say(f"{model} v{version}: READY on {where}")
                except FleetError as exc:
                    self.report.loaded[f"{model}:{version}"] = f"not loaded: {exc.message}"
                    self.say(f"{model} v{version}: not loaded: {exc.message}")

    def _summary(self) -> None:
        r = self.report
        versions = sum(len(v) for v in r.imported.values())
        self.say(f"imported {len(r.imported)} model(s), {versions} version(s); skipped {len(r.skipped)}"
                 + (f": {', '.join(sorted(r.skipped))}" if r.skipped else ""))


def plan_manifest(plan: ModelImport, version: str, target: Target, path: Path, io, filename: str) -> Manifest:
    """The manifest of a plan file imported as it is (its own source: nothing was built from anything)."""
    inputs, outputs = io
    max_batch = plan.config.max_batch_size or 1
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    footprint = (estimate_footprint(path, inputs + outputs, max_batch) if target.simulated
                 else plan_footprint(0, 1, path.stat().st_size, 0))  # a worker measures a real one on load
    return Manifest(plan.name, version, "float32", target, "model.plan", sha, sha, inputs, outputs, footprint, max_batch,
                    build_time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    build_host=socket.gethostname(), build_options={**IMPORTED, "file": filename})


def import_repository(source: str | Path, repo: AnyRepository, *, controller=None, targets: str = "auto",
                      progress=None) -> ImportReport:
    return Importer(TritonRepository(source), repo, controller=controller, targets=targets, progress=progress).run()

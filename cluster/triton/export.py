"""``fleet export-triton DST --target 7.5``: the fleet's models as a plain Triton model repository.

For teams that keep a Triton somewhere. For each model and version in the fleet's repository:
- its TensorRT plans for the chosen compute capabilities, as ``model_<cc>.plan`` with
  ``cc_model_filenames`` and the TensorRT version of each (``tensorrt_version:<cc>``), and
  no ``default_model_filename``: a Triton on another GPU fails loudly instead of running a
  plan built for someone else;
- else its ONNX Runtime artifact (ONNX runs on any GPU) as ``model.onnx`` (``onnxruntime_onnx``).
The configuration is the one imported (dynamic batching, instances, warm-up, parameters,
version policy kept), else the one the fleet's config endpoint shows; inputs and outputs
are the artifact's own (a reshape done at import is in the model now). A model with nothing
for the targets is reported and left out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from workers.kserve.model_config import DATATYPE_TO_TRITON, model_config, read_config
from workers.kserve.proto import model_config_pb2 as mc
from workers.manifest import Manifest, version_sort_key
from workers.messages import LoadOptions
from workers.storage import Store
from workers.targets import parse_version

from cluster.buildfarm import AnyRepository
from cluster.repository import TRITON_CONFIG
from cluster.triton.mapping import COMPUTE_CAPABILITY, TRT_VERSION, WARMUP_DIR
from cluster.triton.source import source_spec

FLEET_PARAMETERS = ("fleet_precision", "fleet_targets")


@dataclass
class ExportReport:
    destination: str
    exported: dict[str, list[str]] = field(default_factory=dict)  # model -> versions
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why


def parse_targets(text: str | None) -> set[str] | None:
    """``7.5,6.1`` / ``cpu`` -> the compute capabilities (and "cpu") to export; None: every target built."""
    if not text or text.strip().lower() == "all":
        return None
    return {t.strip().lower() if t.strip().lower() == "cpu" else t.strip() for t in text.split(",") if t.strip()}


def _chosen(manifests: list[Manifest], targets: set[str] | None) -> tuple[str, dict[str, Manifest]]:
    """("plan", compute capability -> plan) or ("onnx", {"": the ONNX Runtime artifact}) of one version."""
    plans: dict[str, Manifest] = {}
    for m in manifests:
        cc = m.target.compute_capability
        if m.target.backend == "tensorrt" and (targets is None or cc in targets):
            best = plans.get(cc)
            if best is None or parse_version(m.target.backend_version) > parse_version(best.target.backend_version):
                plans[cc] = m  # the newest TensorRT of that capability
    if plans:
        return "plan", plans
    onnx = [m for m in manifests if m.target.backend == "onnxruntime"]
    onnx.sort(key=lambda m: (m.precision != "float32", m.target.provider != "cpu"))
    return ("onnx", {"": onnx[0]}) if onnx else ("", {})


def _io(config: mc.ModelConfig, manifest: Manifest) -> None:
    """The artifact's own inputs and outputs, in Triton's terms."""
    lead = 1 if config.max_batch_size > 0 else 0
    del config.input[:]
    del config.output[:]
    for s in manifest.inputs:
        config.input.add(name=s.name, data_type=DATATYPE_TO_TRITON[s.datatype], dims=s.shape[lead:], optional=s.optional)
    for s in manifest.outputs:
        config.output.add(name=s.name, data_type=DATATYPE_TO_TRITON[s.datatype], dims=s.shape[lead:])


def export_config(base: mc.ModelConfig, kind: str, chosen: dict[str, Manifest], imported: bool) -> mc.ModelConfig:
    config = mc.ModelConfig()
    config.CopyFrom(base)
    for key in (*FLEET_PARAMETERS, TRT_VERSION, COMPUTE_CAPABILITY, *[k for k in config.parameters if k.startswith(TRT_VERSION + ":")]):
        config.parameters.pop(key, None)
    config.ClearField("cc_model_filenames")
    config.ClearField("default_model_filename")
    if not imported:
        config.version_policy.all.SetInParent()  # the fleet serves every version it has
    _io(config, next(iter(chosen.values())))
    if kind == "plan":
        config.platform, config.backend = "tensorrt_plan", "tensorrt"
        config.ClearField("optimization")  # a plan is what it was built as
        for cc, m in sorted(chosen.items()):
            config.cc_model_filenames[cc] = plan_name(cc)
            config.parameters[f"{TRT_VERSION}:{cc}"].string_value = m.target.backend_version
    else:
        config.platform, config.backend = "onnxruntime_onnx", "onnxruntime"
    return config


def plan_name(cc: str) -> str:
    return f"model_{cc}.plan"


def _write(store: Store, key: str, data: bytes) -> None:
    if store.spec.is_local:
        store.make_dir(key.rpartition("/")[0])
    store.write_bytes(key, data)


def export_repository(repo: AnyRepository, destination: str | Path, targets: str | None,
                      options_for: Callable[[str], LoadOptions], *, slots: int = 1, progress=None) -> ExportReport:
    """Write the Triton repository; ``options_for``: how the fleet serves a model (for one it did not import)."""
    progress = progress or sys.stderr
    wanted = parse_targets(targets)
    store = Store(source_spec(destination))
    if store.spec.is_local:
        store.make_dir("")
    report = ExportReport(store.where())
    by_model: dict[str, dict[str, list[Manifest]]] = {}
    for art in repo.artifacts():
        by_model.setdefault(art.manifest.model, {}).setdefault(art.manifest.version, []).append(art.manifest)
    imported = repo.triton_configs()
    for model, versions in sorted(by_model.items()):
        picks = {v: _chosen(ms, wanted) for v, ms in versions.items()}
        picks = {v: p for v, p in picks.items() if p[0]}
        if not picks:
            built = sorted({m.target.describe() for ms in versions.values() for m in ms})
            report.skipped[model] = f"nothing built for {targets}; it has {', '.join(built)}"
            print(f"{model}: skipped: {report.skipped[model]}", file=progress, flush=True)
            continue
        latest = max(picks, key=version_sort_key)
        kind = picks[latest][0]
        picks = {v: p for v, p in picks.items() if p[0] == kind}  # one platform per model, the latest version's
        chosen = {cc: m for _, (_, by_cc) in sorted(picks.items(), key=lambda p: version_sort_key(p[0])) for cc, m in by_cc.items()}
        files = imported.get(model, {})
        base = (read_config(files[TRITON_CONFIG].decode(), model, pbtxt=True) if TRITON_CONFIG in files
                else model_config(versions[latest], options_for(model), slots=slots, gpu=kind == "plan"))
        config = export_config(base, kind, chosen, TRITON_CONFIG in files)
        store.delete_prefix(model)
        _write(store, f"{model}/{TRITON_CONFIG}", text_format.MessageToString(config).encode())
        for name, data in files.items():
            if name.startswith(WARMUP_DIR + "/"):
                _write(store, f"{model}/{name}", data)
        for version, (_, by_cc) in picks.items():
            for cc, manifest in by_cc.items():
                _write(store, f"{model}/{version}/{plan_name(cc) if kind == 'plan' else 'model.onnx'}",
                       repo.read_artifact(manifest))
        report.exported[model] = sorted(picks, key=version_sort_key)
        what = f"plans for {', '.join(sorted(chosen))}" if kind == "plan" else "ONNX"
        print(f"{model}: version(s) {', '.join(report.exported[model])} as {config.platform} ({what})",
              file=progress, flush=True)
    print(f"exported {len(report.exported)} model(s) to {report.destination}; skipped {len(report.skipped)}",
          file=progress, flush=True)
    return report

"""`fleet doctor`: per host and GPU, what is installed, what the repository's targets miss, and the
exact commands that fix it. Pure: a function of the workers' views (their probes), the config,
the manifests and the recent events; no Ray."""

from __future__ import annotations

from workers.devices import Device
from workers.manifest import Manifest, version_sort_key
from workers.targets import Runtime, WorkerCaps, can_run

from cluster.config import FleetConfig
from cluster.rollout import gpu_type


def _caps(view: dict) -> WorkerCaps:
    return WorkerCaps(view["worker_id"], Device.from_dict(view["device"]),
                      tuple(Runtime.from_dict(r) for r in view["runtimes"]))


def _installed(view: dict) -> dict:
    probe = view.get("probe") or {}
    return {"python": probe.get("python"), "environment": probe.get("environment") or [],
            "onnxruntime": probe.get("onnxruntime"), "providers": probe.get("providers") or [],
            "max_opset": probe.get("max_opset"), "cuda_run": probe.get("cuda_run"),
            "tensorrt": probe.get("tensorrt"), "tensorrt_builder": probe.get("tensorrt_builder"),
            "simulated_tensorrt": [r["version"] for r in view["runtimes"] if r["backend"] == "tensorrt" and r["simulated"]]}


def _runtime_checks(view: dict, config: FleetConfig, events: list[dict], kind: str) -> tuple[list[str], list[str]]:
    device = Device.from_dict(view["device"])
    profile = config.runtime_profiles().for_device(device)
    probe = view.get("probe") or {}
    problems, fixes = list(view.get("runtime_problems") or []), []
    wanted = profile.packages(simulated=device.simulated) if profile else ()
    host = view.get("host") or "its host"
    failed = [e for e in events if e.get("event") == "runtime-env-failed" and e.get("node") == view.get("node")]
    for e in failed[-1:]:
        problems.append(f"its environment ({', '.join(e.get('packages', []))}) could not be prepared: "
                        f"{str(e.get('reason', '')).splitlines()[-1]}")
    if profile and profile.onnxruntime and probe.get("onnxruntime") != profile.onnxruntime:
        problems.append(f"gpu_types.{kind}.onnxruntime is {profile.onnxruntime}, the worker runs ONNX Runtime "
                        f"{probe.get('onnxruntime')} ({probe.get('python')})")
    if problems and wanted:
        fixes.append(f"on {host}: `fleet runtimes --config FLEET.yaml` (pip installs {' '.join(wanted)}; fix the "
                     f"version in gpu_types.{kind} if pip finds none), then `fleet down && fleet up --config FLEET.yaml`")
    if probe.get("cuda_run") not in (None, "ok"):
        fixes.append(f"give {kind} an ONNX Runtime whose CUDA build has kernels for compute capability "
                     f"{device.compute_capability}: gpu_types.{kind}.onnxruntime: <version> (docs/runtimes.md)")
    return problems, fixes


def _missing(view: dict, manifests: list[Manifest], kind: str) -> tuple[list[str], list[str]]:
    """Per model, the newest version this worker has no artifact it can run for."""
    caps = _caps(view)
    by_model: dict[str, dict[str, list[Manifest]]] = {}
    for m in manifests:
        by_model.setdefault(m.model, {}).setdefault(m.version, []).append(m)
    missing, fixes = [], []
    for model, versions in sorted(by_model.items()):
        latest = max(versions, key=version_sort_key)
        verdicts = [can_run(m, caps) for m in versions[latest]]
        if any(verdicts):
            continue
        reasons = "; ".join(dict.fromkeys(v.reason for v in verdicts))
        missing.append(f"{model} version {latest}: no artifact it can run ({reasons})")
        if "opset" in reasons:
            fixes.append(f"{model} {latest} needs a newer ONNX Runtime on {kind}: raise gpu_types.{kind}.onnxruntime, "
                         f"or build {model} {latest} from a source with a lower opset")
        else:
            fixes.append(f"fleet build SOURCE.onnx --name {model} --version {latest} --targets {kind}")
    return missing, fixes


def diagnose(views: list[dict], config: FleetConfig, manifests: list[Manifest], events: list[dict]) -> dict:
    hosts: dict[str, dict] = {}
    total = 0
    for view in sorted(views, key=lambda v: v["worker_id"]):
        kind = gpu_type(Device.from_dict(view["device"]))
        problems, fixes = _runtime_checks(view, config, events, kind)
        missing, build_fixes = _missing(view, manifests, kind)
        total += len(problems) + len(missing)
        host = hosts.setdefault(view.get("node") or "?", {"node": view.get("node"), "host": view.get("host"), "workers": []})
        host["workers"].append({"worker_id": view["worker_id"], "gpu_type": kind, "device": view["device"]["name"],
                                "compute_capability": view["device"]["compute_capability"],
                                "simulated": view["device"]["simulated"], "installed": _installed(view),
                                "problems": problems, "missing": missing, "fixes": list(dict.fromkeys(fixes + build_fixes))})
    return {"hosts": list(hosts.values()), "problems": total}


def render(report: dict) -> str:
    lines = []
    for host in report["hosts"]:
        lines.append(f"{host['node']} ({host['host']})")
        for w in host["workers"]:
            i = w["installed"]
            sim = ", simulated" if w["simulated"] else ""
            lines.append(f"  {w['worker_id']}: {w['device']} [{w['gpu_type']}, {w['compute_capability'] or 'cpu'}{sim}]")
            trt = i["tensorrt"] or (f"{', '.join(i['simulated_tensorrt'])} (simulated)" if i["simulated_tensorrt"] else "none")
            builder = "" if i["tensorrt_builder"] is None else (" with builder" if i["tensorrt_builder"] else " (no builder)")
            lines.append(f"    installed: ONNX Runtime {i['onnxruntime']} (opsets <= {i['max_opset']}; "
                         f"{', '.join(p.replace('ExecutionProvider', '') for p in i['providers'])}), TensorRT {trt}{builder}")
            lines.append(f"    environment: {' '.join(i['environment']) or 'the fleet’s own'} ({i['python']})")
            for p in w["problems"]:
                lines.append(f"    PROBLEM: {p}")
            for m in w["missing"]:
                lines.append(f"    MISSING: {m}")
            for f in w["fixes"]:
                lines.append(f"    fix: {f}")
            if not (w["problems"] or w["missing"]):
                lines.append("    ok")
    lines.append(f"\n{report['problems']} problem(s)" if report["problems"] else "\nall workers have what the repository needs")
    return "\n".join(lines)

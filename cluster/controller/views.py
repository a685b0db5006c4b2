"""What the controller shows: the status document (``/v2/fleet/status``) and Triton's repository index.

Pure functions of the inventory, the workers' status views and the router.
"""

from __future__ import annotations

from workers.manifest import Manifest
from workers.targets import can_run
from workers.trust import is_trusted

from cluster.inventory import WorkerRecord
from cluster.router import Router


def worker_view(record: WorkerRecord, stats: dict | None, manifests: list[Manifest]) -> dict:
    info, health = record.info, record.health
    caps = info.caps
    stats = stats or {}
    runnable = sorted({f"{m.model}:{m.version}:{m.precision}" for m in manifests
                       if m.engine_key not in health.loaded and can_run(m, caps)})
    ledger = stats.get("ledger") or {}
    return {
        "worker_id": info.worker_id,
        "alive": record.alive,
        "state": record.state,
        "out_of_service": health.gpu_unhealthy or health.broken,
        "device": caps.device.to_dict(),
        "simulated": caps.device.simulated,
        "runtimes": [r.to_dict() for r in caps.runtimes],
        "probe": info.probe,  # what its runtimes really are (workers.probe), and the environment it was given
        "runtime_problems": list(info.probe.get("problems", [])),
        "budget_bytes": health.budget_bytes,
        "used_bytes": health.used_bytes,
        "ledger": ledger.get("entries", []) if record.alive else [],
        "counters": stats.get("counters", health.counters),
        "engines": stats.get("engines", {}),
        "nvml_used_bytes": stats.get("nvml_used_bytes"),
        "nvml_health_watches": stats.get("nvml_health_watches"),
        "rss_bytes": stats.get("rss_bytes"),
        "http": f"{info.http[0]}:{info.http[1]}" if info.http else None,
        "grpc": f"{info.grpc[0]}:{info.grpc[1]}" if info.grpc else None,
        "runnable_not_loaded": runnable,
    }


def nodes_view(records: tuple[WorkerRecord, ...], stats: dict[str, dict], manifests: list[Manifest]) -> list[dict]:
    nodes: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.worker_id):
        node_id = record.info.caps.node_id
        node = nodes.setdefault(node_id, {"node": node_id, "host": record.info.host, "workers": []})
        node["workers"].append(worker_view(record, stats.get(record.worker_id), manifests))
    return list(nodes.values())


def fallbacks(manifests: list[Manifest]) -> dict[str, str]:
    """Models TensorRT's parser refused, served by ONNX Runtime (``fallback: onnxruntime``)."""
    return {f"{m.model}:{m.version}:{m.precision}": m.build_options["fallback_reason"]
            for m in manifests if m.build_options.get("fallback_reason")}


ACCURACY_FIGURES = ("top1_agreement", "test_accuracy", "rel_l2_error", "max_abs_error", "exact_agreement")


def builds(manifests: list[Manifest], pins: "dict[str, tuple[str, ...]] | None" = None) -> list[dict]:
    """Every artifact's precision, its accuracy against the float32 source and the data it was judged on,
    and the custom-op libraries it needs, with whether the fleet trusts them (``pins``: each model's
    ``trusted_sha256``)."""
    pins = pins or {}
    rows = []
    for m in sorted(manifests, key=lambda m: (m.model, m.version, m.precision, m.target.key())):
        acc = m.accuracy
        figures = ", ".join(f"{k} {acc[k]:.4g}" for k in ACCURACY_FIGURES if isinstance(acc.get(k), (int, float)))
        rows.append({"model": m.model, "version": m.version, "precision": m.precision, "target": m.target.key(),
                     "accuracy": figures, "judged_on": acc.get("eval_data", ""),
                     "weak": bool((acc.get("check") or {}).get("note")),
                     "custom_ops": [lib.file_name for lib in m.custom_ops],
                     "custom_ops_trusted": is_trusted(m, pins.get(m.model, ())) if m.custom_ops else None})
    return rows


def repository_index(router: Router, unloaded: set[str]) -> list[dict]:
    """Triton's repository index: every model version with its state."""
    index = []
    for model, versions in router.models().items():
        for version in versions:
            if router.holders(model, version):
                index.append({"name": model, "version": version, "state": "READY"})
            elif model in unloaded:
                index.append({"name": model, "version": version, "state": "UNAVAILABLE", "reason": "unloaded"})
            else:
                index.append({"name": model, "version": version, "state": "UNAVAILABLE",
                              "reason": "not loaded; loads on first request"})
    return index


def _duration(count: float, us: float) -> dict:
    return {"count": int(count), "ns": int(us * 1000)}


def model_statistics(worker_stats: dict[str, dict], versions: list[tuple[str, str]]) -> dict:
    """Triton's statistics (``/v2/models/{m}/stats``, gRPC ``ModelStatistics``) of these model
    versions, summed over every worker's engines of them. ``success`` is queue plus compute time;
    the fleet does not time input and output copies apart from the run (``compute_input`` and
    ``compute_output`` are 0)."""
    totals: dict[tuple[str, str], dict] = {key: {} for key in versions}
    for view in worker_stats.values():
        for engine in (view.get("engines") or {}).values():
            total = totals.get((engine["model"], engine["version"]))
            if total is None:
                continue
            for name in ("success", "failure", "inference_count", "exec_count", "queue_us", "request_compute_us"):
                total[name] = total.get(name, 0) + engine.get(name, 0)
            total["last_inference_ms"] = max(total.get("last_inference_ms", 0), engine.get("last_inference_ms", 0))
            for size, runs in (engine.get("batch_sizes") or {}).items():
                total.setdefault("runs", {})[int(size)] = total.get("runs", {}).get(int(size), 0) + runs
                us = (engine.get("batch_compute_us") or {}).get(size, 0.0)
                total.setdefault("run_us", {})[int(size)] = total.get("run_us", {}).get(int(size), 0.0) + us
    return {"model_stats": [_model_stats(model, version, totals[(model, version)]) for model, version in versions]}


def _model_stats(model: str, version: str, t: dict) -> dict:
    success, compute = t.get("success", 0), t.get("request_compute_us", 0.0)
    zero = _duration(0, 0)
    return {
        "name": model, "version": version, "last_inference": t.get("last_inference_ms", 0),
        "inference_count": t.get("inference_count", 0), "execution_count": t.get("exec_count", 0),
        "inference_stats": {
            "success": _duration(success, t.get("queue_us", 0.0) + compute), "fail": _duration(t.get("failure", 0), 0),
            "queue": _duration(success, t.get("queue_us", 0.0)), "compute_input": _duration(success, 0),
            "compute_infer": _duration(success, compute), "compute_output": _duration(success, 0),
            "cache_hit": zero, "cache_miss": zero,
        },
        "batch_stats": [{"batch_size": size, "compute_input": _duration(runs, 0),
                         "compute_infer": _duration(runs, t["run_us"][size]), "compute_output": _duration(runs, 0)}
                        for size, runs in sorted(t.get("runs", {}).items())],
        "memory_usage": [],
        "response_stats": {},
    }

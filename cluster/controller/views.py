"""What the controller shows: the status document (``/v2/fleet/status``) and Triton's repository index.

Pure functions of the inventory, the workers' status views and the router.
"""

from __future__ import annotations

from workers.manifest import Manifest
from workers.targets import can_run

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
        "out_of_service": health.gpu_unhealthy or health.broken,
        "device": caps.device.to_dict(),
        "simulated": caps.device.simulated,
        "runtimes": [r.to_dict() for r in caps.runtimes],
        "budget_bytes": health.budget_bytes,
        "used_bytes": health.used_bytes,
        "ledger": ledger.get("entries", []) if record.alive else [],
        "counters": stats.get("counters", health.counters),
        "engines": stats.get("engines", {}),
        "nvml_used_bytes": stats.get("nvml_used_bytes"),
        "nvml_health_watches": stats.get("nvml_health_watches"),
        "rss_bytes": stats.get("rss_bytes"),
        "http": f"{info.http[0]}:{info.http[1]}" if info.http else None,
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


def builds(manifests: list[Manifest]) -> list[dict]:
    """Every artifact's precision, its accuracy against the float32 source and the data it was judged on."""
    rows = []
    for m in sorted(manifests, key=lambda m: (m.model, m.version, m.precision, m.target.key())):
        acc = m.accuracy
        figures = ", ".join(f"{k} {acc[k]:.4g}" for k in ACCURACY_FIGURES if isinstance(acc.get(k), (int, float)))
        rows.append({"model": m.model, "version": m.version, "precision": m.precision, "target": m.target.key(),
                     "accuracy": figures, "judged_on": acc.get("eval_data", ""),
                     "weak": bool((acc.get("check") or {}).get("note"))})
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

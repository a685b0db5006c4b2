"""Prometheus text exposition of the fleet's numbers, named after Triton's.

Plain Python, no Ray and no web framework: ``render_metrics`` turns the two JSON
documents the HTTP app already serves (``/v2/fleet/status`` and ``/v2/fleet/stats``)
into the body of ``GET /metrics`` (text format 0.0.4). Names follow Triton's
``nv_inference_*`` metrics with a ``fleet_`` prefix, so a Triton dashboard adapts by
changing the prefix; durations are cumulative microseconds, as in Triton.

Counters are rendered from the cumulative numbers they are given, so they only rise
while those numbers do. When several engines of one model version run on one worker
(say float32 and int8), their per-engine numbers are summed under one series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["BATCH_SIZE_BUCKETS", "CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Fixed so that a series keeps the same buckets over time (histogram_quantile needs
# that); batches larger than the last bound count only in "+Inf".
BATCH_SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Labels = tuple[tuple[str, str], ...]


# ---- text format ---------------------------------------------------------------
def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _number(value) -> float | int | None:
    """A sample value from JSON, or None when it is missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _Family:
    """One metric family: HELP, TYPE, then its samples, in insertion order."""

    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: dict[tuple[str, Labels], float] = {}

    def add(self, value, suffix: str = "", **labels: str) -> None:
        """Add ``value`` to the sample (summing repeats); None values are skipped."""
        value = _number(value)
        if value is None:
            return
        key = (suffix, tuple((k, "" if v is None else str(v)) for k, v in labels.items()))
        self.samples[key] = self.samples.get(key, 0) + value

    def set(self, value, suffix: str = "", **labels: str) -> None:
        value = _number(value)
        if value is None:
            return
        self.samples[(suffix, tuple((k, "" if v is None else str(v)) for k, v in labels.items()))] = value

    def render(self) -> Iterable[str]:
        if not self.samples:
            return
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        for (suffix, labels), value in self.samples.items():
            text = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels)
            yield f"{self.name}{suffix}{{{text}}} {_format_value(value)}" if text else \
                f"{self.name}{suffix} {_format_value(value)}"


class _Registry:
    def __init__(self):
        self.families: dict[str, _Family] = {}

    def family(self, name: str, kind: str, help_text: str) -> _Family:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = _Family(name, kind, help_text)
        return fam

    def render(self) -> str:
        lines = [line for fam in self.families.values() for line in fam.render()]
        return "\n".join(lines) + "\n" if lines else ""


# ---- the fleet's metrics -------------------------------------------------------
def render_metrics(status: Mapping, stats: Mapping) -> str:
    """Prometheus text for the fleet.

    ``status`` is the ``/v2/fleet/status`` document (nodes, workers, devices,
    ledgers, per-engine stats); ``stats`` is the HTTP ingress's own per-model
    request numbers (``/v2/fleet/stats``). Either may be empty.
    """
    reg = _Registry()
    # Families are declared up front so the output order is stable.
    families = _declare_families(reg)
    _add_request_stats(families, stats)
    for node in status.get("nodes") or []:
        for w in node.get("workers") or []:
            _add_worker(families, w)
    return reg.render()


def _declare_families(reg: _Registry) -> dict[str, _Family]:
    success = reg.family("fleet_nv_inference_request_success", "counter",
                         "Number of successful inference requests received by the fleet's HTTP ingress")
    failure = reg.family("fleet_nv_inference_request_failure", "counter",
                         "Number of failed inference requests received by the fleet's HTTP ingress, by error class")
    duration = reg.family("fleet_nv_inference_request_duration_us", "counter",
                          "Cumulative end-to-end inference request duration at the HTTP ingress, in microseconds")
    count = reg.family("fleet_nv_inference_count", "counter",
                       "Number of inferences (rows) performed by a worker, not counting batch merging")
    exec_count = reg.family("fleet_nv_inference_exec_count", "counter",
                            "Number of model executions (batches) performed by a worker")
    queue = reg.family("fleet_nv_inference_queue_duration_us", "counter",
                       "Cumulative time requests waited in a worker's batch queue, in microseconds")
    compute = reg.family("fleet_nv_inference_compute_infer_duration_us", "counter",
                         "Cumulative compute time of model executions on a worker, in microseconds")
    batch = reg.family("fleet_batch_size", "histogram", "Rows per model execution on a worker")
    rejected = reg.family("fleet_nv_inference_request_rejected", "counter",
                          "Requests a worker refused at once because the engine's queue was full (max_queue_size)")
    loads = reg.family("fleet_model_loads_total", "counter", "Engines loaded by a worker")
    evictions = reg.family("fleet_model_evictions_total", "counter",
                           "Idle engines evicted by a worker to make room in its budget")
    unloads = reg.family("fleet_model_unloads_total", "counter", "Engines unloaded from a worker on request")
    budget = reg.family("fleet_gpu_budget_bytes", "gauge", "Bytes of device memory the fleet may use on this device")
    ledger = reg.family("fleet_gpu_ledger_bytes", "gauge", "Sum of the footprints of the engines loaded on this device")
    total = reg.family("fleet_gpu_memory_total_bytes", "gauge", "Total memory of the device")
    used = reg.family("fleet_gpu_memory_used_bytes", "gauge", "Device memory in use as reported by NVML (real GPUs only)")
    up = reg.family("fleet_worker_up", "gauge", "1 when the worker answers its health check, else 0")
    return dict(success=success, failure=failure, duration=duration, count=count, exec_count=exec_count, queue=queue,
                compute=compute, batch=batch, rejected=rejected, loads=loads, evictions=evictions, unloads=unloads, budget=budget,
                ledger=ledger, total=total, used=used, up=up)


def _add_request_stats(f: dict[str, _Family], stats: Mapping) -> None:
    """Requests counted at the HTTP entry points (the front door's workers and the ingress)."""
    for model, m in sorted((stats.get("models") or {}).items()):
        version = str(m.get("version", ""))
        f["success"].add(m.get("success", 0), model=model, version=version)
        by_reason = m.get("failure_by_reason") or {}
        for reason, n in sorted(by_reason.items()):
            f["failure"].add(n, model=model, version=version, reason=reason)
        # Failures the ingress did not classify still count, under "Other".
        unclassified = (_number(m.get("failure")) or 0) - sum(_number(n) or 0 for n in by_reason.values())
        if unclassified > 0:
            f["failure"].add(unclassified, model=model, version=version, reason="Other")
        f["duration"].add(m.get("request_duration_us_sum"), model=model, version=version)


def _add_worker(f: dict[str, _Family], w: Mapping) -> None:
    """One worker of the status document: health, counters, device memory, per-engine numbers."""
    worker = str(w.get("worker_id", ""))
    f["up"].set(1 if w.get("alive", True) else 0, worker=worker)
    counters = w.get("counters") or {}
    f["loads"].add(counters.get("loads"), worker=worker)
    f["evictions"].add(counters.get("evictions"), worker=worker)
    f["unloads"].add(counters.get("unloads"), worker=worker)
    device = w.get("device") or {}
    dev = {
        "worker": worker,
        "device": str(device.get("name", "")),
        "uuid": str(device.get("uuid", "")),
        "simulated": "true" if w.get("simulated", device.get("simulated", False)) else "false",
    }
    f["budget"].set(w.get("budget_bytes"), **dev)
    f["ledger"].set(w.get("used_bytes"), **dev)
    f["total"].set(device.get("total_memory_bytes"), **dev)
    f["used"].set(w.get("nvml_used_bytes"), **dev)  # skipped when None (simulated or CPU)
    for key, e in sorted((w.get("engines") or {}).items()):
        parts = key.split(":")
        labels = {
            "model": str(e.get("model") or parts[0]),
            "version": str(e.get("version") or (parts[1] if len(parts) > 1 else "")),
            "worker": worker,
        }
        f["count"].add(e.get("inference_count"), **labels)
        f["exec_count"].add(e.get("exec_count"), **labels)
        f["queue"].add(e.get("queue_us"), **labels)
        f["compute"].add(e.get("compute_us"), **labels)
        f["rejected"].add(e.get("rejected", 0), **labels)
        _add_batch_histogram(f["batch"], e.get("batch_sizes") or {}, labels)


def _add_batch_histogram(fam: _Family, sizes: Mapping, labels: dict[str, str]) -> None:
    """Cumulative ``le`` buckets, ``_sum`` and ``_count`` from per-size counts."""
    counts: dict[int, float] = {}
    for size, n in sizes.items():
        try:
            size_i = int(size)
        except (TypeError, ValueError):
            continue
        n = _number(n)
        if n:
            counts[size_i] = counts.get(size_i, 0) + n
    for bound in BATCH_SIZE_BUCKETS:
        fam.add(sum(n for s, n in counts.items() if s <= bound), "_bucket", **labels, le=str(bound))
    fam.add(sum(counts.values()), "_bucket", **labels, le="+Inf")
    fam.add(sum(s * n for s, n in counts.items()), "_sum", **labels)
    fam.add(sum(counts.values()), "_count", **labels)

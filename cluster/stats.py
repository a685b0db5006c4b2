"""Request statistics of the HTTP ingress, per model, for /metrics and the status page.

Each ingress replica records its own requests (``RequestStats``) and reports the
cumulative numbers plus its recent latencies to the controller about once a second;
``merge`` adds the replicas up, so every replica answers /metrics for the whole fleet.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

WINDOW_S = 60.0
MAX_RECENT = 2000  # latencies per model and replica kept for the rate and percentiles


@dataclass
class ModelStats:
    version: str = ""
    success: int = 0
    failure: int = 0
    failure_by_reason: Counter = field(default_factory=Counter)
    request_duration_us_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=MAX_RECENT))  # (wall time, latency_s)


class RequestStats:
    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.models: dict[str, ModelStats] = {}

    def record(self, model: str, version: str | None, seconds: float, error: str | None = None) -> None:
        stats = self.models.setdefault(model, ModelStats())
        if version:
            stats.version = version
        stats.request_duration_us_sum += seconds * 1e6
        if error is None:
            stats.success += 1
            stats.recent.append((self._clock(), seconds))
        else:
            stats.failure += 1
            stats.failure_by_reason[error] += 1

    def report(self) -> dict:
        """Cumulative counters and recent latencies: what a replica sends to the controller."""
        now = self._clock()
        return {
            "started": self.started,
            "models": {
                model: {
                    "version": s.version, "success": s.success, "failure": s.failure,
                    "failure_by_reason": dict(s.failure_by_reason), "request_duration_us_sum": s.request_duration_us_sum,
                    "recent": [(t, lat) for t, lat in s.recent if now - t <= WINDOW_S],
                }
                for model, s in self.models.items()
            },
        }


def merge(reports: list[dict], now: float | None = None) -> dict:
    """The fleet's request stats from every replica's report (the shape /v2/fleet/stats serves)."""
    now = time.time() if now is None else now
    started = min((r["started"] for r in reports), default=now)
    models: dict[str, dict] = {}
    recent: dict[str, list[float]] = {}
    for report in reports:
        for model, s in report["models"].items():
            m = models.setdefault(model, {"version": "", "success": 0, "failure": 0, "failure_by_reason": Counter(),
                                          "request_duration_us_sum": 0.0})
            m["version"] = s["version"] or m["version"]
            m["success"] += s["success"]
            m["failure"] += s["failure"]
            m["failure_by_reason"].update(s["failure_by_reason"])
            m["request_duration_us_sum"] += s["request_duration_us_sum"]
            recent.setdefault(model, []).extend(lat for t, lat in s["recent"] if now - t <= WINDOW_S)
    span = min(WINDOW_S, max(now - started, 1e-9))
    for model, m in models.items():
        lat_ms = np.array(recent.get(model, [])) * 1e3
        m["failure_by_reason"] = dict(m["failure_by_reason"])
        m["rate_per_s"] = len(lat_ms) / span
        m["p50_ms"] = float(np.percentile(lat_ms, 50)) if lat_ms.size else None
        m["p99_ms"] = float(np.percentile(lat_ms, 99)) if lat_ms.size else None
    return {"uptime_s": now - started, "models": models}

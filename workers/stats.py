"""Request statistics of the HTTP ingress, per model, for /metrics and the status page.

Each ingress replica records its own requests (``RequestStats``) and reports the
cumulative numbers plus its recent latencies to the controller about once a second;
``merge`` adds the replicas up, so every replica answers /metrics for the whole fleet.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

WINDOW_S = 60.0
MAX_RECENT = 2000  # latencies per model and replica kept for the percentiles (a sample under load)


@dataclass
class ModelStats:
    version: str = ""
    success: int = 0
    failure: int = 0
    failure_by_reason: Counter = field(default_factory=Counter)
    request_duration_us_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=MAX_RECENT))  # (wall time, latency_s)
    per_second: deque = field(default_factory=deque)  # [whole second, successes] over the window: the rate


class RequestStats:
    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.models: dict[str, ModelStats] = {}
        self._lock = threading.Lock()  # recorded on an event loop, reported from another thread

    def record(self, model: str, version: str | None, seconds: float, error: str | None = None) -> None:
        with self._lock:
            self._record(model, version, seconds, error)

    def _record(self, model: str, version: str | None, seconds: float, error: str | None) -> None:
        stats = self.models.setdefault(model, ModelStats())
        if version:
            stats.version = version
        stats.request_duration_us_sum += seconds * 1e6
        if error is None:
            stats.success += 1
            now = self._clock()
            stats.recent.append((now, seconds))
            second = int(now)
            if stats.per_second and stats.per_second[-1][0] == second:
                stats.per_second[-1][1] += 1
            else:
                stats.per_second.append([second, 1])
                while now - stats.per_second[0][0] > WINDOW_S + 1:
                    stats.per_second.popleft()
        else:
            stats.failure += 1
            stats.failure_by_reason[error] += 1

    def report(self) -> dict:
        """Cumulative counters and recent latencies: what a replica sends to the controller."""
        now = self._clock()
        with self._lock:
            return self._report(now)

    def _report(self, now: float) -> dict:
        return {
            "started": self.started,
            "models": {
                model: {
                    "version": s.version, "success": s.success, "failure": s.failure,
                    "failure_by_reason": dict(s.failure_by_reason), "request_duration_us_sum": s.request_duration_us_sum,
                    "recent": [(t, lat) for t, lat in s.recent if now - t <= WINDOW_S],
                    "per_second": [(sec, n) for sec, n in s.per_second if now - sec <= WINDOW_S],
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
    in_window: Counter = Counter()
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
            in_window[model] += sum(n for sec, n in s.get("per_second", ()) if now - sec <= WINDOW_S)
    span = min(WINDOW_S, max(now - started, 1e-9))
    for model, m in models.items():
        lat_ms = np.array(recent.get(model, [])) * 1e3
        m["failure_by_reason"] = dict(m["failure_by_reason"])
        m["rate_per_s"] = max(in_window[model], len(lat_ms)) / span
        m["p50_ms"] = float(np.percentile(lat_ms, 50)) if lat_ms.size else None
        m["p99_ms"] = float(np.percentile(lat_ms, 99)) if lat_ms.size else None
    return {"uptime_s": now - started, "models": models}

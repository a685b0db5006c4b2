"""Request statistics kept by the HTTP ingress (per model), for /metrics and the status page."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

WINDOW_S = 60.0


@dataclass
class ModelStats:
    version: str = ""
    success: int = 0
    failure: int = 0
    failure_by_reason: Counter = field(default_factory=Counter)
    request_duration_us_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (time, latency_s)


class RequestStats:
    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
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

    def snapshot(self) -> dict:
        now = self._clock()
        out = {}
        for model, s in self.models.items():
            window = [lat for t, lat in s.recent if now - t <= WINDOW_S]
            span = min(WINDOW_S, max(now - self._start, 1e-9))
            lat_ms = np.array(window) * 1e3 if window else None
            out[model] = {
                "version": s.version,
                "success": s.success,
                "failure": s.failure,
                "failure_by_reason": dict(s.failure_by_reason),
                "request_duration_us_sum": s.request_duration_us_sum,
                "rate_per_s": len(window) / span,
                "p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms is not None else None,
                "p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms is not None else None,
            }
        return {"uptime_s": now - self._start, "models": out}

"""The controller's recent events (loads, evictions, workers lost and replaced), for the status view."""

from __future__ import annotations

import time
from collections import deque

KEPT = 200


class EventLog:
    def __init__(self, kept: int = KEPT) -> None:
        self._events: deque[dict] = deque(maxlen=kept)

    def add(self, kind: str, **fields) -> None:
        self._events.append({"time": time.time(), "event": kind, **fields})

    def recent(self, n: int = 50) -> list[dict]:
        return list(self._events)[-n:]

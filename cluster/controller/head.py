"""Whether the head's GCS answers, as the controller sees it.

With GCS fault tolerance the GCS process may die and come back while everything else runs
on: workers keep their engines and serve what the front door sends them, and calls between
running actors go on. What needs the GCS (starting an actor, a build's placement, reading
the nodes) cannot happen meanwhile and would hang; the controller probes the GCS port once a
second and answers such calls at once with ``HeadUnavailable`` (a 503 with Retry-After).
Without Ray in it: the probe is a TCP connect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from workers.errors import HeadUnavailable


class GcsWatch:
    def __init__(self, address: str, clock: Callable[[], float] = time.time) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self._where = (host, int(port))
        self._clock = clock
        self.down_since: float | None = None
        self.outages = 0
        self.last_outage_s: float | None = None

    async def probe(self, timeout_s: float = 0.5) -> bool:
        """Whether something listens on the GCS port (a dead GCS refuses at once). On the event loop:
        no thread to wait for, however the GCS's host behaves."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*self._where), timeout_s)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    @property
    def up(self) -> bool:
        return self.down_since is None

    def observe(self, up: bool) -> str | None:
        """Record a probe's result; "down" or "back" when that changed, else None."""
        if up and self.down_since is not None:
            self.last_outage_s = self._clock() - self.down_since
            self.down_since = None
            return "back"
        if not up and self.down_since is None:
            self.down_since = self._clock()
            self.outages += 1
            return "down"
        return None

    def require(self, what: str) -> None:
        """Raise ``HeadUnavailable`` for ``what`` (e.g. "loading digits-mlp") while the GCS is down."""
        if self.down_since is None:
            return
        since = time.strftime("%H:%M:%S", time.localtime(self.down_since))
        raise HeadUnavailable(
            f"{what} needs the head's GCS ({self.address}), which has not answered since {since} "
            f"({self._clock() - self.down_since:.0f} s): try again when it is back; models already loaded keep serving"
        )

    def to_dict(self) -> dict:
        return {"address": self.address, "up": self.up, "down_since": self.down_since, "outages": self.outages,
                "last_outage_s": None if self.last_outage_s is None else round(self.last_outage_s, 2)}

"""The front door as its own actor: applies the controller's routes, keeps HAProxy alive.

As Ray Serve's proxies follow the routes its controller publishes, this actor takes the
routes the fleet's controller pushes (``apply``, never awaited by the controller) and
reloads HAProxy on a thread of its own: a reload never blocks the controller, and a
burst of changes costs one reload with the newest routes. A watchdog starts HAProxy
again if it dies or is killed, with the routes it had.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from cluster.frontdoor.haproxy import FrontDoor
from cluster.frontdoor.routes import Route

log = logging.getLogger("forward-fleet.front-door")

WATCH_PERIOD_S = 0.5


class FrontDoorActor:
    def __init__(self, bind: tuple[str, int], ingress: tuple[str, int], threads: int = 1) -> None:
        self.door = FrontDoor(bind, ingress, threads)
        self._epoch = -1
        self._desired: list[Route] = []
        self._events: deque[dict] = deque(maxlen=100)
        self._tasks: list[asyncio.Task] = []
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None

    async def start(self, epoch: int, routes: list[Route]) -> dict:
        """Start HAProxy with these routes; returns once it listens."""
        self._wake, self._lock = asyncio.Event(), asyncio.Lock()
        await asyncio.to_thread(self.door.start, routes)
        self._epoch, self._desired = epoch, routes
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._apply_changes()), loop.create_task(self._watch())]
        return self.door.describe()

    async def apply(self, epoch: int, routes: list[Route]) -> None:
        """The routes of inventory ``epoch``; older epochs arriving late are ignored."""
        if epoch <= self._epoch or self._wake is None:
            return
        self._epoch, self._desired = epoch, routes
        self._wake.set()

    async def _apply_changes(self) -> None:
        assert self._wake is not None and self._lock is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            routes = self._desired
            async with self._lock:
                try:
                    if await asyncio.to_thread(self.door.update, routes):
                        self._event("front-door-reload", routes=len(routes))
                except Exception as exc:  # keep serving the old routes; the next change tries again
                    log.warning("front door reload failed: %s", exc)
                    self._event("front-door-reload-failed", reason=str(exc))

    async def _watch(self) -> None:
        assert self._lock is not None
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            if self.door.running:
                continue
            async with self._lock:
                try:
                    await asyncio.to_thread(self.door.restart)
                    self._event("front-door-restarted", restarts=self.door.restarts)
                except Exception as exc:
                    log.warning("could not restart HAProxy: %s", exc)
                    self._event("front-door-restart-failed", reason=str(exc))

    def _event(self, kind: str, **fields) -> None:
        self._events.append({"time": time.time(), "event": kind, **fields})

    async def describe(self) -> dict:
        return dict(self.door.describe(), events=list(self._events))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self.door.stop)

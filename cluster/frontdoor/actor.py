"""The front door as its own actor: applies the controller's routes, keeps HAProxy alive.

As Ray Serve's proxies follow the routes its controller publishes, this actor takes the
routes the fleet's controller pushes (``apply``, never awaited by the controller) and
reloads HAProxy on a thread of its own: a reload never blocks the controller, and a
burst of changes costs one reload with the newest routes. A watchdog starts HAProxy
again if it dies or is killed, with the routes it had. With gRPC on, HAProxy also takes
the fleet's gRPC port, and the gRPC router (``grpc_router``) runs here for what HAProxy
sends it, fed the same routes at once (no reload).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import ray

from cluster.calls import call
from cluster.frontdoor.grpc_router import GrpcFront, GrpcRouter
from cluster.frontdoor.haproxy import FrontDoor
from cluster.frontdoor.routes import GrpcFrontend, Route
from cluster.frontdoor.tls import TlsMaterial
from cluster.inventory import Placement
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.net import local_address

log = logging.getLogger("forward-fleet.front-door")

WATCH_PERIOD_S = 0.5


class FrontDoorActor:
    def __init__(self, bind: tuple[str, int], ingress: tuple[str, int], threads: int = 1,
                 grpc: GrpcFront | None = None, tls: TlsMaterial | None = None,
                 worker_token: str | None = None) -> None:
        self.door = FrontDoor(bind, ingress, threads, tls=tls, worker_token=worker_token)
        self.grpc = GrpcRouter(grpc, f"http://{ingress[0]}:{ingress[1]}", self._load) if grpc is not None else None
        self._controller = None
        self._epoch = -1
        self._desired: list[Route] = []
        self._events: deque[dict] = deque(maxlen=100)
        self._tasks: list[asyncio.Task] = []
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._applied = -1  # the newest epoch whose routes HAProxy has

    async def start(self, epoch: int, routes: list[Route], grpc_addresses: dict | None = None) -> dict:
        """Start HAProxy (and the gRPC router) with these routes; returns once they listen."""
        self._wake, self._lock = asyncio.Event(), asyncio.Lock()
        if self.grpc is not None:  # first: HAProxy's gRPC frontend sends it what it cannot route
            self.grpc.set_addresses(grpc_addresses or {})
            self.grpc.set_routes(routes)
            port = await self.grpc.start()
            self.door.grpc = GrpcFrontend(self.grpc.front.bind, (local_address(self.grpc.front.router_host), port))
        await asyncio.to_thread(self.door.start, routes)
        self._epoch, self._desired, self._applied = epoch, routes, epoch
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._apply_changes()), loop.create_task(self._watch())]
        return self.door.describe()

    async def apply(self, epoch: int, routes: list[Route], grpc_addresses: dict | None = None) -> None:
        """The routes of inventory ``epoch``; older epochs arriving late are ignored."""
        if epoch <= self._epoch or self._wake is None:
            return
        self._epoch, self._desired = epoch, routes
        if self.grpc is not None:
            self.grpc.set_addresses(grpc_addresses or {})
            self.grpc.set_routes(routes)
        self._wake.set()

    async def applied(self, epoch: int, timeout_s: float = 30.0) -> bool:
        """Wait until HAProxy serves the routes of ``epoch`` (or newer); False if it did not in time."""
        deadline = time.monotonic() + timeout_s
        while self._applied < epoch and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._applied >= epoch

    async def _load(self, model: str, version: str | None) -> Placement:
        """A gRPC request for a model no worker holds: the controller loads it (as the ingress asks it to)."""
        if self._controller is None:
            self._controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        return await call(self._controller.ensure_loaded.remote(model, version))

    async def _apply_changes(self) -> None:
        assert self._wake is not None and self._lock is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            routes, epoch = self._desired, self._epoch
            async with self._lock:
                try:
                    if await asyncio.to_thread(self.door.update, routes):
                        self._event("front-door-reload", routes=len(routes))
                    self._applied = epoch
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
        grpc = f"{self.grpc.front.bind[0]}:{self.grpc.front.bind[1]}" if self.grpc is not None else None
        return dict(self.door.describe(), grpc=grpc, events=list(self._events))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.grpc is not None:
            await self.grpc.stop()
        await asyncio.to_thread(self.door.stop)

"""A worker's states in the pool, and taking workers out of service without failing a request: a host
that leaves (``drain``: ``fleet leave``) and one worker restarted on a new runtime (``roll``: ``fleet
upgrade``). Both take the workers out of every route first (the front door reloaded), wait until
what they hold is finished, and only then stop them.

``Draining`` is a mixin of ``WorkerPool`` (``cluster.controller.pool``), which provides ``_members``,
``_nodes``, ``_left``, ``_set``, ``_start``, ``_read_nodes`` and ``events``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import ray

from cluster.controller.environments import prepare_environments
from workers.actor import WorkerSpec
from workers.errors import NotReady

log = logging.getLogger("forward-fleet.pool")

UP, UNREACHABLE, REPLACING, WAITING, DRAINING, OUT = (
    "up", "unreachable", "replacing", "waiting for its host", "draining", "out of service")


class Draining:
    async def drain(self, node_id: str, timeout_s: float, routes_out: Callable[[], Awaitable[None]],
                    address: str | None = None) -> dict:
        """A host leaves: its workers take no new requests (out of every route: ``routes_out`` returns
        once the front door has the routes without them), finish what they have (``in_flight`` 0 for a
        quiet second), then stop. Returns what was drained and how long it took."""
        t0 = time.monotonic()
        await self._read_nodes()
        leaving = {node_id} | {nid for nid, n in self._nodes.items()
                               if address and n.get("Alive") and n.get("NodeManagerAddress") == address}
        self._left |= leaving
        drained = [wid for wid, m in self._members.items() if m.node_id in leaving and m.handle is not None
                   and m.state in (UP, UNREACHABLE, OUT)]
        for wid in drained:
            self._set(wid, DRAINING, "worker-draining", node=node_id)
        await routes_out()
        left_busy = not await self._until_quiet(drained, t0 + timeout_s)
        for wid in drained:
            member = self._members[wid]
            handle, member.handle, member.pending = member.handle, None, None
            await stop_worker(handle)
            self._set(wid, WAITING, "worker-left", node=node_id)
        took = round(time.monotonic() - t0, 2)
        self.events.add("host-drained", node=node_id, workers=drained, seconds=took, timed_out=left_busy)
        return {"node_id": node_id, "workers": drained, "seconds": took, "timed_out": left_busy}

    async def _until_quiet(self, worker_ids: list[str], deadline: float) -> bool:
        """Wait until none of these workers has had a request in flight for a quiet second (a request
        already on its way gets there in time); False when the deadline came first."""
        if not worker_ids:
            return True
        quiet_since = None
        while time.monotonic() < deadline:
            busy = await asyncio.gather(*(self._members[w].handle.in_flight.remote() for w in worker_ids),
                                        return_exceptions=True)
            if all(b == 0 or isinstance(b, Exception) for b in busy):
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= 1.0:
                    return True
            else:
                quiet_since = None
            await asyncio.sleep(0.1)
        return False

    async def roll(self, worker_id: str, spec: WorkerSpec, routes_out: Callable[[], Awaitable[None]],
                   timeout_s: float) -> dict:
        """Restart one worker on a new spec (a runtime upgrade) without failing a request: out of every
        route (``routes_out`` returns once the front door has the routes without it), what it holds
        finished, stopped, and started again with ``spec`` (its environment prepared first when it
        changed). Returns once it is up; NotReady when it was not up or does not come back."""
        member = self._members[worker_id]
        if member.handle is None or member.state != UP:
            raise NotReady(f"worker {worker_id} is {member.state}: only a worker that is up is rolled; try again")
        t0 = time.monotonic()
        self._set(worker_id, DRAINING, "worker-draining", node=member.node_id, reason="runtime upgrade")
        await routes_out()
        quiet = await self._until_quiet([worker_id], t0 + timeout_s)
        drained_s = round(time.monotonic() - t0, 2)
        handle, member.handle, member.pending = member.handle, None, None
        await stop_worker(handle)
        changed_env, member.spec = spec.environment != member.spec.environment, spec
        if changed_env:
            member.options = {k: v for k, v in member.options.items() if k != "runtime_env"}
            await prepare_environments([member], self.events)
        await self._start(worker_id, member.node_id)
        return {"worker": worker_id, "drained_s": drained_s, "timed_out": not quiet,
                "seconds": round(time.monotonic() - t0, 2)}


async def stop_worker(handle) -> None:
    """Shut a worker down (its engines freed in order), then end its actor."""
    try:
        await asyncio.wait_for(handle.shutdown.remote(), 30)
    except Exception as exc:  # noqa: BLE001 (it stops either way)
        log.debug("worker shutdown did not answer (%s); killing it", exc)
    ray.kill(handle, no_restart=True)

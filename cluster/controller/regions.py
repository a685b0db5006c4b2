"""System shared memory regions clients registered, and which workers mapped each.

A region is registered on every live worker; those whose host has the object map it
(a worker on another host cannot see it). The ingress routes a request naming regions
to a worker that mapped all of them; a replacement worker maps them again (``replay``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from workers.errors import FleetError, SharedMemoryError
from workers.shm import RegionInfo

from cluster.calls import call, unwrap
from cluster.controller.events import EventLog
from cluster.controller.pool import WorkerPool


class ShmRegions:
    def __init__(self, allowed: bool, pool: WorkerPool, events: EventLog, on_change: Callable[[], None]) -> None:
        self.allowed = allowed
        self.pool = pool
        self.events = events
        self._on_change = on_change
        self._regions: dict[str, tuple[RegionInfo, set[str]]] = {}  # name -> (registration, workers that mapped it)

    def holders(self) -> dict[str, frozenset[str]]:
        return {name: frozenset(workers) for name, (_, workers) in self._regions.items()}

    async def register(self, name: str, key: str, offset: int = 0, byte_size: int = 0, pin_wait_s: float = 0.0) -> list[str]:
        """Register a client's region on every worker of the host that has the object.
        Returns the workers that mapped it. ``pin_wait_s``: how long each may wait for its pin
        (``workers.shm.SharedMemoryRegistry.register``)."""
        if not self.allowed:
            raise SharedMemoryError(
                "system shared memory is off on this fleet: set allow_client_shm: true in the fleet config "
                "(workers then read and write the shared memory objects clients on their hosts name)"
            )
        info = RegionInfo.checked(name, key, offset, byte_size)  # before asking every worker
        if name in self._regions:
            raise SharedMemoryError(f"shared memory region '{name}' is already registered; unregister it first")
        live = self.pool.live()
        results = await asyncio.gather(
            *(self.pool.handle(w).register_shm.remote(name, key, offset, byte_size, pin_wait_s) for w in live),
            return_exceptions=True)
        mapped = {w for w, r in zip(live, results) if r is True}
        if not mapped:
            problems = [unwrap(r) for r in results if isinstance(r, BaseException)]
            if problems:
                raise problems[0] if isinstance(problems[0], FleetError) else SharedMemoryError(str(problems[0]))
            hosts = sorted({info.host for w in live if (info := self.pool.info(w)) is not None})
            raise SharedMemoryError(
                f"shared memory object '{key}' does not exist on any host of the fleet ({', '.join(hosts)}); "
                f"system shared memory works only between processes of one host: create it there first"
            )
        self._regions[name] = (info, mapped)
        self.events.add("shm-register", region=name, key=key, workers=sorted(mapped))
        self._on_change()  # a new epoch: ingress replicas learn who has the region
        return sorted(mapped)

    async def unregister(self, name: str | None = None) -> list[str]:
        """Unregister one region (None: all). Unknown names are not an error, as in Triton."""
        names = list(self._regions) if name is None else [name] if name in self._regions else []
        handles = self.pool.handles()
        for n in names:
            _, workers = self._regions.pop(n)
            await asyncio.gather(*(handles[w].unregister_shm.remote(n) for w in workers if w in handles),
                                 return_exceptions=True)
            self.events.add("shm-unregister", region=n)
        if names:
            self._on_change()
        return names

    def status(self, name: str | None = None) -> list[dict]:
        if name is not None and name not in self._regions:
            raise SharedMemoryError(f"shared memory region '{name}' is not registered")
        return [info.to_dict() for n, (info, _) in sorted(self._regions.items()) if name in (None, n)]

    async def replay(self, worker_id: str) -> None:
        """A (re)started worker maps the regions it can, as the one it replaces had."""
        handle = self.pool.handle(worker_id)
        for name, (info, workers) in self._regions.items():
            workers.discard(worker_id)
            try:
                if await call(handle.register_shm.remote(name, info.key, info.offset, info.byte_size)):
                    workers.add(worker_id)
            except FleetError as exc:
                self.events.add("shm-replay-failed", worker=worker_id, region=name, reason=exc.message)

"""The data plane of the Serve ingress: route a decoded request to a worker, independent of the web framework.

One instance lives in each ingress replica. It keeps a Router fed from the
controller's inventory (refreshed when the controller's epoch moves; the artifacts
only when the repository changed) and counts its own outstanding requests per worker
for least-outstanding routing. On a miss it asks the controller to load the model and
routes by the placement the controller returns.
"""

from __future__ import annotations

import asyncio
import time

from workers.engines.base import check_feeds
from workers.errors import FleetError, NotReady, SharedMemoryError, WorkerLost
from workers.kserve.codec import InferRequest
from workers.kserve.handler import Served, served_by
from workers.manifest import validate_model_ref

from cluster.calls import Failure, call, classify
from cluster.inventory import Placement
from cluster.router import Choice, Router

REFRESH_PERIOD_S = 1.0
ATTEMPTS = 3  # a load on a miss, and a retry after a lost worker or an engine evicted under us


class DataPlane:
    def __init__(self, controller, clock=time.monotonic) -> None:
        self.controller = controller
        self.router = Router()
        self.handles: dict = {}
        self.shm_workers: dict[str, frozenset[str]] = {}  # shared memory region -> workers that mapped it
        self.http_addresses: dict[str, tuple[str, int]] = {}  # worker id -> its own KServe v2 endpoint
        self._epoch = -1
        self._generation = -1
        self._clock = clock
        self._last_refresh = float("-inf")
        self._refresh_lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        async with self._refresh_lock:
            inventory = await call(self.controller.inventory.remote(-1 if force else self._epoch, self._generation))
            self._last_refresh = self._clock()
            if inventory is None:
                return
            self.router.apply(inventory)
            self.handles = dict(inventory.handles)
            self.shm_workers = dict(inventory.shm)
            self.http_addresses = {r.worker_id: r.info.http for r in inventory.workers if r.info.http}
            self._epoch, self._generation = inventory.epoch, inventory.manifest_generation

    async def _fresh(self) -> None:
        if self._clock() - self._last_refresh > REFRESH_PERIOD_S:
            await self.refresh()

    # ---- metadata ------------------------------------------------------------
    async def ready(self) -> bool:
        await self._fresh()
        return any(w.alive for w in self.router.workers.values())

    async def resolve(self, model: str, version: str | None) -> str:
        validate_model_ref(model, version)
        await self._fresh()
        try:
            return self.router.resolve(model, version)
        except FleetError:
            await call(self.controller.rescan.remote())
            await self.refresh(force=True)
            return self.router.resolve(model, version)

    async def metadata(self, model: str, version: str | None) -> dict:
        version = await self.resolve(model, version)
        manifests = self.router.manifests(model, version)
        first = manifests[0]
        platform = "tensorrt_plan" if all(m.target.backend == "tensorrt" for m in manifests) else "onnxruntime_onnx"
        return {
            "name": model,
            "versions": self.router.models()[model],
            "platform": platform,
            "inputs": [s.to_dict() for s in first.inputs],
            "outputs": [s.to_dict() for s in first.outputs],
            "parameters": {
                "max_batch": first.max_batch,
                "targets": sorted({m.target.key() for m in manifests}),
                "precision": sorted({m.precision for m in manifests}),
                "accuracy": {m.target.key(): m.accuracy for m in manifests if m.accuracy},
                "fallback": {m.target.key(): m.build_options["fallback_reason"] for m in manifests
                             if m.build_options.get("fallback_reason")},
            },
        }

    async def model_ready(self, model: str, version: str | None) -> bool:
        await self.refresh(force=True)  # another ingress replica may have loaded or unloaded it just now
        version = await self.resolve(model, version)
        return bool(self.router.holders(model, version))

    # ---- loading -----------------------------------------------------------------
    async def load(self, model: str, version: str | None = None, *, explicit: bool = False) -> Placement:
        """Have the controller load the model; route by the placement it returns at once."""
        placement = await call(self.controller.ensure_loaded.remote(model, version, explicit=explicit))
        if not all(self._known_alive(worker_id) for worker_id in placement.engines):
            # a worker we have not met yet, or one we saw die whose replacement (same id, new
            # actor) we have no handle for
            await self.refresh(force=True)
        else:
            self.router.apply_placement(placement)
        return placement

    def _known_alive(self, worker_id: str) -> bool:
        worker = self.router.workers.get(worker_id)
        return worker is not None and worker.alive and worker_id in self.handles

    # ---- inference -------------------------------------------------------------
    async def serve(self, model: str, version: str | None, request: InferRequest) -> Served:
        """Serve one decoded request on a worker that holds the model (loading it on a miss).

        A request naming shared memory regions goes to a worker that mapped all of them (one on
        the client's host); its outputs in shared memory come back as ShmWritten."""
        version, pinned, among = await self._target(model, version, request)
        regions = request.regions()
        last_error: FleetError | None = None

        def pick() -> Choice | None:
            return self._pick(model, version, pinned, among)

        for _ in range(ATTEMPTS):
            choice = pick()
            if choice is None:
                if not regions:  # bad input fails before anything loads for it
                    check_feeds(self.router.manifests(model, version)[0].inputs, request.inputs)
                await self.load(model, version if pinned else None)
                choice = pick()
                if choice is None:
                    if among is not None:
                        last_error = NotReady(
                            f"model '{model}' is not loaded on any worker that mapped shared memory region(s) "
                            f"{', '.join(sorted(regions))} (workers there: {', '.join(sorted(among)) or 'none alive'})")
                    continue
            try:
                return await self._call(choice, model, choice.manifest.version, request)
            except _Retry as retry:
                last_error = retry.error
        raise last_error or NotReady(f"model '{model}' could not be served; try again")

    async def choose(self, model: str, version: str | None, request: InferRequest) -> Choice | None:
        """The worker ``serve`` would send ``request`` to now, loading nothing (None: no worker holds the
        model, or none that mapped the request's regions). For a caller with its own way to the worker."""
        version, pinned, among = await self._target(model, version, request)
        return self._pick(model, version, pinned, among)

    async def _target(self, model: str, version: str | None,
                      request: InferRequest) -> tuple[str, bool, set[str] | None]:
        """(the version to serve, whether the caller named it, the workers that mapped the request's
        shared memory regions: None when it names none)."""
        regions = request.regions()
        resolved = await self.resolve(model, version)
        return resolved, version is not None, await self._shm_holders(regions) if regions else None

    def _pick(self, model: str, version: str, pinned: bool, among: set[str] | None) -> Choice | None:
        # no version named: each worker serves its own default (cluster.rollout), so a version 2
        # built for the T4s only does not pull every request onto the T4s
        return self.router.choose(model, version, among) if pinned else self.router.choose_unpinned(model, among)

    async def _call(self, choice: Choice, model: str, version: str, request: InferRequest) -> Served:
        worker_id = choice.worker_id
        self.router.begin(worker_id)
        try:
            reply = await self.handles[worker_id].infer.remote(model, request, version)
        except Exception as exc:
            failure, cause = classify(exc)
            if failure is Failure.WORKER_LOST:
                self.router.mark_dead(worker_id)
                asyncio.get_running_loop().create_task(self._report(worker_id))
                raise _Retry(WorkerLost(f"worker {worker_id} died while serving '{model}'")) from None
            if failure is Failure.ENGINE_GONE:  # evicted since our last refresh
                await self._report(worker_id)
                raise _Retry(cause) from None
            raise cause from None
        finally:
            self.router.end(worker_id)
        device = self.router.workers[worker_id].caps.device
        return Served(reply.version, reply.outputs, served_by(worker_id, device, reply.target_key))

    def region_mapped(self, name: str, workers: list[str]) -> None:
        """A region this process registered, and the workers that mapped it (the controller's answer):
        requests naming it route at once, without a refresh of the whole inventory each. (The next
        refresh brings the same from the controller; any thread may call this.)"""
        self.shm_workers[name] = frozenset(workers)

    def region_gone(self, name: str) -> None:
        self.shm_workers.pop(name, None)

    async def _shm_holders(self, regions: set[str]) -> set[str]:
        """The workers that mapped every one of ``regions``."""
        if not regions <= self.shm_workers.keys():
            await self.refresh(force=True)  # registered a moment ago, through another ingress replica?
        missing = sorted(regions - self.shm_workers.keys())
        if missing:
            raise SharedMemoryError(
                f"shared memory region '{missing[0]}' is not registered; register it with "
                f"POST /v2/systemsharedmemory/region/{missing[0]}/register"
            )
        return set.intersection(*(set(self.shm_workers[r]) for r in regions))

    async def _report(self, worker_id: str) -> None:
        """Have the controller read the worker's health now, then take the news."""
        try:
            await self.controller.report_worker.remote(worker_id)
        finally:
            await self.refresh(force=True)


class _Retry(Exception):
    """A worker call failed in a way another attempt may not."""

    def __init__(self, error: FleetError) -> None:
        super().__init__(error.message)
        self.error = error

"""The data plane: decode -> route -> worker -> encode, independent of the web framework.

One instance lives in each ingress replica. It keeps a Router fed from the
controller's inventory (refreshed when the controller's epoch moves) and counts
its own outstanding requests per worker for least-outstanding routing.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray.exceptions import RayActorError, RayTaskError

from workers.engines.base import check_feeds
from workers.errors import FleetError, NotReady, SharedMemoryError, WorkerLost
from workers.protocol import InferRequest

from cluster.controller import apply_snapshot, call, unwrap
from cluster.repository import validate_model_ref
from cluster.router import Router

REFRESH_PERIOD_S = 1.0


class DataPlane:
    def __init__(self, controller, clock=time.monotonic) -> None:
        self.controller = controller
        self.router = Router()
        self.handles: dict = {}
        self.shm_workers: dict[str, set[str]] = {}  # shared memory region -> workers that mapped it
        self._epoch = -1
        self._clock = clock
        self._last_refresh = float("-inf")
        self._refresh_lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        async with self._refresh_lock:
            snap = await call(self.controller.snapshot.remote(-1 if force else self._epoch))
            self._last_refresh = self._clock()
            if snap is None:
                return
            self.handles.update(apply_snapshot(self.router, snap))
            self.shm_workers = {name: set(workers) for name, workers in snap.get("shm", {}).items()}
            self._epoch = snap["epoch"]

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
        return self.router.choose(model, version) is not None

    # ---- inference -------------------------------------------------------------
    async def infer(self, model: str, version: str | None, feeds: dict[str, np.ndarray],
                    request: InferRequest | None = None, reject_non_finite: bool = False) -> tuple[str, dict, dict]:
        """Run one request. Returns (version, outputs, parameters naming who served it).

        A ``request`` naming shared memory regions goes to a worker that mapped all of them
        (one on the client's host); its outputs in shared memory come back as ShmWritten."""
        version = await self.resolve(model, version)
        regions = request.regions() if request is not None else set()
        among = await self._shm_holders(regions) if regions else None
        if not regions:
            check_feeds(self.router.manifests(model, version)[0].inputs, feeds)
        last_error: FleetError | None = None
        for _ in range(3):  # load on a miss, and retry once after a lost worker
            choice = self.router.choose(model, version, among)
            if choice is None:
                await call(self.controller.ensure_loaded.remote(model, version))
                await self.refresh(force=True)
                among = await self._shm_holders(regions) if regions else None
                choice = self.router.choose(model, version, among)
                if choice is None:
                    if among is not None:
                        last_error = NotReady(
                            f"model '{model}' is not loaded on any worker that mapped shared memory region(s) "
                            f"{', '.join(sorted(regions))} (workers there: {', '.join(sorted(among)) or 'none alive'})")
                    continue
            worker_id = choice.worker_id
            self.router.begin(worker_id)
            try:
                handle, key = self.handles[worker_id], choice.manifest.engine_key
                if regions:
                    outputs = await handle.infer_request.remote(key, request, reject_non_finite)
                else:
                    outputs = await handle.infer.remote(key, feeds)
            except RayActorError:
                self.router.mark_dead(worker_id)
                last_error = WorkerLost(f"worker {worker_id} died while serving '{model}'")
                asyncio.get_running_loop().create_task(self._report_dead(worker_id))
                continue
            except RayTaskError as exc:
                cause = unwrap(exc)
                if isinstance(cause, NotReady):  # evicted since our last refresh
                    last_error = cause
                    await self.refresh(force=True)
                    continue
                raise cause from None
            finally:
                self.router.end(worker_id)
            caps = self.router.workers[worker_id].caps
            params = {
                "fleet_worker": worker_id,
                "fleet_device": caps.device.name,
                "compute_capability": caps.device.compute_capability or "cpu",
                "simulated": caps.device.simulated,
                "fleet_target": choice.manifest.target.key(),
            }
            return version, outputs, params
        raise last_error or NotReady(f"model '{model}' could not be served; try again")

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
        return set.intersection(*(self.shm_workers[r] for r in regions))

    async def _report_dead(self, worker_id: str) -> None:
        try:
            await self.controller.report_dead.remote(worker_id)
        finally:
            await self.refresh(force=True)

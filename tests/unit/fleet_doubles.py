"""Stand-ins for the Ray side of the data plane and the loader, for unit tests without Ray.

What they replace is only the transport: ``handle.method.remote(...)`` returns an awaitable,
as a Ray actor handle's does, and a dead worker raises ``RayActorError``, as Ray does. The
router, the inventory, the manifests, the placements and the errors are the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError

from cluster.inventory import Inventory, Placement, WorkerRecord
from workers.devices import Device
from workers.manifest import Manifest
from workers.messages import InferReply, WorkerHealth, WorkerInfo
from workers.targets import Runtime, Target, WorkerCaps
from workers.tensors import TensorSpec

ORT = Runtime("onnxruntime", "1.23.2", "cpu")
SPEC = (TensorSpec("input", "FP32", (-1, 4)),)


class Remote:
    """``.remote(...)`` of one actor method: a coroutine, awaited by the caller."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[tuple] = []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))

        async def run():
            await asyncio.sleep(0)
            return self.fn(*args, **kwargs)

        return run()


def caps(worker_id: str, cc: str = "7.5", trt: str = "10.16.1") -> WorkerCaps:
    device = Device(f"GPU {cc}", f"SIM-{worker_id}", "gpu", cc, 16 << 30, simulated=True)
    return WorkerCaps(worker_id, device, (Runtime("tensorrt", trt, "tensorrt", simulated=True), ORT))


def manifest(model: str, cc: str = "7.5", trt: str = "10.16.1", footprint: int = 10, version: str = "1") -> Manifest:
    target = Target("tensorrt", trt, cc, provider="tensorrt", simulated=True)
    return Manifest(model, version, "float32", target, "model.onnx", "0" * 64, "1" * 64, SPEC, SPEC, footprint)


class FakeWorker:
    """A worker's Ray handle: it holds engines and answers infer with the inputs doubled."""

    def __init__(self, worker_id: str, cc: str = "7.5", budget: int = 100) -> None:
        self.worker_id = worker_id
        self.caps = caps(worker_id, cc)
        self.budget = budget
        self.loaded: dict[str, Manifest] = {}
        self.dead = False
        self.evicted_under_caller = False  # the next infer says the engine is gone
        self.infer = Remote(self._infer)
        self.load = Remote(self._load)
        self.unload = Remote(lambda key: self.loaded.pop(key, None) is not None)

    def record(self, alive: bool = True) -> WorkerRecord:
        used = sum(m.footprint_bytes for m in self.loaded.values())
        health = WorkerHealth(self.budget, used, frozenset(self.loaded))
        return WorkerRecord(WorkerInfo(self.worker_id, self.caps, "host", 1), health, alive and not self.dead)

    def _infer(self, model, request, version):
        from workers.errors import EngineNotHere

        if self.dead:
            raise RayActorError()
        if self.evicted_under_caller:
            self.evicted_under_caller = False
            raise EngineNotHere(f"model '{model}' is not loaded on worker {self.worker_id}")
        (manifest,) = [m for m in self.loaded.values() if m.model == model]
        return InferReply(manifest.version, manifest.target.key(), {k: v * 2 for k, v in request.inputs.items()})

    def _load(self, manifest, source, options):
        if self.dead:
            raise RayActorError()
        self.loaded[manifest.engine_key] = manifest
        return {"key": manifest.engine_key}


class FakeController:
    """The controller's Ray handle as the data plane sees it: the inventory and the loads."""

    def __init__(self, workers: list[FakeWorker], manifests: list[Manifest]) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.manifests = manifests
        self.epoch = 1
        self.reported: list[str] = []
        self.inventory = Remote(self._inventory)
        self.ensure_loaded = Remote(self._ensure_loaded)
        self.report_worker = Remote(self._report_worker)
        self.rescan = Remote(lambda: {})
        self.shm: dict[str, frozenset[str]] = {}

    def changed(self) -> None:
        self.epoch += 1

    def _inventory(self, since_epoch=-1, manifest_generation=-1):
        if since_epoch == self.epoch:
            return None
        records = tuple(w.record() for w in self.workers.values())
        manifests = None if manifest_generation == 1 else tuple(self.manifests)
        return Inventory(self.epoch, records, 1, manifests, dict(self.shm), dict(self.workers))

    def _ensure_loaded(self, model, version=None, explicit=False):
        placed = {}
        for worker in self.workers.values():
            for m in self.manifests:
                if m.model == model and m.target.compute_capability == worker.caps.device.compute_capability \
                        and not worker.dead:
                    worker.loaded[m.engine_key] = m
                    placed[worker.worker_id] = m.engine_key
        self.changed()
        return Placement(model, version or "1", placed, self.epoch)

    def _report_worker(self, worker_id):
        self.reported.append(worker_id)
        self.changed()

"""The workers a batch job sends its parts to (``FleetWorkers``), and how the parts reach them: through
Ray's object store, or in shared memory.

* ``RayParts``: the part goes with the actor call to the worker the job chose; Ray copies it into
  its object store and the outputs back. Works on any fleet, any host.
* ``ShmParts``: the part is copied into a POSIX shared memory region of the job's process and the
  worker reads it in place (a GPU worker page-locks the region: the copies to and from the device
  are DMA) and writes the outputs there, asked over its own KServe v2 endpoint
  (``cluster.incluster.InClusterClient``, which also routes: least outstanding among the workers
  of this host that hold the model). On one H200 the object store held the in-cluster path near
  0.6x of the GPU's limit; shared memory near 0.9x. It needs ``allow_client_shm: true`` and a
  worker on the job's host that holds the model.

Both return a ``concurrent.futures.Future`` of ``(outputs, worker id, release)`` per part: the outputs
of a part in shared memory stay in its region, read by the part's writer in place (a copy of 64 MB less
per part of 4,096 rows of 4,096 floats); ``release()`` gives the region back once the part is written.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from workers.errors import NoCompatibleWorker
from workers.kserve.codec import InferRequest
from workers.manifest import Manifest

from cluster.calls import get
from cluster.incluster import InClusterClient
from cluster.router import Router


class RayParts:
    """Parts to the worker the caller names, through Ray's object store."""

    name = "Ray's object store"

    def __init__(self, model: str, wanted: list[str]) -> None:
        self.model, self.wanted = model, wanted

    def send(self, handle, worker: str, version: str | None, feeds: dict[str, np.ndarray]) -> Future:
        ref = handle.infer.remote(self.model, InferRequest(feeds), version)
        result: Future = Future()

        def done(ray_future: Future) -> None:
            try:
                reply = ray_future.result()
            except BaseException as exc:  # noqa: BLE001  (the job classifies it)
                result.set_exception(exc)
            else:
                result.set_result(({k: reply.outputs[k] for k in self.wanted}, worker, lambda: None))

        ref.future().add_done_callback(done)
        return result

    def close(self) -> None:
        pass


class ShmParts:
    """Parts in shared memory, to the least busy worker of this host that holds the model; one region
    per part in flight, reused. The client's event loop runs on a thread of its own."""

    name = "shared memory"

    def __init__(self, controller, model: str, wanted: list[str]) -> None:
        self.model, self.wanted = model, wanted
        self.client = InClusterClient(controller, shared_memory=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="batch-shm-loop", daemon=True)
        self.thread.start()

    def send(self, feeds: dict[str, np.ndarray], version: str | None) -> Future:
        async def call() -> tuple[dict[str, np.ndarray], str, Callable[[], None]]:
            answer = await self.client.infer_with_parameters(self.model, feeds, version=version, outputs=self.wanted,
                                                             in_place=True)
            return answer.outputs, str(answer.parameters.get("fleet_worker", "")), answer.release

        return asyncio.run_coroutine_threadsafe(call(), self.loop)

    def prepare(self, feeds: dict[str, np.ndarray], regions: int, version: str | None) -> None:
        """``regions`` regions for parts like this one, registered (and on GPU workers page-locked)
        before any part goes out: see ``InClusterClient.prepare``."""
        asyncio.run_coroutine_threadsafe(
            self.client.prepare(self.model, feeds, regions, version=version, outputs=self.wanted), self.loop).result()

    def close(self) -> None:
        """Cancel the parts still in flight (a job that failed leaves some), unregister and unlink the
        regions, stop the loop."""

        async def shut() -> None:
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self.client.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            if not self.thread.is_alive():
                self.loop.close()


class FleetWorkers:
    """The live workers that hold the model, from the controller's inventory."""

    def __init__(self, controller, model: str, version: str | None) -> None:
        self.controller = controller
        self.model = model
        self.version = version
        self.workers: dict[str, tuple[object, str]] = {}  # id -> (handle, device)
        self.manifest: Manifest | None = None

    def refresh(self) -> None:
        """Load the model where it fits (the controller decides) and take the workers holding it."""
        placement = get(self.controller.ensure_loaded.remote(self.model, self.version))
        inventory = get(self.controller.inventory.remote())
        router = Router.from_inventory(inventory)
        self.version = placement.version
        self.workers = {}
        for worker_id, manifest in router.compatible(self.model, placement.version):
            if manifest.engine_key in router.workers[worker_id].loaded:
                self.manifest = manifest
                self.workers[worker_id] = (inventory.handles[worker_id], router.workers[worker_id].caps.device.describe())
        if not self.workers:
            raise NoCompatibleWorker(f"no live worker holds model '{self.model}' version {placement.version}")

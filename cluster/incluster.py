"""The fleet from inside the Ray cluster: no HTTP, the ingress's own data plane.

``InClusterClient`` is for code that runs in the cluster (a Ray actor, a task, a driver
connected with ``ray.init(address=...)``)::

    client = InClusterClient()                      # finds the fleet's controller by name
    outputs = await client.infer("resnet", {"input": batch})
    await client.close()

It routes and loads as the ingress does (``cluster.dataplane.DataPlane``: the same router,
least-outstanding choice, a load on a miss, a retry after a lost worker). A call's tensors
travel one of two ways:

* **shared memory** (``shared_memory=None``, the default, uses it for inputs of 64 KiB or more,
  which Ray would put in its object store, where it can): when a worker
  of this host serves the model, each call's inputs are copied into a POSIX shared memory
  region of this process, registered with the fleet (Triton's system shared memory, as
  ``FleetClient(shared_memory=True)`` does over HTTP); the worker reads them in place (a GPU
  worker page-locks the region, so the copies to and from the device are DMA) and writes the
  outputs there. The Ray call carries only their descriptions. One region per call in flight,
  reused by later calls. It needs ``allow_client_shm: true`` in the fleet's config.
* **Ray's object store** otherwise: the arrays go with the actor call (what the batch job does).

With ``shared_memory=None`` the client falls back to the object store, once and for good, when
the fleet does not allow shared memory or no worker of this host mapped the region; with
``shared_memory=True`` that is an error instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import ray

from workers.errors import FleetError, NotReady, SharedMemoryError
from workers.kserve.codec import InferRequest, RequestedOutput, ShmWritten
from workers.tensors import batch_rows

from cluster.calls import get
from cluster.dataplane import DataPlane
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.shm_arena import ShmArena, ShmPlan

SHM_FROM_BYTES = 1 << 16  # smaller inputs travel inside the Ray call itself (Ray inlines them)


@dataclass
class Answer:
    """One call's outputs and who served it (``fleet_worker``, ``fleet_device``, ...)."""

    outputs: dict[str, np.ndarray]
    parameters: dict


class InClusterClient:
    """Inference from inside the cluster, through the data plane, tensors in shared memory where it can."""

    def __init__(self, controller=None, *, shared_memory: bool | None = None) -> None:
        self.plane = DataPlane(controller or ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE))
        self.shared_memory = shared_memory
        self._free: list[ShmArena] = []  # one arena per call in flight, kept for the next calls
        self._arenas: list[ShmArena] = []
        self._output_specs: dict[tuple[str, str | None], list[dict]] = {}

    async def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                    outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return (await self.infer_with_parameters(model, inputs, version=version, outputs=outputs)).outputs

    async def infer_with_parameters(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                                    outputs: list[str] | None = None) -> Answer:
        big = sum(np.asarray(a).nbytes for a in inputs.values()) >= SHM_FROM_BYTES
        if self.shared_memory or (self.shared_memory is None and big):
            arena = self._free.pop() if self._free else self._new_arena()
            try:
                return await self._infer_shm(arena, model, inputs, version, outputs, big)
            except (SharedMemoryError, NotReady):
                if self.shared_memory:
                    raise  # asked for: the caller should hear why not
                if not arena.region:  # registration refused: the fleet does not allow it, or no worker is here
                    self.shared_memory = False
                    self._arenas.remove(arena)
                # else no worker of this host serves the model: this call goes through the object store
            finally:
                if arena in self._arenas:
                    self._free.append(arena)
        wanted = [RequestedOutput(name, binary=True) for name in outputs] if outputs else None
        served = await self.plane.serve(model, version, InferRequest(inputs, outputs=wanted))
        return Answer({n: np.asarray(a) for n, a in served.outputs.items()}, served.parameters)

    def _new_arena(self) -> ShmArena:
        controller = self.plane.controller

        def register(name: str, key: str, size: int) -> None:
            get(controller.register_shm.remote(name, key, 0, size))

        def unregister(name: str) -> None:
            get(controller.unregister_shm.remote(name))

        arena = ShmArena(register, unregister)
        self._arenas.append(arena)
        return arena

    async def _specs(self, model: str, version: str | None) -> list[dict]:
        specs = self._output_specs.get((model, version))
        if specs is None:
            specs = self._output_specs[(model, version)] = (await self.plane.metadata(model, version))["outputs"]
        return specs

    async def _infer_shm(self, arena: ShmArena, model: str, inputs: dict[str, np.ndarray], version: str | None,
                         outputs: list[str] | None, big: bool) -> Answer:
        arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        specs = await self._specs(model, version)
        wanted = outputs or [s["name"] for s in specs]
        # Large copies (and a new region's registration, a blocking Ray call) off the event loop: other
        # calls in flight go on meanwhile, and numpy copies without the GIL. Small ones cost less than the hop.
        def place() -> ShmPlan:
            return arena.place(arrays, [s for s in specs if s["name"] in wanted], batch_rows(arrays))

        plan = await asyncio.to_thread(place) if big or not arena.region else place()
        request = InferRequest({n: a for n, a in arrays.items() if n not in plan.inputs},
                               outputs=[RequestedOutput(n, binary=True, shm=plan.outputs.get(n)) for n in wanted],
                               shm_inputs=plan.inputs)
        served = await self.plane.serve(model, version, request)
        written = {n: o for n, o in served.outputs.items() if isinstance(o, ShmWritten)}
        result = {n: np.asarray(o) for n, o in served.outputs.items() if not isinstance(o, ShmWritten)}

        def read() -> dict[str, np.ndarray]:
            return {n: arena.read(plan.outputs[n], w.datatype, list(w.shape)) for n, w in written.items()}

        result.update(await asyncio.to_thread(read) if big else read())
        return Answer({n: result[n] for n in wanted if n in result}, served.parameters)

    async def close(self) -> None:
        """Unregister and unlink this client's regions."""
        arenas, self._arenas, self._free = self._arenas, [], []
        for arena in arenas:
            try:
                await asyncio.to_thread(arena.release)
            except FleetError:
                pass  # the fleet is gone: release() unlinked the object anyway

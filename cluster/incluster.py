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
  which Ray would put in its object store, where it can): when a worker of this host serves the
  model, each call's inputs are copied into a POSIX shared memory region of this process,
  registered with the fleet (Triton's system shared memory, as ``FleetClient(shared_memory=True)``
  does over HTTP); the worker reads them in place (a GPU worker page-locks the region, so the copies
  to and from the device are DMA) and writes the outputs there. One region per call in flight, reused
  by later calls (``prepare`` makes them ahead of the calls: a GPU worker then page-locks them while
  its device is idle). It needs ``allow_client_shm: true`` in the fleet's config. Such a call goes to the
  chosen worker's own KServe v2 endpoint, as the front door's requests do: only the tensors'
  descriptions travel, and neither side pays Ray's per-call work (on one H200 that work, not the
  copies, held the in-cluster path near 0.6x of the GPU's limit). Where that endpoint cannot answer
  (no worker holds the model yet, the worker just went away or lost the engine), the call goes
  through Ray, which loads and retries as the ingress does.
* **Ray's object store** otherwise: the arrays go with the actor call (what the batch job does).

With ``shared_memory=None`` the client falls back to the object store, once and for good, when
the fleet does not allow shared memory or no worker of this host mapped the region; with
``shared_memory=True`` that is an error instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np
import ray

from workers.errors import FleetError, NotReady, SharedMemoryError, Unauthorized, WorkerLost
from workers.kserve.client_codec import decode_response, encode_request
from workers.kserve.codec import HEADER_LENGTH, InferRequest, RequestedOutput, ShmWritten
from workers.kserve.handler import ERROR_TYPE_HEADER
from workers.tensors import batch_rows

from cluster.calls import get
from cluster.client import infer_path, raise_for_answer
from cluster.dataplane import DataPlane
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.shm_arena import RegionSetup, ShmArena, ShmPlan, plan_request, written_outputs

SHM_FROM_BYTES = 1 << 16  # smaller inputs travel inside the Ray call itself (Ray inlines them)
PREPARE_PIN_WAIT_S = 3.0  # bounds how long a job waits on a GPU that other traffic keeps busy (pins wait for gaps)


def _nothing() -> None:
    pass


@dataclass
class Answer:
    """One call's outputs and who served it (``fleet_worker``, ``fleet_device``, ...). With
    ``in_place=True`` the outputs may view the call's shared memory region: ``release()`` (from any
    thread, once they are no longer used) gives it back for later calls."""

    outputs: dict[str, np.ndarray]
    parameters: dict
    release: Callable[[], None] = _nothing


class InClusterClient:
    """Inference from inside the cluster, through the data plane, tensors in shared memory where it can."""

    def __init__(self, controller=None, *, shared_memory: bool | None = None, token: str | None = None,
                 timeout_s: float = 120.0) -> None:
        self.plane = DataPlane(controller or ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE))
        self.shared_memory = shared_memory
        self.timeout_s = timeout_s
        self._token = token  # the fleet's auth_token, where its workers ask for it on inference
        self._http = True  # requests in shared memory go to the worker's own endpoint
        self._http_session: aiohttp.ClientSession | None = None
        self.calls_over_http = 0  # answered by a worker's own endpoint (the rest went through Ray)
        self._free: list[ShmArena] = []  # one arena per call in flight, kept for the next calls
        self._arenas: list[ShmArena] = []
        self._output_specs: dict[tuple[str, str | None], list[dict]] = {}

    async def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                    outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return (await self.infer_with_parameters(model, inputs, version=version, outputs=outputs)).outputs

    async def infer_with_parameters(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                                    outputs: list[str] | None = None, in_place: bool = False) -> Answer:
        """``in_place``: outputs written into shared memory stay there (no copy out) until the answer's
        ``release()``; meanwhile this call's region serves no other call."""
        big = sum(np.asarray(a).nbytes for a in inputs.values()) >= SHM_FROM_BYTES
        if self.shared_memory or (self.shared_memory is None and big):
            arena = self._free.pop() if self._free else self._new_arena()
            kept = False
            try:
                answer = await self._infer_shm(arena, model, inputs, version, outputs, big, in_place)
                if in_place:
                    answer.release, kept = self._giver_back(arena), True
                return answer
            except (SharedMemoryError, NotReady):
                if self.shared_memory:
                    raise  # asked for: the caller should hear why not
                if not arena.region:  # registration refused: the fleet does not allow it, or no worker is here
                    self.shared_memory = False
                    self._arenas.remove(arena)
                # else no worker of this host serves the model: this call goes through the object store
            finally:
                if arena in self._arenas and not kept:
                    self._free.append(arena)
        wanted = [RequestedOutput(name, binary=True) for name in outputs] if outputs else None
        served = await self.plane.serve(model, version, InferRequest(inputs, outputs=wanted))
        return Answer({n: np.asarray(a) for n, a in served.outputs.items()}, served.parameters)

    def _giver_back(self, arena: ShmArena) -> Callable[[], None]:
        """A call that puts ``arena`` back among the free ones, on this client's event loop, once."""
        loop = asyncio.get_running_loop()
        pending = [arena]

        def give_back(held: ShmArena) -> None:
            if held in self._arenas:  # (close() took them all: nothing to give back)
                self._free.append(held)

        def release() -> None:
            if pending:
                try:
                    loop.call_soon_threadsafe(give_back, pending.pop())
                except RuntimeError:
                    pass  # the loop is closed: so is the client, and its regions are gone

        return release

    async def prepare(self, model: str, inputs: dict[str, np.ndarray], count: int, *, version: str | None = None,
                      outputs: list[str] | None = None, pin_wait_s: float = PREPARE_PIN_WAIT_S) -> None:
        """``count`` regions, each large enough for a call with ``inputs``, made and registered now, for
        the calls to come. A GPU worker page-locks each while its device is idle: CUDA's page-locking waits
        for the work in flight on the device, so a region first registered under load serves from pageable
        memory until a gap in the device's work (on an H200 a batch job's runs took 5.8 ms against 8 ms
        unpinned and 4.2-4.8 ms on the shared-memory paths). Each registration waits up to ``pin_wait_s``."""
        _, output_specs = await self._wanted(model, version, outputs)
        nbytes = plan_request("", inputs, output_specs, batch_rows(inputs)).byte_size
        arenas = [self._new_arena(pin_wait_s) for _ in range(count)]
        made = await asyncio.gather(*(asyncio.to_thread(arena.ensure, nbytes) for arena in arenas), return_exceptions=True)
        for arena in arenas:
            if arena.region:
                self._free.append(arena)
            else:  # its registration failed: nothing to release
                self._arenas.remove(arena)
        failed = [m for m in made if isinstance(m, BaseException)]
        if failed:
            raise failed[0]

    def _new_arena(self, pin_wait_s: float = 0.0) -> ShmArena:
        """``pin_wait_s``: for its first registration (a prepared region), not for a larger one later."""
        controller = self.plane.controller
        waits = [pin_wait_s]

        def register(name: str, key: str, size: int) -> None:
            wait_s = waits.pop() if waits else 0.0
            self.plane.region_mapped(name, get(controller.register_shm.remote(name, key, 0, size, wait_s)))

        def unregister(name: str) -> None:
            self.plane.region_gone(name)
            get(controller.unregister_shm.remote(name))

        arena = ShmArena(register, unregister)
        self._arenas.append(arena)
        return arena

    def region_setups(self) -> list[RegionSetup]:
        """What each shared memory object this client created cost before it served (until ``close()``)."""
        return [setup for arena in self._arenas for setup in arena.setups]

    async def _wanted(self, model: str, version: str | None, outputs: list[str] | None) -> tuple[list[str], list[dict]]:
        """The names of the outputs asked for (None: all of them) and their specs, from the model's metadata."""
        specs = self._output_specs.get((model, version))
        if specs is None:
            specs = self._output_specs[(model, version)] = (await self.plane.metadata(model, version))["outputs"]
        wanted = outputs or [s["name"] for s in specs]
        return wanted, [s for s in specs if s["name"] in wanted]

    async def _infer_shm(self, arena: ShmArena, model: str, inputs: dict[str, np.ndarray], version: str | None,
                         outputs: list[str] | None, big: bool, in_place: bool = False) -> Answer:
        arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        wanted, output_specs = await self._wanted(model, version, outputs)
        # Large copies (and a new region's registration, a blocking Ray call) off the event loop: other
        # calls in flight go on meanwhile, and numpy copies without the GIL. Small ones cost less than the hop.
        def place() -> ShmPlan:
            return arena.place(arrays, output_specs, batch_rows(arrays))

        plan = await asyncio.to_thread(place) if big or not arena.region else place()
        rest = {n: a for n, a in arrays.items() if n not in plan.inputs}
        request = InferRequest(rest, outputs=[RequestedOutput(n, binary=True, shm=plan.outputs.get(n)) for n in wanted],
                               shm_inputs=plan.inputs)
        answer = await self._over_http(model, version, request, rest, wanted, plan)
        if answer is None:  # through Ray: routed, loaded on a miss and retried as the ingress does
            served = await self.plane.serve(model, version, request)
            answer = (served.parameters,
                      {n: np.asarray(o) for n, o in served.outputs.items() if not isinstance(o, ShmWritten)},
                      [(n, o.datatype, list(o.shape)) for n, o in served.outputs.items() if isinstance(o, ShmWritten)])
        parameters, result, written = answer

        def read() -> dict[str, np.ndarray]:
            return {n: arena.read(plan.outputs[n], datatype, shape, copy=not in_place) for n, datatype, shape in written}

        result.update(await asyncio.to_thread(read) if big and not in_place else read())
        return Answer({n: result[n] for n in wanted if n in result}, parameters)

    async def _over_http(self, model: str, version: str | None, request: InferRequest, rest: dict[str, np.ndarray],
                         wanted: list[str], plan: ShmPlan) -> tuple[dict, dict, list] | None:
        """The request to its worker's own KServe v2 endpoint (what the front door does): only the
        tensors' descriptions travel, a few hundred bytes, without Ray's per-call work on either side.
        None where that cannot answer it (no worker holds the model yet, the worker went away or lost
        the engine, the endpoint wants a token this client lacks): the caller takes the Ray path."""
        if not self._http:
            return None
        choice = await self.plane.choose(model, version, request)
        address = self.plane.http_addresses.get(choice.worker_id) if choice is not None else None
        if choice is None or address is None:
            return None
        body, headers = encode_request(rest, binary=True, outputs=wanted, shm_inputs=plan.inputs,
                                       shm_outputs=plan.outputs)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        url = f"http://{address[0]}:{address[1]}{infer_path(model, version)}"
        self.plane.router.begin(choice.worker_id)
        try:
            async with self._session().post(url, data=body, headers=headers) as resp:
                content = await resp.read()
                status, error_type = resp.status, resp.headers.get(ERROR_TYPE_HEADER)
                header_length = resp.headers.get(HEADER_LENGTH)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return None  # the Ray path finds out what happened to the worker, and retries elsewhere
        finally:
            self.plane.router.end(choice.worker_id)
        if status != 200:
            try:
                raise_for_answer(status, content, error_type)
            except (NotReady, WorkerLost):
                return None
            except Unauthorized:
                self._http = False  # for good: the token will not appear
                return None
        header, received = decode_response(content, header_length)
        self.calls_over_http += 1
        return header.get("parameters", {}), dict(received), written_outputs(header, received)

    def _session(self) -> aiohttp.ClientSession:
        if self._http_session is None or self._http_session.closed:
            self._http_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._http_session

    async def close(self) -> None:
        """Unregister and unlink this client's regions."""
        if self._http_session is not None:
            await self._http_session.close()
        arenas, self._arenas, self._free = self._arenas, [], []

        async def release(arena: ShmArena) -> None:
            try:
                await asyncio.to_thread(arena.release)
            except FleetError:
                pass  # the fleet is gone: release() unlinked the object anyway

        # All at once: a batch job ends holding 24 regions of 128 MB, each unpinned and unmapped by the workers.
        await asyncio.gather(*(release(arena) for arena in arenas))

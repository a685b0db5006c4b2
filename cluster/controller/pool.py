"""The controller's worker pool: start one worker per device, check their health, replace the dead.

Each worker is a Ray actor pinned to one device (``num_gpus=1``, ``num_cpus=0`` so many
fit). The pool keeps what each worker said of itself (``WorkerInfo``, once) and its
latest ``WorkerHealth`` (every second); the controller builds the inventory from them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import time

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.actor import FleetWorker, WorkerSpec
from workers.devices import Device
from workers.errors import FleetError, NotReady
from workers.grpc_server import GrpcOptions
from workers.http import HttpOptions
from workers.kserve.handler import InferPolicy
from workers.messages import WorkerHealth, WorkerInfo

from cluster.calls import call
from cluster.config import Endpoints, FleetConfig
from cluster.controller.events import EventLog
from cluster.forward import GrpcMissForwarder, IngressForwarder
from cluster.inventory import WorkerRecord
from cluster.names import GPU_LABEL, NODE_LABEL
from cluster.runtime_envs import PIP_TIMEOUT_S, prepare_environment
from cluster.net import is_loopback, is_wildcard

log = logging.getLogger("forward-fleet.pool")

WORKER_START_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 30
WORKER_MAX_CONCURRENCY = 64


class RayFleetWorker(FleetWorker):
    """FleetWorker plus what only the fleet knows: its node's address, where misses go, and how to
    read an artifact the controller sent through Ray's object store."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec, read_object=ray.get)

    def serve_http(self, options: HttpOptions, ingress_url: str, grpc: GrpcOptions | None = None,
                   grpc_front: str | None = None) -> WorkerInfo:
        """Start the worker's own endpoints (HTTP; gRPC too when the fleet serves gRPC: its misses go
        back to the fleet's gRPC port, ``grpc_front``)."""
        self.start_http(options, on_miss=IngressForwarder(ingress_url))
        if grpc is not None:
            self.start_grpc(grpc, on_miss=GrpcMissForwarder(grpc_front) if grpc_front else None)
        info = self.info()
        node = ray.util.get_node_ip_address()
        for name in ("http", "grpc"):
            address = getattr(info, name)
            if address is not None and is_wildcard(address[0]):
                info = dataclasses.replace(info, **{name: (node, address[1])})
        return info


WorkerActor = ray.remote(RayFleetWorker)
_prepare = ray.remote(prepare_environment)


@dataclass
class _Member:
    spec: WorkerSpec
    options: dict  # Ray actor options
    handle: ray.actor.ActorHandle | None = None
    info: WorkerInfo | None = None
    health: WorkerHealth | None = None
    alive: bool = False
    replacing: bool = False

    def record(self) -> WorkerRecord | None:
        if self.info is None or self.health is None:
            return None
        return WorkerRecord(self.info, self.health, self.alive)


def plan_workers(config: FleetConfig) -> list[tuple[WorkerSpec, dict]]:
    """One worker per declared (simulated) GPU, and per GPU (or CPU) of every other Ray node."""
    common = dict(memory_fraction=config.memory_fraction, reserve_bytes=config.reserve_bytes, slots=config.slots,
                  intra_op_threads=config.intra_op_threads, cache_bytes=config.artifact_cache_bytes)
    base = {"num_cpus": 0, "max_concurrency": WORKER_MAX_CONCURRENCY}
    plan = []
    profiles = config.runtime_profiles()
    for node in config.nodes:
        devices = node.simulated_devices()
        for i, _ in enumerate(node.gpus):
            profile = profiles.for_device(devices[i])
            spec = WorkerSpec(worker_id=f"{node.name}-gpu{i}", node_name=node.name,
                              simulated_devices=devices, simulated_runtimes=node.simulated_runtimes(),
                              simulated_budgets=tuple(g.budget for g in node.gpus), labels=dict(node.labels),
                              environment=profile.packages(simulated=True) if profile else (), **common)
            plan.append((spec, dict(base, num_gpus=1, label_selector={NODE_LABEL: node.name})))
    if not config.discover_nodes:
        return plan
    for node in ray.nodes():
        if not node.get("Alive") or NODE_LABEL in (node.get("Labels") or {}):
            continue
        short = node.get("NodeManagerAddress", "node") + "-" + node["NodeID"][:6]
        pinned = dict(base, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
        gpus = int(node.get("Resources", {}).get("GPU", 0))
        # a real host's GPU type comes from its node label (`ray start --labels fleet.gpu=T4`)
        label = (node.get("Labels") or {}).get(GPU_LABEL)
        profile = profiles.for_device(Device(label, "", "gpu", None, 0)) if label else None
        environment = profile.packages(simulated=False) if profile else ()
        for i in range(gpus):
            plan.append((WorkerSpec(worker_id=f"{short}-gpu{i}", node_name=short, environment=environment, **common),
                         dict(pinned, num_gpus=1)))
        if not gpus:
            spec = WorkerSpec(worker_id=f"{short}-cpu", node_name=short, budget_bytes=config.cpu_budget, **common)
            plan.append((spec, pinned))
    return plan


class WorkerPool:
    def __init__(self, config: FleetConfig, endpoints: Endpoints, events: EventLog, on_change: Callable[[], None],
                 on_started: Callable[[str], Awaitable[None]]) -> None:
        """``on_change``: the inventory changed; ``on_started``: a worker (re)started (replay its state)."""
        self.config = config
        self.endpoints = endpoints
        self.events = events
        self._on_change = on_change
        self._on_started = on_started
        self._members: dict[str, _Member] = {}
        self.restarts = 0

    # ---- views ---------------------------------------------------------------
    def records(self) -> tuple[WorkerRecord, ...]:
        return tuple(r for m in self._members.values() if (r := m.record()) is not None)

    def handles(self) -> dict[str, ray.actor.ActorHandle]:
        return {wid: m.handle for wid, m in self._members.items() if m.handle is not None}

    def handle(self, worker_id: str) -> ray.actor.ActorHandle:
        handle = self._members[worker_id].handle
        if handle is None:
            raise NotReady(f"worker {worker_id} is not running")
        return handle

    def live(self) -> list[str]:
        return [wid for wid, m in self._members.items() if m.alive and m.handle is not None]

    def info(self, worker_id: str) -> WorkerInfo | None:
        return self._members[worker_id].info

    # ---- starting -------------------------------------------------------------
    async def start(self, ingress_url: str, grpc_front: str | None = None) -> None:
        """Start every worker; ``grpc_front``: the fleet's gRPC address, where workers pass on their gRPC misses."""
        self._ingress_url = ingress_url
        self._grpc_front = grpc_front
        for spec, options in plan_workers(self.config):
            self._members[spec.worker_id] = _Member(spec, options)
        await self._prepare_environments()
        await asyncio.gather(*(self._start(wid) for wid in self._members))

    async def _prepare_environments(self) -> None:
        """Each GPU type's Python environment, prepared on each node that needs it (once per host: cached)
        and given to its workers as their runtime_env. One that fails is reported; its workers start in
        the fleet's own environment, and what they really have is what they report (probe, don't declare)."""
        jobs: dict[tuple, list[_Member]] = {}
        for member in self._members.values():
            if member.spec.environment:
                where = member.options.get("label_selector") or member.options.get("scheduling_strategy")
                jobs.setdefault((repr(where), member.spec.environment), []).append(member)

        async def prepare(members: list[_Member]) -> None:
            first = members[0]
            placement = {k: v for k, v in first.options.items() if k in ("label_selector", "scheduling_strategy")}
            t0 = time.monotonic()
            try:
                python = await asyncio.wait_for(call(_prepare.options(num_cpus=0, **placement).remote(
                    first.spec.environment)), PIP_TIMEOUT_S + 60)
            except (FleetError, asyncio.TimeoutError, RayError) as exc:
                self.events.add("runtime-env-failed", node=first.spec.node_name, packages=list(first.spec.environment),
                                reason=getattr(exc, "message", None) or str(exc) or type(exc).__name__)
                return
            self.events.add("runtime-env-ready", node=first.spec.node_name, packages=list(first.spec.environment),
                            seconds=round(time.monotonic() - t0, 1))
            for member in members:
                member.options = dict(member.options, runtime_env={"py_executable": python})

        await asyncio.gather(*(prepare(members) for members in jobs.values()))

    def _http_options(self) -> HttpOptions:
        cfg = self.config
        policy = InferPolicy(cfg.max_request_bytes, cfg.auth_token, cfg.auth_inference)
        # One-host fleets stay on loopback; on many hosts the front door reaches workers by node IP.
        return HttpOptions(host="127.0.0.1" if is_loopback(cfg.host) else "0.0.0.0", policy=policy)

    def _grpc_options(self) -> GrpcOptions | None:
        """The workers' own gRPC endpoints, when the fleet serves gRPC (through its front door)."""
        if self.config.grpc_port is None or not self.endpoints.front_door:
            return None
        http = self._http_options()
        return GrpcOptions(host=http.host, policy=http.policy)

    async def _start(self, worker_id: str) -> None:
        member = self._members[worker_id]
        spec = member.spec
        handle = WorkerActor.options(**member.options).remote(spec)
        try:
            if self.endpoints.front_door:
                info = await asyncio.wait_for(call(handle.serve_http.remote(
                    self._http_options(), self._ingress_url, self._grpc_options(), self._grpc_front)),
                    WORKER_START_TIMEOUT_S)
            else:
                info = await asyncio.wait_for(call(handle.info.remote()), WORKER_START_TIMEOUT_S)
            health = await call(handle.health.remote())
        except asyncio.TimeoutError:
            ray.kill(handle)
            where = f"node labelled {NODE_LABEL}={spec.node_name}" if spec.simulated_devices else spec.node_name
            raise NotReady(f"worker {worker_id} could not be placed on {where} within {WORKER_START_TIMEOUT_S} s; "
                           f"is that node up with a free GPU slot?") from None
        member.handle, member.info, member.health, member.alive = handle, info, health, True
        await self._on_started(worker_id)
        self._on_change()

    # ---- health ----------------------------------------------------------------
    async def refresh(self, worker_id: str) -> None:
        """Read a worker's health now (after a load or unload); a dead worker is replaced."""
        await self.check(worker_id)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(wid) for wid in list(self._members)))

    async def check(self, worker_id: str) -> bool:
        """Ask the worker's health; if it is gone, mark it dead and replace it in the background."""
        member = self._members[worker_id]
        if member.handle is None or member.replacing:
            return False
        handle = member.handle
        try:
            health = await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError):
            self._lost(worker_id, handle)
            return False
        if member.handle is not handle or member.replacing:
            return False  # another check (the periodic one, a refresh after a failed request) got here first
        if health.broken:  # a sticky CUDA error: the process lives on but computes no more
            self.events.add("worker-device-failed", worker=worker_id, reason=health.broken)
            self._lost(worker_id, handle)
            return False
        if health.gpu_unhealthy:  # the GPU itself (ECC, Xid): a new process would fail the same way
            if member.alive:
                self.events.add("gpu-unhealthy", worker=worker_id, reason=health.gpu_unhealthy)
                log.error("worker %s taken out of service: %s", worker_id, health.gpu_unhealthy)
                member.alive = False
                member.health = dataclasses.replace(health, loaded=frozenset(), used_bytes=0)
                self._on_change()
            return False
        if health != member.health:
            member.health = health
            self._on_change()
        else:
            member.health = health  # counters move without changing the inventory
        return True

    def _lost(self, worker_id: str, handle) -> None:
        member = self._members[worker_id]
        if member.handle is not handle or member.replacing:
            # Concurrent checks of one dead worker: one replacement only (a second would start
            # another actor on the same GPU and leave it holding the slot).
            return
        self.events.add("worker-lost", worker=worker_id)
        member.alive = False
        if member.health is not None:
            member.health = dataclasses.replace(member.health, loaded=frozenset(), used_bytes=0)
        member.replacing = True
        self._on_change()
        asyncio.get_running_loop().create_task(self._replace(worker_id, member.handle))

    async def _replace(self, worker_id: str, handle) -> None:
        # In the background: placing a worker on a lost node can wait a long time, and
        # the health of the other workers must not wait with it.
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
        try:
            await self._start(worker_id)
            self.restarts += 1
            self.events.add("worker-replaced", worker=worker_id)
        except FleetError as exc:
            self.events.add("worker-replace-failed", worker=worker_id, reason=exc.message)
        finally:
            self._members[worker_id].replacing = False

    def coming_back(self, worker_id: str) -> bool:
        """Whether a lost worker is being replaced on a node that is alive (so it should be back soon)."""
        member = self._members.get(worker_id)
        if member is None or not member.replacing:
            return False
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            if (node.get("Labels") or {}).get(NODE_LABEL) == member.spec.node_name:
                return True
            strategy = member.options.get("scheduling_strategy")
            if isinstance(strategy, NodeAffinitySchedulingStrategy) and strategy.node_id == node["NodeID"]:
                return True
        return False

    async def stats(self) -> dict[str, dict]:
        """Every live worker's status view (``FleetWorker.stats``), asked at once."""
        live = self.live()
        answers = await asyncio.gather(*(self._members[w].handle.stats.remote() for w in live), return_exceptions=True)
        return {w: a for w, a in zip(live, answers) if isinstance(a, dict)}

    async def shutdown(self) -> None:
        for member in self._members.values():
            if member.handle is None:
                continue
            try:
                await member.handle.shutdown.remote()
            except Exception:
                pass
            ray.kill(member.handle, no_restart=True)
            member.handle, member.alive = None, False

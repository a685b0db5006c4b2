"""The controller's worker pool: start one worker per device, check their health, replace the dead.

Each worker is a Ray actor pinned to one device (``num_gpus=1``, ``num_cpus=0`` so many
fit). The pool keeps what each worker said of itself (``WorkerInfo``, once) and its
latest ``WorkerHealth`` (every second); the controller builds the inventory from them.

A worker is in one state (``_Member.state``): ``up``; ``unreachable`` (its health went
unanswered for UNREACHABLE_AFTER_S: out of the fleet's own routing, kept as a server by
the front door, whose checks take it back when its host answers again); ``replacing`` (its
process died); ``waiting for its host`` (its node is not in the cluster: not joined yet,
left, or dead); ``draining`` (its host is leaving); ``out of service`` (its GPU is bad).
Hosts joining, leaving and dying: ``watch_hosts`` (the cluster's nodes) and ``drain``; one worker
restarted on a new runtime without failing a request: ``roll``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.actor import WorkerSpec
from workers.errors import FleetError, NotReady
from workers.grpc_server import GrpcOptions
from workers.http import HttpOptions
from workers.kserve.handler import InferPolicy
from workers.messages import WorkerHealth, WorkerInfo

from cluster.calls import call
from cluster.config import Endpoints, FleetConfig
from cluster.controller.draining import OUT, REPLACING, UNREACHABLE, UP, WAITING, Draining, stop_worker
from cluster.controller.environments import prepare_environments
from cluster.controller.events import EventLog
from cluster.controller.plan import WorkerActor, discoverable, host_state, plan_node, plan_workers
from cluster.inventory import WorkerRecord
from cluster.names import NODE_LABEL

log = logging.getLogger("forward-fleet.pool")

WORKER_START_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 30
UNREACHABLE_AFTER_S = 5.0  # a health call unanswered this long: out of the routes until it answers
HUNG_AFTER_S = 90.0  # unanswered this long while Ray still counts its node alive: replaced (Ray's own wait is ~60 s)



@dataclass
class _Member:
    spec: WorkerSpec
    options: dict  # Ray actor options
    handle: ray.actor.ActorHandle | None = None
    info: WorkerInfo | None = None
    health: WorkerHealth | None = None
    state: str = WAITING
    since: float = 0.0  # when it entered its state (time.monotonic)
    node_id: str | None = None  # the Ray node it runs (or last ran) on
    discovered: bool = False  # planned for a node Ray found (not a declared one): gone with its node
    joined: bool = False  # started on a host that joined after the fleet started
    pending: asyncio.Future | None = None  # its health call in flight
    asked: float = 0.0  # when that call was made

    @property
    def alive(self) -> bool:
        return self.state == UP

    def record(self) -> WorkerRecord | None:
        if self.info is None or self.health is None:
            return None
        return WorkerRecord(self.info, self.health, self.alive, self.state)


class WorkerPool(Draining):
    def __init__(self, config: FleetConfig, endpoints: Endpoints, events: EventLog, on_change: Callable[[], None],
                 on_started: Callable[[str], Awaitable[None]]) -> None:
        """``on_change``: the inventory changed; ``on_started``: a worker (re)started (replay its state,
        load what the fleet serves)."""
        self.config = config
        self.endpoints = endpoints
        self.events = events
        self._on_change = on_change
        self._on_started = on_started
        self._members: dict[str, _Member] = {}
        self._left: set[str] = set()  # Ray node ids drained for leaving: none of their workers start again
        self._nodes: dict[str, dict] = {}  # the latest ray.nodes(), by node id
        self._started = False
        self._tasks: set[asyncio.Task] = set()
        self.restarts = 0
        self.tensorrt: dict[str, str] = {}  # node name -> the TensorRT release it was upgraded to (fleet upgrade)

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

    def of_node(self, node_name: str) -> dict[str, _Member]:
        """The workers planned for a node (its name in the config, or a found host's), by worker id."""
        return {wid: m for wid, m in sorted(self._members.items()) if m.spec.node_name == node_name}

    def node_names(self) -> list[str]:
        return sorted({m.spec.node_name for m in self._members.values()})

    def hosts(self) -> list[dict]:
        """Every host (Ray node) the fleet has or had workers on: its address, whether Ray counts it
        alive, and its workers' states (for ``fleet status``)."""
        hosts: dict[str, dict] = {}
        for wid, m in sorted(self._members.items()):
            if m.node_id is None:
                key, node = f"({m.spec.node_name})", {}
            else:
                key, node = m.node_id, self._nodes.get(m.node_id, {})
            host = hosts.setdefault(key, {
                "node_id": m.node_id, "name": m.spec.node_name, "address": node.get("NodeManagerAddress"),
                "state": host_state(m.node_id, node, self._left), "joined": m.joined, "workers": {}})
            host["workers"][wid] = m.state
        return list(hosts.values())

    # ---- states --------------------------------------------------------------
    def _set(self, worker_id: str, state: str, event: str | None = None, **fields) -> None:
        member = self._members[worker_id]
        if member.state == state:
            return
        member.state, member.since = state, time.monotonic()
        if state not in (UP, UNREACHABLE) and member.health is not None:
            # nothing of it is routable: its engines are gone or out of reach
            member.health = dataclasses.replace(member.health, loaded=frozenset(), used_bytes=0)
        if event:
            self.events.add(event, worker=worker_id, **fields)
        self._on_change()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- starting -------------------------------------------------------------
    async def start(self, ingress_url: str, grpc_front: str | None = None, head_address: str | None = None) -> None:
        """Start every worker whose host is in the cluster; the others wait for theirs to join.
        ``grpc_front``: the fleet's gRPC address, where workers pass on their gRPC misses;
        ``head_address``: the head's node address (workers there listen on loopback)."""
        self._ingress_url = ingress_url
        self._grpc_front = grpc_front
        self._head_address = head_address
        for spec, options in plan_workers(self.config, self.tensorrt):
            self._members[spec.worker_id] = _Member(spec, options, discovered=not spec.simulated_devices)
        await self._read_nodes()
        # each GPU type's environment on the nodes up now (hosts that join later: the fleet's own, for now)
        await prepare_environments([m for m in self._members.values() if self._node_for(m) is not None], self.events)
        starting = []
        for wid, member in self._members.items():
            node = self._node_for(member)
            if node is None:
                self.events.add("waiting-for-host", worker=wid, host=member.spec.node_name)
            else:
                starting.append(self._start(wid, node["NodeID"]))
        await asyncio.gather(*starting)
        self._started = True

    async def _read_nodes(self) -> bool:
        """``ray.nodes()`` (the GCS), off the event loop; False when it does not answer."""
        try:
            nodes = await asyncio.wait_for(asyncio.to_thread(ray.nodes), 10)
        except Exception:  # noqa: BLE001 (the GCS is down or slow: keep the last view)
            return False
        self._nodes = {n["NodeID"]: n for n in nodes}
        return True

    def _node_for(self, member: _Member) -> dict | None:
        """The live node this member's worker belongs on, if it is in the cluster (and not leaving)."""
        strategy = member.options.get("scheduling_strategy")
        for node in self._nodes.values():
            if not node.get("Alive") or node["NodeID"] in self._left:
                continue
            if isinstance(strategy, NodeAffinitySchedulingStrategy):
                if strategy.node_id == node["NodeID"]:
                    return node
            elif (node.get("Labels") or {}).get(NODE_LABEL) == member.spec.node_name:
                return node
        return None

    def _http_options(self) -> HttpOptions:
        cfg = self.config
        # On the network (other hosts) a worker's endpoint takes no request without the fleet's token;
        # the front door adds it to what it passes on (routes.render_config's worker_token).
        policy = InferPolicy(cfg.max_request_bytes, cfg.auth_token, cfg.auth_inference or cfg.auth_token is not None)
        # host None: the worker binds its node's own address
        return HttpOptions(host=None, policy=policy, loops=cfg.worker_http_loops)

    def _grpc_options(self) -> GrpcOptions | None:
        """The workers' own gRPC endpoints, when the fleet serves gRPC (through its front door)."""
        if self.config.grpc_port is None or not self.endpoints.front_door:
            return None
        http = self._http_options()
        return GrpcOptions(host=http.host, policy=http.policy)

    async def _start(self, worker_id: str, node_id: str | None = None) -> None:
        member = self._members[worker_id]
        spec = member.spec
        member.state, member.since = REPLACING, time.monotonic()
        handle = WorkerActor.options(**member.options).remote(spec)
        try:
            if self.endpoints.front_door:
                info = await asyncio.wait_for(call(handle.serve_http.remote(
                    self._http_options(), self._ingress_url, self._grpc_options(), self._grpc_front,
                    self._head_address)), WORKER_START_TIMEOUT_S)
            else:
                info = await asyncio.wait_for(call(handle.info.remote()), WORKER_START_TIMEOUT_S)
            health = await call(handle.health.remote())
        except (asyncio.TimeoutError, RayActorError) as exc:
            ray.kill(handle, no_restart=True)
            member.state = WAITING
            where = f"node labelled {NODE_LABEL}={spec.node_name}" if spec.simulated_devices else spec.node_name
            why = "did not start" if isinstance(exc, RayActorError) else f"was not up within {WORKER_START_TIMEOUT_S} s"
            raise NotReady(f"worker {worker_id} could not be placed on {where} ({why}); "
                           f"is that node up with a free GPU slot?") from None
        member.handle, member.info, member.health = handle, info, health
        member.node_id = info.node_id or node_id
        member.joined = self._started
        member.pending = None
        self._set(worker_id, UP)
        await self._on_started(worker_id)
        self._on_change()

    async def _start_in_background(self, worker_id: str, event: str) -> None:
        try:
            await self._start(worker_id, None)
            self.events.add(event, worker=worker_id, node=self._members[worker_id].node_id)
        except FleetError as exc:
            self.events.add("worker-start-failed", worker=worker_id, reason=exc.message)

    # ---- hosts joining, leaving, dying ----------------------------------------------
    async def watch_hosts(self) -> None:
        """Follow the cluster's nodes (each health period, while the GCS answers): start the workers
        of a host that joined, take out those of a host Ray counts dead, plan workers for a new
        undeclared host (``discover_nodes``)."""
        if not await self._read_nodes():
            return
        alive = {nid for nid, n in self._nodes.items() if n.get("Alive")}
        self._left &= set(self._nodes)  # a node Ray forgot cannot come back under its id
        if self.config.discover_nodes:
            planned = {m.options["scheduling_strategy"].node_id for m in self._members.values()
                       if isinstance(m.options.get("scheduling_strategy"), NodeAffinitySchedulingStrategy)}
            for nid in sorted(alive - planned - self._left):
                if discoverable(self._nodes[nid]):
                    for spec, options in plan_node(self.config, self._nodes[nid], self.tensorrt):
                        self._members[spec.worker_id] = _Member(spec, options, discovered=True)
                        self.events.add("host-joined", host=spec.node_name, node=nid)
        for wid, member in list(self._members.items()):
            if member.node_id is not None and member.node_id not in alive and member.state in (UP, UNREACHABLE, OUT):
                self._host_gone(wid)
            if member.discovered and member.state == WAITING and member.node_id is not None \
                    and member.node_id not in alive:
                del self._members[wid]  # planned for that node alone: it will not come back as such
                self._on_change()
                continue
            if member.state == WAITING and time.monotonic() >= member.since:
                node = self._node_for(member)
                if node is not None:
                    member.state, member.since = REPLACING, time.monotonic()  # not started twice
                    self._spawn(self._start_in_background(wid, "worker-joined"))

    def _host_gone(self, worker_id: str) -> None:
        member = self._members[worker_id]
        handle, member.handle, member.pending = member.handle, None, None
        self._set(worker_id, WAITING, "host-lost", node=member.node_id,
                  address=self._nodes.get(member.node_id or "", {}).get("NodeManagerAddress"))
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 (its node is gone: nothing to kill)
                pass

    # ---- health ----------------------------------------------------------------
    async def refresh(self, worker_id: str) -> None:
        """Read a worker's health now (after a load or unload); a dead worker is replaced."""
        await self.check(worker_id)

    async def check_all(self, wait_s: float = 1.0) -> None:
        """Every worker's health, waiting at most ``wait_s`` (a call to a host out of reach stays pending)."""
        await asyncio.gather(*(self.check(wid, wait_s) for wid in list(self._members)))

    async def check(self, worker_id: str, wait_s: float = HEALTH_TIMEOUT_S) -> bool:
        """Ask the worker's health. Unanswered for UNREACHABLE_AFTER_S: unreachable (out of the fleet's
        routing until it answers); dead (or hung with its node alive): replaced in the background."""
        member = self._members.get(worker_id)
        if member is None or member.handle is None or member.state not in (UP, UNREACHABLE, OUT):
            return False
        handle = member.handle
        if member.pending is None:
            member.pending = asyncio.ensure_future(member.handle.health.remote())
            member.asked = time.monotonic()
        pending = member.pending
        done, _ = await asyncio.wait({pending}, timeout=wait_s)
        if member.pending is not pending:  # another check took the answer, or the worker changed
            return member.alive
        if not done:
            waited = time.monotonic() - member.asked
            if member.state == UP and waited >= UNREACHABLE_AFTER_S:
                self._set(worker_id, UNREACHABLE, "worker-unreachable", node=member.node_id, waited_s=round(waited, 1))
            elif waited >= HUNG_AFTER_S and member.node_id in self._nodes and self._nodes[member.node_id].get("Alive"):
                self._lost(worker_id, handle)
            return False
        member.pending = None
        try:
            health = pending.result()
        except ActorUnavailableError:  # its host is out of reach for now (Ray says so itself)
            if member.state == UP:
                self._set(worker_id, UNREACHABLE, "worker-unreachable", node=member.node_id)
            return False
        except RayActorError:
            self._lost(worker_id, handle)
            return False
        if member.handle is not handle or member.state not in (UP, UNREACHABLE, OUT):
            return False  # another check (the periodic one, a refresh after a failed request) got here first
        if health.broken:  # a sticky CUDA error: the process lives on but computes no more
            self.events.add("worker-device-failed", worker=worker_id, reason=health.broken)
            self._lost(worker_id, handle)
            return False
        if health.gpu_unhealthy:  # the GPU itself (ECC, Xid): a new process would fail the same way
            if member.state != OUT:
                log.error("worker %s taken out of service: %s", worker_id, health.gpu_unhealthy)
                member.health = health
                self._set(worker_id, OUT, "gpu-unhealthy", reason=health.gpu_unhealthy)
            return False
        if member.state == UNREACHABLE:
            member.health = health
            self._set(worker_id, UP, "worker-reachable", node=member.node_id,
                      after_s=round(time.monotonic() - member.since, 1))
            return True
        if health != member.health:
            member.health = health
            self._on_change()
        else:
            member.health = health  # counters move without changing the inventory
        return True

    def _lost(self, worker_id: str, handle) -> None:
        member = self._members[worker_id]
        if member.handle is not handle or member.state == REPLACING:
            # Concurrent checks of one dead worker: one replacement only (a second would start
            # another actor on the same GPU and leave it holding the slot).
            return
        member.pending = None
        self._set(worker_id, REPLACING, "worker-lost")
        self._spawn(self._replace(worker_id, handle))

    async def _replace(self, worker_id: str, handle) -> None:
        # In the background: placing a worker on a lost node can wait a long time, and
        # the health of the other workers must not wait with it.
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
        await self._read_nodes()
        if self._node_for(self._members[worker_id]) is None:  # its host is gone: it starts when the host is back
            self._set(worker_id, WAITING, "host-lost", node=self._members[worker_id].node_id)
            return
        try:
            await self._start(worker_id)
            self.restarts += 1
            self.events.add("worker-replaced", worker=worker_id)
        except FleetError as exc:
            self.events.add("worker-replace-failed", worker=worker_id, reason=exc.message)
            self._members[worker_id].since = time.monotonic() + 10  # watch_hosts tries again after this

    def coming_back(self, worker_id: str) -> bool:
        """Whether a worker out of service now should be back soon: being replaced on a live node,
        or out of reach for the moment (its host's link)."""
        member = self._members.get(worker_id)
        if member is None:
            return False
        if member.state == UNREACHABLE:
            return True
        return member.state == REPLACING and self._node_for(member) is not None

    async def stats(self) -> dict[str, dict]:
        """Every live worker's status view (``FleetWorker.stats``), asked at once, a few seconds at most."""
        live = self.live()
        calls = [asyncio.wait_for(self._members[w].handle.stats.remote(), 5) for w in live]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return {w: a for w, a in zip(live, answers) if isinstance(a, dict)}

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for member in self._members.values():
            if member.handle is None:
                continue
            await stop_worker(member.handle)
            member.handle, member.state = None, WAITING

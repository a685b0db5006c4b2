"""The controller: starts one worker per device, owns the inventory, loads engines.

A detached async Ray actor (named ``fleet-controller``). Placement decisions
come from the pure ``Router``; the workers' own ledgers are the truth about what
is loaded, and the controller re-reads a worker's ledger after every change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.actor import FleetWorker, WorkerSpec
from workers.errors import (
    ArtifactCorrupt,
    FleetError,
    IncompatibleArtifact,
    ModelNotFound,
    NoCapacity,
    NotReady,
    SharedMemoryError,
)
from workers.ledger import format_bytes
from workers.manifest import Manifest
from workers.shm import RegionInfo
from workers.targets import WorkerCaps, can_run

from cluster.config import FleetConfig
from cluster.frontdoor import FrontDoor, routes_from
from cluster.names import NODE_LABEL, is_wildcard, local_address
from cluster.repository import Repository
from cluster.router import Router, WorkerState
from workers.stats import merge

log = logging.getLogger("forward-fleet.controller")

WORKER_START_TIMEOUT_S = 120
HEALTH_PERIOD_S = 1.0
WORKER_MAX_CONCURRENCY = 64


def unwrap(exc: BaseException) -> BaseException:
    """The exception a worker raised, without Ray's RayTaskError wrapper."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


async def call(ref):
    """Await a Ray call, re-raising the remote exception itself."""
    try:
        return await ref
    except RayTaskError as exc:
        raise unwrap(exc) from None


class RayFleetWorker(FleetWorker):
    """FleetWorker plus what only Ray knows: the address of the node it landed on."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()


WorkerActor = ray.remote(RayFleetWorker)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def worker_state(info: dict) -> WorkerState:
    ledger = info["ledger"]
    return WorkerState(
        caps=WorkerCaps.from_dict(info["caps"]),
        budget_bytes=ledger["budget_bytes"],
        used_bytes=ledger["used_bytes"],
        loaded=set(info["loaded"]),
    )


def apply_snapshot(router: Router, snap: dict) -> dict:
    """Feed a controller snapshot into ``router``; returns worker id -> actor handle."""
    states, handles = [], {}
    for w in snap["workers"]:
        state = worker_state(w["info"])
        state.alive = w["alive"] and w["handle"] is not None
        states.append(state)
        handles[state.worker_id] = w["handle"]
    router.set_inventory(states, [Manifest.from_dict(m) for m in snap["manifests"]])
    return handles


class FleetController:
    def __init__(self, config_json: str) -> None:
        self.config = FleetConfig.model_validate_json(config_json)
        self.repo = Repository(self.config.repository)
        self.router = Router()
        self._specs: dict[str, tuple[WorkerSpec, dict]] = {}
        self._handles: dict[str, ray.actor.ActorHandle] = {}
        self._info: dict[str, dict] = {}
        self._dirs: dict[str, str] = {}  # engine key -> artifact directory
        self._manifests: list[Manifest] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._epoch = 0
        self._events: list[dict] = []
        self._restarts = 0
        self._health_task: asyncio.Task | None = None
        self._started = False
        self._unloaded: set[str] = set()  # models unloaded through the repository API
        self._replacing: set[str] = set()  # workers being replaced in the background
        self._request_stats: dict[str, dict] = {}  # ingress replica -> its latest report
        self._front: FrontDoor | None = None  # HAProxy on the fleet's port, when config.serve_port is set
        self._http: dict[str, tuple[str, int]] = {}  # worker id -> its own HTTP endpoint
        # system shared memory: region name -> (what the client registered, workers that mapped it)
        self._shm: dict[str, tuple[RegionInfo, set[str]]] = {}

    # ---- start-up ----------------------------------------------------------
    def _plan_workers(self) -> list[tuple[WorkerSpec, dict]]:
        cfg = self.config
        common = dict(
            memory_fraction=cfg.memory_fraction,
            reserve_bytes=cfg.reserve_bytes,
            slots=cfg.slots,
            intra_op_threads=cfg.intra_op_threads,
        )
        base_opts = {"num_cpus": 0, "max_concurrency": WORKER_MAX_CONCURRENCY}
        plan = []
        for node in cfg.nodes:
            for i, _ in enumerate(node.gpus):
                spec = WorkerSpec(
                    worker_id=f"{node.name}-gpu{i}",
                    node_name=node.name,
                    simulated_devices=node.simulated_devices(),
                    simulated_runtimes=node.simulated_runtimes(),
                    simulated_budgets=tuple(g.budget for g in node.gpus),
                    labels=dict(node.labels),
                    **common,
                )
                opts = dict(base_opts, num_gpus=1, label_selector={NODE_LABEL: node.name})
                plan.append((spec, opts))
        if cfg.discover_nodes:
            for node in ray.nodes():
                if not node.get("Alive") or NODE_LABEL in (node.get("Labels") or {}):
                    continue
                node_id = node["NodeID"]
                short = node.get("NodeManagerAddress", "node") + "-" + node_id[:6]
                strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
                gpus = int(node.get("Resources", {}).get("GPU", 0))
                for i in range(gpus):
                    spec = WorkerSpec(worker_id=f"{short}-gpu{i}", node_name=short, **common)
                    plan.append((spec, dict(base_opts, num_gpus=1, scheduling_strategy=strategy)))
                if not gpus:
                    spec = WorkerSpec(worker_id=f"{short}-cpu", node_name=short, budget_bytes=cfg.cpu_budget, **common)
                    plan.append((spec, dict(base_opts, scheduling_strategy=strategy)))
        return plan

    async def start(self) -> dict:
        if self._started:
            return await self.status()
        plan = self._plan_workers()
        for spec, opts in plan:
            self._specs[spec.worker_id] = (spec, opts)
        await asyncio.gather(*(self._start_worker(spec.worker_id) for spec, _ in plan))
        self.rescan()
        await self._preload()
        if self.config.serve_port is not None:
            host = self.config.host
            self._front = FrontDoor(
                bind=(host, self.config.port),
                ingress=(local_address(host), self.config.serve_port),
                threads=max(1, min(4, (os.cpu_count() or 2) // 4)),
            )
            self._front.start(routes_from(self.router, self._http))
        self._started = True
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return await self.status()

    async def _start_worker(self, worker_id: str) -> None:
        spec, opts = self._specs[worker_id]
        handle = WorkerActor.options(**opts).remote(spec)
        try:
            info = await asyncio.wait_for(handle.describe.remote(), WORKER_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            ray.kill(handle)
            where = f"node labelled {NODE_LABEL}={spec.node_name}" if spec.simulated_devices else spec.node_name
            raise NotReady(
                f"worker {worker_id} could not be placed on {where} within {WORKER_START_TIMEOUT_S} s; "
                f"is that node up with a free GPU slot?"
            ) from None
        except RayTaskError as exc:
            raise unwrap(exc) from None
        if self.config.serve_port is not None:
            address = await handle.start_http.remote(self._http_options())
            host = address["host"]
            if is_wildcard(host):
                host = await handle.node_ip.remote()
            self._http[worker_id] = (host, address["port"])
        self._handles[worker_id] = handle
        self._info[worker_id] = info
        await self._replay_shm(worker_id)
        self._rebuild_router()

    def _ingress_url(self) -> str:
        host = self.config.host
        if is_wildcard(host):
            host = ray.util.get_node_ip_address()  # the controller runs on the head node, as Serve does
        return f"http://{host}:{self.config.serve_port}"

    def _http_options(self) -> dict:
        cfg = self.config
        return {
            # One-host fleets stay on loopback; on many hosts the front door reaches workers by node IP.
            "host": "127.0.0.1" if cfg.host in LOOPBACK else "0.0.0.0",
            "auth_token": cfg.auth_token,
            "auth_inference": cfg.auth_inference,
            "max_request_bytes": cfg.max_request_bytes,
            "reject_non_finite": sorted(m for m, mc in cfg.models.items() if mc.reject_non_finite),
            "fallback_url": self._ingress_url(),
        }

    def _rebuild_router(self) -> None:
        states = []
        for worker_id, info in self._info.items():
            state = worker_state(info)
            state.alive = info.get("alive", True)
            states.append(state)
        self.router.set_inventory(states, self._manifests)
        self._epoch += 1
        if self._front is not None:
            try:
                if self._front.update(routes_from(self.router, self._http)):
                    self._event("front-door-reload", routes=len(self._front.routes))
            except FleetError as exc:
                self._event("front-door-reload-failed", reason=exc.message)

    def rescan(self) -> dict[str, list[str]]:
        """Re-read the repository (after builds or on a miss)."""
        arts = self.repo.artifacts()
        self._manifests = [a.manifest for a in arts]
        self._dirs = {a.manifest.engine_key: str(a.directory) for a in arts}
        self._rebuild_router()
        return self.repo.models()

    async def _preload(self) -> None:
        for model, versions in self.router.models().items():
            if not self.config.model_config_for(model).preload:
                continue
            try:
                await self.ensure_loaded(model, versions[-1], allow_eviction=False)
            except FleetError as exc:
                self._event("preload-skipped", model=model, reason=exc.message)

    # ---- health ------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            for worker_id in list(self._handles):
                await self._check_worker(worker_id)

    async def _check_worker(self, worker_id: str) -> bool:
        """Describe the worker; if it is gone, mark it dead and start a replacement in the background."""
        handle = self._handles.get(worker_id)
        if handle is None or worker_id in self._replacing:
            return False
        try:
            info = await asyncio.wait_for(handle.describe.remote(), 30)
            self._info[worker_id] = info
            return True
        except (RayActorError, asyncio.TimeoutError):
            pass
        self._event("worker-lost", worker=worker_id)
        self._info[worker_id] = dict(self._info[worker_id], alive=False, loaded=[])
        self._rebuild_router()
        self._replacing.add(worker_id)
        asyncio.get_running_loop().create_task(self._replace(worker_id, handle))
        return False

    async def _replace(self, worker_id: str, handle) -> None:
        # In the background: placing a worker on a lost node can wait a long time, and
        # the health of the other workers must not wait with it.
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
        try:
            await self._start_worker(worker_id)
            self._restarts += 1
            self._event("worker-replaced", worker=worker_id)
        except FleetError as exc:
            self._event("worker-replace-failed", worker=worker_id, reason=exc.message)
        finally:
            self._replacing.discard(worker_id)

    async def report_dead(self, worker_id: str) -> None:
        """The ingress saw a worker die: check and replace it now."""
        await self._check_worker(worker_id)

    # ---- inventory for the ingress -----------------------------------------
    async def snapshot(self, since_epoch: int = -1) -> dict | None:
        if since_epoch == self._epoch:
            return None
        return {
            "epoch": self._epoch,
            "workers": [
                {"info": info, "alive": info.get("alive", True), "handle": self._handles.get(worker_id)}
                for worker_id, info in self._info.items()
            ],
            "manifests": [m.to_dict() for m in self._manifests],
            "shm": {name: sorted(workers) for name, (_, workers) in self._shm.items()},
        }

    def _event(self, kind: str, **fields) -> None:
        self._events.append({"time": time.time(), "event": kind, **fields})
        del self._events[:-200]

    # ---- loading -----------------------------------------------------------
    async def _refresh_worker(self, worker_id: str) -> None:
        self._info[worker_id] = await self._handles[worker_id].describe.remote()
        self._rebuild_router()

    def _resolve(self, model: str, version: str | None) -> str:
        try:
            return self.router.resolve(model, version)
        except ModelNotFound:
            self.rescan()  # a build may have published it since
            return self.router.resolve(model, version)

    async def ensure_loaded(
        self, model: str, version: str | None = None, allow_eviction: bool = True, explicit: bool = False
    ) -> dict:
        """Load the model where it fits (every compatible device with room; else evict on the best one).

        ``explicit`` (the repository API's load) also lifts an earlier explicit unload;
        on-demand loads from inference do not.
        """
        version = self._resolve(model, version)
        if explicit:
            self._unloaded.discard(model)
        elif model in self._unloaded:
            raise NotReady(
                f"model '{model}' was unloaded; load it with POST /v2/repository/models/{model}/load"
            )
        lock = self._locks.setdefault(f"{model}:{version}", asyncio.Lock())
        async with lock:
            placements = self.router.placement(model, version)  # raises NoCompatibleWorker
            # One engine of this model per worker: keep what is loaded, add where it fits.
            loaded_on = list(dict.fromkeys(
                c.worker_id for c in placements if c.manifest.engine_key in self.router.workers[c.worker_id].loaded
            ))
            problems = []
            refusals: list[FleetError] = []
            for choice in placements:
                state = self.router.workers[choice.worker_id]
                if choice.worker_id in loaded_on:
                    continue
                fits = state.free_bytes >= choice.manifest.footprint_bytes
                if not fits and (loaded_on or not allow_eviction):
                    continue
                try:
                    await self._handles[choice.worker_id].load.remote(
                        choice.manifest.to_dict(), self._dirs[choice.manifest.engine_key], self._batching(model)
                    )
                except RayTaskError as exc:
                    cause = unwrap(exc)
                    if isinstance(cause, (NoCapacity, IncompatibleArtifact, ArtifactCorrupt)):
                        problems.append(f"{choice.worker_id}: {cause}")
                        refusals.append(cause)
                        self._event("load-refused", worker=choice.worker_id, model=model, reason=str(cause))
                        await self._refresh_worker(choice.worker_id)
                        continue
                    raise cause from None
                except RayActorError:
                    problems.append(f"{choice.worker_id}: worker died")
                    await self._check_worker(choice.worker_id)
                    continue
                before = set(self._info[choice.worker_id]["loaded"])
                await self._refresh_worker(choice.worker_id)
                evicted = sorted(before - set(self._info[choice.worker_id]["loaded"]))
                self._event("load", worker=choice.worker_id, engine=choice.manifest.engine_key, evicted=evicted)
                loaded_on.append(choice.worker_id)
            if not loaded_on:
                kinds = {type(r) for r in refusals}
                if refusals and kinds <= {ArtifactCorrupt, IncompatibleArtifact}:
                    # not a capacity problem: say what is wrong with the artifacts themselves
                    raise refusals[0].__class__(f"model '{model}' version {version} could not be loaded: {'; '.join(problems)}")
                footprint = max(m.footprint_bytes for m in self.router.manifests(model, version))
                raise NoCapacity(
                    f"no capacity for model '{model}' version {version} ({format_bytes(footprint)}): "
                    f"{'; '.join(problems) or self.router.capacity_report(model, version)}"
                )
            return {"model": model, "version": version, "workers": loaded_on}

    def _batching(self, model: str) -> dict:
        cfg = self.config.model_config_for(model)
        return {"max_queue_delay_us": cfg.max_queue_delay_us, "preferred_batch_sizes": cfg.preferred_batch_sizes,
                "enabled": cfg.dynamic_batching, "trust_version_compatible": cfg.trust_version_compatible}

    async def unload(self, model: str, version: str | None = None) -> list[str]:
        """Evict the model from every worker. Returns the engine keys unloaded."""
        keys = {m.engine_key for m in self._manifests if m.model == model and (version is None or m.version == version)}
        if not keys and model not in self.router.models():
            raise ModelNotFound(f"model '{model}' is not in the repository")
        self._unloaded.add(model)
        done = []
        for worker_id, info in list(self._info.items()):
            for key in keys & set(info.get("loaded", [])):
                if await self._handles[worker_id].unload.remote(key):
                    done.append(key)
                    self._event("unload", worker=worker_id, engine=key)
            await self._refresh_worker(worker_id)
        return done

    # ---- system shared memory ------------------------------------------------
    async def register_shm(self, name: str, key: str, offset: int = 0, byte_size: int = 0) -> list[str]:
        """Register a client's region on every worker of the host that has the object.
        Returns the workers that mapped it."""
        if not self.config.allow_client_shm:
            raise SharedMemoryError(
                "system shared memory is off on this fleet: set allow_client_shm: true in the fleet config "
                "(workers then read and write the shared memory objects clients on their hosts name)"
            )
        info = RegionInfo.checked(name, key, offset, byte_size)  # before asking every worker
        if name in self._shm:
            raise SharedMemoryError(f"shared memory region '{name}' is already registered; unregister it first")
        live = [w for w, i in self._info.items() if i.get("alive", True) and w in self._handles]
        results = await asyncio.gather(
            *(self._handles[w].register_shm.remote(name, key, offset, byte_size) for w in live), return_exceptions=True)
        mapped = {w for w, r in zip(live, results) if r is True}
        if not mapped:
            problems = [unwrap(r) for r in results if isinstance(r, BaseException)]
            if problems:
                raise problems[0] if isinstance(problems[0], FleetError) else SharedMemoryError(str(problems[0]))
            hosts = sorted({self._info[w].get("host") or "?" for w in live})
            raise SharedMemoryError(
                f"shared memory object '{key}' does not exist on any host of the fleet ({', '.join(hosts)}); "
                f"system shared memory works only between processes of one host: create it there first"
            )
        self._shm[name] = (info, mapped)
        self._event("shm-register", region=name, key=key, workers=sorted(mapped))
        self._rebuild_router()  # a new epoch: ingress replicas learn who has the region
        return sorted(mapped)

    async def unregister_shm(self, name: str | None = None) -> list[str]:
        """Unregister one region (None: all). Unknown names are not an error, as in Triton."""
        names = list(self._shm) if name is None else [name] if name in self._shm else []
        for n in names:
            _, workers = self._shm.pop(n)
            await asyncio.gather(*(self._handles[w].unregister_shm.remote(n) for w in workers if w in self._handles),
                                 return_exceptions=True)
            self._event("shm-unregister", region=n)
        if names:
            self._rebuild_router()
        return names

    async def shm_status(self, name: str | None = None) -> list[dict]:
        if name is not None and name not in self._shm:
            raise SharedMemoryError(f"shared memory region '{name}' is not registered")
        return [info.to_dict() for n, (info, _) in sorted(self._shm.items()) if name in (None, n)]

    async def _replay_shm(self, worker_id: str) -> None:
        """A (re)started worker maps the regions it can, as the one it replaces had."""
        handle = self._handles[worker_id]
        for name, (info, workers) in self._shm.items():
            workers.discard(worker_id)
            try:
                if await handle.register_shm.remote(name, info.key, info.offset, info.byte_size):
                    workers.add(worker_id)
            except RayTaskError as exc:
                self._event("shm-replay-failed", worker=worker_id, region=name, reason=str(unwrap(exc)))

    # ---- status ------------------------------------------------------------
    async def status(self) -> dict:
        nodes: dict[str, dict] = {}
        for worker_id, info in sorted(self._info.items()):
            caps = WorkerCaps.from_dict(info["caps"])
            runnable = sorted(
                {f"{m.model}:{m.version}:{m.precision}" for m in self._manifests
                 if can_run(m, caps) and m.engine_key not in info["loaded"]}
            )
            node = nodes.setdefault(caps.node_id, {"node": caps.node_id, "host": info.get("host"), "workers": []})
            node["workers"].append(
                {
                    "worker_id": worker_id,
                    "alive": info.get("alive", True),
                    "device": caps.device.to_dict(),
                    "simulated": caps.device.simulated,
                    "runtimes": [r.to_dict() for r in caps.runtimes],
                    "budget_bytes": info["ledger"]["budget_bytes"],
                    "used_bytes": info["ledger"]["used_bytes"],
                    "ledger": info["ledger"]["entries"],
                    "counters": info.get("counters", {}),
                    "engines": info.get("engines", {}),
                    "nvml_used_bytes": info.get("nvml_used_bytes"),
                    "rss_bytes": info.get("rss_bytes"),
                    "runnable_not_loaded": runnable,
                }
            )
        return {
            "fleet": self.config.name,
            "simulated": self.config.simulated,
            "epoch": self._epoch,
            "restarts": self._restarts,
            "nodes": list(nodes.values()),
            "models": self.router.models(),
            # models TensorRT's parser refused, served by ONNX Runtime (fallback: onnxruntime)
            "fallbacks": {f"{m.model}:{m.version}:{m.precision}": m.build_options["fallback_reason"]
                          for m in self._manifests if m.build_options.get("fallback_reason")},
            "front_door": self._front.describe() if self._front is not None else None,
            "events": self._events[-50:],
        }

    async def report_request_stats(self, replica: str, report: dict) -> None:
        self._request_stats[replica] = report

    async def request_stats(self) -> dict:
        """Requests counted by the ingress replicas and by the workers' own HTTP endpoints."""
        if self._http:
            await asyncio.gather(*(self._check_worker(w) for w in list(self._handles)))
        reports = list(self._request_stats.values())
        reports += [info["request_stats"] for info in self._info.values() if info.get("request_stats")]
        return merge(reports)

    async def models(self) -> list[dict]:
        return [m.to_dict() for m in self._manifests]

    async def repository_index(self) -> list[dict]:
        """Triton's repository index: every model version with its state."""
        self.rescan()
        index = []
        for model, versions in self.router.models().items():
            for version in versions:
                if self.router.choose(model, version) is not None:
                    index.append({"name": model, "version": version, "state": "READY"})
                elif model in self._unloaded:
                    index.append({"name": model, "version": version, "state": "UNAVAILABLE", "reason": "unloaded"})
                else:
                    index.append({"name": model, "version": version, "state": "UNAVAILABLE",
                                  "reason": "not loaded; loads on first request"})
        return index

    async def worker_handles(self) -> dict:
        return dict(self._handles)

    async def shutdown(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self._front is not None:
            self._front.stop()
            self._front = None
        for handle in self._handles.values():
            try:
                await handle.shutdown.remote()
            except Exception:
                pass
            ray.kill(handle, no_restart=True)
        self._handles.clear()

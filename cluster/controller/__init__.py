"""The controller: a thin detached Ray actor (``fleet-controller``) over parts with one job each.

Ray Serve's controller and its state managers are the model:

- ``pool.WorkerPool``: start one worker per device, check their health, replace the dead;
- ``loading.Loader``: load and unload engines where budgets allow (placement, eviction);
- ``regions.ShmRegions``: system shared memory regions and the workers that mapped them;
- the front door (``cluster.frontdoor.actor.FrontDoorActor``): its own actor, which gets
  the routes after every inventory change and reloads HAProxy without blocking this one;
- ``views``: the status document and the repository index.

It is the repository's only writer (``publish``, ``store_calibration``): builds on the
workers send their artifacts here as bytes. Loads hand each worker an ``ArtifactSource``,
never a path: the object store's key, or the bytes through Ray when the repository is a
directory on the head (where this actor runs).

The controller owns the inventory (``cluster.inventory.Inventory``): the workers' own
reports are the truth about what is loaded, and every change moves its epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from workers.artifacts import ArtifactSource, RayObject
from workers.cpus import usable_cpus
from workers.engines import executes_on_cpu
from workers.errors import FleetError, ModelNotFound, RepositoryUnavailable, SharedMemoryError
from workers.kserve.handler import InferPolicy
from workers.kserve.model_config import apply_config, config_json, model_config, read_config
from workers.manifest import Manifest
from workers.stats import merge

from cluster.calls import call
from cluster.config import Endpoints, FleetConfig
from cluster.controller.events import EventLog
from cluster.controller.head import GcsWatch
from cluster.controller.imported import Imported, read_imported
from cluster.controller.loading import Loader
from cluster.controller.pool import WorkerPool
from cluster.controller.regions import ShmRegions
from cluster.controller.repository_verbs import RepositoryVerbs
from cluster.controller.views import builds, fallbacks, model_statistics, nodes_view, repository_index
from cluster.frontdoor.actor import FrontDoorActor
from cluster.frontdoor.grpc_router import GrpcFront
from cluster.frontdoor.routes import routes_from
from cluster.frontdoor.tls import read_tls
from cluster.inventory import Inventory, Placement
from cluster.names import FRONT_DOOR_NAME, HEAD_NODE_RESOURCE, NAMESPACE
from cluster.net import free_port, is_wildcard, local_address
from cluster.repository import Repository, StoredArtifact
from cluster.controller.rollouts import Rollouts, RolloutVerbs
from cluster.controller.upgrades import Upgrades, UpgradeVerbs
from cluster.rollout_store import read_rollout, read_tensorrt_upgrades
from cluster.router import Router, WorkerState

log = logging.getLogger("forward-fleet.controller")

HEALTH_PERIOD_S = 1.0
STATS_MAX_AGE_S = 1.0  # /metrics and the status page reuse the workers' views for this long


class FleetController(RepositoryVerbs, RolloutVerbs, UpgradeVerbs):
    def __init__(self, config_json: str, endpoints: Endpoints) -> None:
        self.config = FleetConfig.model_validate_json(config_json)
        self.endpoints = endpoints
        self.repo = Repository(self.config.store_spec())
        self.router = Router(self.config.runtime_profiles().precision_policy())
        self.events = EventLog()
        self.pool = WorkerPool(self.config, endpoints, self.events, self._changed, self._worker_started)
        self.loader = Loader(self.config, self.pool, self.router, self.events, self._source, lambda: self._epoch,
                             libraries=self._library_sources)
        self.rollouts = Rollouts(self.repo, self.router, self.pool, self.loader, self.events, lambda: self._changed())
        self.regions = ShmRegions(self.config.allow_client_shm, self.pool, self.events, self._changed)
        self.upgrades = Upgrades(self.config, self.repo, self.pool, self.loader, self.router, self.events, self._scan,
                                 self._routes_applied, lambda: self._manifests)
        self._manifests: list[Manifest] = []
        self._imported: dict[str, Imported] = {}  # models imported from a Triton repository
        self._manifest_generation = 0
        self._epoch = 0
        self._front = None  # the FrontDoorActor's handle, with the front door on
        self._stats: dict[str, dict] = {}  # worker id -> its latest status view
        self._stats_at = float("-inf")
        self._request_stats: dict[str, dict] = {}  # ingress replica -> its latest report
        self._health_tasks: list[asyncio.Task] = []
        self._started = False
        self.gcs: GcsWatch | None = None  # whether the head's GCS answers (set at start)
        self._router_port: int | None = None  # the front door's gRPC router (chosen before the workers start)

    # ---- start-up ----------------------------------------------------------
    async def start(self) -> dict:
        if self._started:
            return await self.status()
        self.gcs = GcsWatch(ray.get_runtime_context().gcs_address)
        await self._scan()
        self.pool.tensorrt = await asyncio.to_thread(read_tensorrt_upgrades, self.repo)  # nodes `fleet upgrade` moved
        await self.pool.start(self._ingress_url(), self._grpc_front(), ray.util.get_node_ip_address())
        await self.loader.preload()
        if self.endpoints.front_door:
            await self._start_front_door()
        self._started = True
        loop = asyncio.get_running_loop()
        self._health_tasks = [loop.create_task(self._health_loop()), loop.create_task(self._gcs_loop())]
        return await self.status()

    def _public_host(self) -> str:
        host = self.config.host
        return ray.util.get_node_ip_address() if is_wildcard(host) else host  # this actor runs on the head, as Serve does

    def _ingress_url(self) -> str:
        return f"http://{self._public_host()}:{self.endpoints.serve_port}"

    async def describe(self) -> dict:
        """Where this fleet is: its URL and ports and its repository (no secrets), for the CLI."""
        return {
            "fleet": self.config.name,
            "url": f"{'https' if self.config.tls.enabled else 'http'}://{self._public_host()}:{self.config.port}",
            "tls": self.config.tls.enabled,
            "port": self.config.port,
            "serve_port": self.endpoints.serve_port,
            "front_door": self.endpoints.front_door,
            "dashboard_port": self.config.dashboard_port,
            "repository": self.repo.describe(),
            "repository_is_local": self.repo.is_local,
            "simulated": self.config.simulated,
            "grpc_port": self.config.grpc_port if self.endpoints.front_door else None,
            # models whose custom-op libraries this fleet loads (`fleet models` says which are refused)
            "trusted_sha256": {m: list(pins) for m, pins in self.config.trusted_pins().items()},
        }

    def _grpc_front(self) -> str | None:
        """The front door's gRPC router, where workers pass on their gRPC misses (straight to it: the
        fleet's own gRPC port may speak TLS only)."""
        if self.config.grpc_port is None or not self.endpoints.front_door:
            return None
        if self._router_port is None:
            self._router_port = free_port(self.config.host)
        return f"{self._public_host()}:{self._router_port}"

    async def _start_front_door(self) -> None:
        host = self.config.host
        threads = max(1, min(4, usable_cpus() // 4))
        grpc = None
        if self.config.grpc_port is not None:
            policy = InferPolicy(self.config.max_request_bytes, self.config.auth_token, self.config.auth_inference)
            self._grpc_front()
            grpc = GrpcFront((host, self.config.grpc_port), policy, router_host=host, router_port=self._router_port or 0)
        tls = read_tls(self.config.tls)  # checked by `fleet up` already; read here, on the head
        worker_token = None if self.config.auth_inference else self.config.auth_token  # workers want it
        self._front = ray.remote(FrontDoorActor).options(
            name=FRONT_DOOR_NAME, namespace=NAMESPACE, num_cpus=0, resources=HEAD_NODE_RESOURCE, get_if_exists=True,
        ).remote((host, self.config.port), (local_address(host), self.endpoints.serve_port), threads, grpc, tls,
                 worker_token)
        await call(self._front.start.remote(self._epoch, self._routes(), self._grpc_addresses()))

    async def _worker_started(self, worker_id: str) -> None:
        await self.regions.replay(worker_id)
        if self._started:  # a host that joined (or came back): engines of what the fleet serves, where they fit
            asyncio.get_running_loop().create_task(self.loader.fill(worker_id))

    async def _source(self, manifest: Manifest) -> ArtifactSource:
        """Where a worker takes this artifact from: the object store itself, or (a directory on the
        head) its bytes, read here and put into Ray's object store."""
        if not self.repo.is_local:
            return self.repo.object_source(manifest)
        data = await asyncio.to_thread(self.repo.read_artifact, manifest)
        return RayObject(ray.put(data), self.repo.stored(manifest).location)

    async def _library_sources(self, manifest: Manifest) -> dict[str, ArtifactSource]:
        """Where a worker takes the model's custom-op libraries from, by sha256: as artifacts travel."""
        found: dict[str, ArtifactSource] = {}
        for library in manifest.custom_ops:
            if not self.repo.is_local:
                found[library.sha256] = self.repo.library_source(library)
                continue
            data = await asyncio.to_thread(self.repo.read_library, library)
            found[library.sha256] = RayObject(ray.put(data), self.repo.store.where(self.repo.library_key(library)))
        return found

    # ---- the inventory -------------------------------------------------------
    def _changed(self, manifests_changed: bool = False) -> None:
        """Something in the inventory changed: route with it, move the epoch, tell the front door."""
        self.router.set_inventory([WorkerState.of(r) for r in self.pool.records()], self._manifests,
                                  same_manifests=not manifests_changed)
        self.rollouts.push_defaults()
        self._stats_at = float("-inf")  # the status view shows the change at once
        self._epoch += 1
        if self._front is not None:  # not awaited: a reload never blocks us
            self._front.apply.remote(self._epoch, self._routes(), self._grpc_addresses())

    def _routes(self):
        records = self.pool.records()
        return routes_from(self.router, {r.worker_id: r.info.http for r in records if r.info.http},
                           {r.worker_id: r.info.grpc[1] for r in records if r.info.grpc})

    def _grpc_addresses(self) -> dict[str, tuple[str, int]]:
        return {r.worker_id: r.info.grpc for r in self.pool.records() if r.info.grpc and r.alive}

    async def _scan(self) -> list[StoredArtifact]:
        """Re-read the repository; RepositoryUnavailable (and the last listing kept) when it cannot be reached."""
        try:
            arts = await asyncio.to_thread(self.repo.artifacts)
        except RepositoryUnavailable as exc:
            self.events.add("repository-unreachable", reason=exc.message)
            raise
        self._manifests = [a.manifest for a in arts]
        self.router.rollout = await asyncio.to_thread(read_rollout, self.repo)
        await self._read_imported()
        self._manifest_generation += 1
        self._changed(manifests_changed=True)
        return arts

    async def _read_imported(self) -> None:
        """The imported Triton configurations: how those models are served and what their config shows."""
        imported, problems = read_imported(await asyncio.to_thread(self.repo.triton_configs), self.config)
        for model, reason in problems.items():
            self.events.add("triton-config-unreadable", model=model, reason=reason)
        self._imported = imported
        self.loader.imported = {model: i.options for model, i in imported.items()}

    async def rescan(self) -> dict[str, list[str]]:
        """Re-read the repository (after builds or on a miss)."""
        await self._scan()
        return self.router.models()

    async def artifacts(self, model: str | None = None) -> list[StoredArtifact]:
        """What the repository holds now: everything (read again), or one model's (listed alone)."""
        if model is None:
            return await self._scan()
        return await asyncio.to_thread(self.repo.artifacts, model)

    async def inventory(self, since_epoch: int = -1, manifest_generation: int = -1) -> Inventory | None:
        """The inventory, or None when the caller's ``since_epoch`` is current; without the
        manifests when the caller has ``manifest_generation`` already."""
        if since_epoch == self._epoch:
            return None
        same = manifest_generation == self._manifest_generation
        return Inventory(self._epoch, self.pool.records(), self._manifest_generation,
                         None if same else tuple(self._manifests), self.regions.holders(), self.pool.handles(),
                         self.router.rollout, self.router.precision_policy)

    async def _resolve(self, model: str, version: str | None) -> str:
        try:
            return self.router.resolve(model, version)
        except ModelNotFound:
            await self._scan()  # a build may have published it since
            return self.router.resolve(model, version)

    # ---- health ------------------------------------------------------------
    async def _health_loop(self) -> None:
        assert self.gcs is not None
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            await self.pool.check_all()  # calls between running actors need no GCS
            if self.gcs.up:
                await self.pool.watch_hosts()  # hosts that joined, left or died
                await self._check_front_door()  # starting another would wait for the GCS

    async def _gcs_loop(self) -> None:
        """The GCS probe on its own: a GCS that dies under ``watch_hosts`` holds the health loop up to
        its 10 s wait for ``ray.nodes()``, and the outage must be known (loads refused at once) sooner."""
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            await self._check_gcs()

    async def _check_gcs(self) -> bool:
        assert self.gcs is not None
        change = self.gcs.observe(await self.gcs.probe())
        if change == "down":
            self.events.add("gcs-down", address=self.gcs.address)
            log.error("the head's GCS (%s) does not answer: loads and builds wait; loaded models serve on",
                      self.gcs.address)
        elif change == "back":
            self.events.add("gcs-back", address=self.gcs.address, outage_s=round(self.gcs.last_outage_s or 0, 2))
            log.warning("the head's GCS is back after %.1f s", self.gcs.last_outage_s or 0)
        return self.gcs.up

    def _need_gcs(self, what: str) -> None:
        if self.gcs is not None:
            self.gcs.require(what)

    async def _check_front_door(self) -> None:
        """The front door's actor died (HAProxy itself is restarted by that actor): start another."""
        if self._front is None:
            return
        try:
            await asyncio.wait_for(self._front.describe.remote(), 10)
        except Exception as exc:
            self.events.add("front-door-lost", reason=f"{type(exc).__name__}: {exc}")
            try:
                ray.kill(self._front, no_restart=True)
            except Exception:
                pass
            try:
                await self._start_front_door()
                self.events.add("front-door-replaced")
            except FleetError as err:
                self.events.add("front-door-replace-failed", reason=err.message)

    async def drain_host(self, node_id: str, timeout_s: float = 60.0, address: str | None = None) -> dict:
        """A host leaves (``fleet leave`` there: its Ray node and address): its workers leave every route
        (the front door first), finish what they hold, and stop; none starts there again."""
        return await self.pool.drain(node_id, timeout_s, self._routes_applied, address)

    async def _routes_applied(self) -> None:
        """The front door serves the inventory as it is now (HAProxy reloaded), bounded."""
        if self._front is not None:
            epoch = self._epoch
            await self._front.apply.remote(epoch, self._routes(), self._grpc_addresses())
            await self._front.applied.remote(epoch)

    async def report_worker(self, worker_id: str) -> None:
        """A caller saw a worker die or lose an engine: read its health now (and replace it if dead)."""
        if worker_id in self.pool.handles():
            await self.pool.check(worker_id)

    # ---- loading -----------------------------------------------------------
    async def ensure_loaded(self, model: str, version: str | None = None, *, allow_eviction: bool = True,
                            explicit: bool = False) -> Placement:
        """Load a version; without one, what requests naming no version need: each worker's default."""
        self._need_gcs(f"loading {model}")
        resolved, how = await self._resolve(model, version), dict(allow_eviction=allow_eviction, explicit=explicit)
        return await (self.loader.ensure_defaults(model, **how) if version is None else
                      self.loader.ensure_loaded(model, resolved, **how))

    async def unload(self, model: str, version: str | None = None) -> list[str]:
        return await self.loader.unload(model, version, self._manifests)

    async def load(self, model: str, config: str | None = None) -> Placement:
        """The repository API's load (Triton's semantics): with ``config`` (JSON of Triton's
        ModelConfig), the model is served as it says from now on, checked against the model
        first; without, as the fleet config says. Loaded engines whose options change are
        unloaded and loaded again."""
        self._need_gcs(f"loading {model}")
        version = await self._resolve(model, None)
        base = self.loader.base_options(model)
        options = base
        if config is not None:
            options = apply_config(read_config(config, model), self.router.manifests(model, version)[0], base)
        if options != self.loader.options_for(model):
            await self.loader.unload(model, None, self._manifests)
        if options == base:
            self.loader.overrides.pop(model, None)
        else:
            self.loader.overrides[model] = options
        return await self.ensure_loaded(model, None, explicit=True)

    async def model_config(self, model: str, version: str | None = None) -> dict:
        """Triton's model configuration of a model version, as served now (JSON)."""
        manifests = self.router.manifests(model, await self._resolve(model, version))
        if model in self._imported and model not in self.loader.overrides:
            return config_json(self._imported[model].config)  # as imported: what Triton would show
        gpu = not all(executes_on_cpu(m.target) for m in manifests)
        return config_json(model_config(manifests, self.loader.options_for(model), slots=self.config.slots, gpu=gpu))

    async def model_statistics(self, model: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics of one model (every version, or ``version``), or of every model."""
        models = self.router.models()
        if model is None:
            wanted = [(m, v) for m, versions in models.items() for v in versions]
        else:
            resolved = await self._resolve(model, version)
            wanted = [(model, v) for v in models[model] if version is None or v == resolved]
        self._stats_at = float("-inf")  # tools compare two readings: they must be of now
        return model_statistics(await self._worker_stats(), wanted)

    async def cuda_shm_register(self, name: str) -> None:
        """Triton's CUDA shared memory: not served by the fleet; say why in the terms of this fleet."""
        gpus = [r.worker_id for r in self.pool.records() if r.info.caps.device.is_real_gpu]
        where = ("no worker of this fleet has a CUDA device" if not gpus else
                 "the fleet does not map CUDA IPC handles yet")
        raise SharedMemoryError(f"CUDA shared memory region '{name}' cannot be registered: CUDA shared memory is "
                                f"not supported here ({where}); use system shared memory (/v2/systemsharedmemory)")

    # ---- system shared memory ------------------------------------------------
    async def register_shm(self, name: str, key: str, offset: int = 0, byte_size: int = 0,
                           pin_wait_s: float = 0.0) -> list[str]:
        return await self.regions.register(name, key, offset, byte_size, pin_wait_s)

    async def unregister_shm(self, name: str | None = None) -> list[str]:
        return await self.regions.unregister(name)

    async def shm_status(self, name: str | None = None) -> list[dict]:
        return self.regions.status(name)

    # ---- status and statistics ---------------------------------------------------
    async def _worker_stats(self) -> dict[str, dict]:
        if time.monotonic() - self._stats_at > STATS_MAX_AGE_S:
            self._stats = await self.pool.stats()
            self._stats_at = time.monotonic()
        return self._stats

    async def status(self) -> dict:
        front = None
        if self._front is not None:
            try:
                front = await asyncio.wait_for(call(self._front.describe.remote()), 10)
            except Exception as exc:
                front = {"running": False, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "fleet": self.config.name,
            "simulated": self.config.simulated,
            "epoch": self._epoch,
            "restarts": self.pool.restarts,
            "nodes": nodes_view(self.pool.records(), await self._worker_stats(), self._manifests),
            "hosts": self.pool.hosts(),
            "models": self.router.models(),
            "rollout": [self.router.rollout_view(m) for m in sorted(self.router.models())],
            "builds": builds(self._manifests, self.config.trusted_pins()),
            "fallbacks": fallbacks(self._manifests),
            "front_door": front,
            "gcs": self.gcs.to_dict() if self.gcs is not None else None,
            "events": self.events.recent(),
        }

    async def report_request_stats(self, replica: str, report: dict) -> None:
        self._request_stats[replica] = report

    async def request_stats(self) -> dict:
        """Requests counted by the ingress replicas and by the workers' own HTTP endpoints."""
        reports = list(self._request_stats.values())
        reports += [s["request_stats"] for s in (await self._worker_stats()).values() if s.get("request_stats")]
        return merge(reports)

    async def models(self) -> list[dict]:
        return [m.to_dict() for m in self._manifests]

    async def repository_index(self) -> list[dict]:
        try:
            await self._scan()
        except RepositoryUnavailable:
            pass  # the index of the last listing: what is loaded keeps serving
        return repository_index(self.router, self.loader.unloaded)

    async def shutdown(self) -> None:
        for task in self._health_tasks:
            task.cancel()
        if self._front is not None:
            try:
                await asyncio.wait_for(self._front.stop.remote(), 30)
            except Exception:
                pass
            ray.kill(self._front, no_restart=True)
            self._front = None
        await self.pool.shutdown()

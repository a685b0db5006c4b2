"""Loading and unloading engines across the fleet: where a model goes, and what makes room.

``Loader.ensure_loaded`` loads a model version on every compatible worker with room
(one engine of it per worker); when none has room, on the best one, whose worker then
evicts least-recently-used idle engines (its ledger decides). The router's pure
``placement`` ranks the candidates; every worker re-checks ``can_run`` itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ray.exceptions import RayActorError

from workers.artifacts import ArtifactSource
from workers.errors import (
    ArtifactCorrupt,
    FleetError,
    IncompatibleArtifact,
    ModelNotFound,
    NoCapacity,
    NoCompatibleWorker,
    NotReady,
    RepositoryUnavailable,
)
from workers.ledger import format_bytes
from workers.manifest import Manifest
from workers.messages import LoadOptions
from workers.trust import is_trusted

from cluster.calls import call
from cluster.config import FleetConfig
from cluster.controller.events import EventLog
from cluster.controller.pool import WorkerPool
from cluster.inventory import Placement
from cluster.router import Router

_REFUSALS = (NoCapacity, IncompatibleArtifact, ArtifactCorrupt, RepositoryUnavailable)
WAIT_POLL_S = 0.25


class Loader:
    def __init__(self, config: FleetConfig, pool: WorkerPool, router: Router, events: EventLog,
                 source: Callable[[Manifest], Awaitable[ArtifactSource]], epoch: Callable[[], int],
                 libraries: "Callable[[Manifest], Awaitable[dict[str, ArtifactSource]]] | None" = None) -> None:
        """``source``: where a worker takes an artifact from (the controller decides); ``libraries``: where
        it takes the artifact's custom-op libraries from, by sha256."""
        self.config = config
        self.pool = pool
        self.router = router  # the controller's, kept current by it
        self.events = events
        self._source = source
        self._libraries = libraries
        self._epoch = epoch
        self._locks: dict[str, asyncio.Lock] = {}
        self.unloaded: set[str] = set()  # models unloaded through the repository API
        self.overrides: dict[str, LoadOptions] = {}  # serving options a load with a config override set
        self.imported: dict[str, LoadOptions] = {}  # serving options of models imported from a Triton repository

    def base_options(self, model: str) -> LoadOptions:
        """How the model is served without an override: as its imported Triton configuration says,
        else as the fleet config's ``models.<m>`` says."""
        return self.imported.get(model) or self.config.model_config_for(model).load_options()

    def options_for(self, model: str) -> LoadOptions:
        """How the model's engines are served: a load's config override, else ``base_options``."""
        return self.overrides.get(model) or self.base_options(model)

    async def preload(self) -> None:
        for model in self.router.models():
            if not self.config.model_config_for(model).preload:
                continue
            try:
                await self.ensure_defaults(model, allow_eviction=False)
            except FleetError as exc:
                self.events.add("preload-skipped", model=model, reason=exc.message)

    async def ensure_defaults(self, model: str, *, allow_eviction: bool = True, explicit: bool = False) -> Placement:
        """Load what requests naming no version need: on each worker, its own default version
        (cluster.rollout: per GPU type the latest it has an artifact for, or the promoted one)."""
        by_version = self.router.unpinned_versions(model)
        if not by_version:
            raise self.router.no_compatible_worker(model, self.router.fleet_default(model))
        engines: dict[str, str] = {}
        failures: list[FleetError] = []
        for version, workers in sorted(by_version.items()):
            try:
                placement = await self.ensure_loaded(model, version, allow_eviction=allow_eviction, explicit=explicit,
                                                     only=set(workers))
                engines.update(placement.engines)
            except FleetError as exc:
                failures.append(exc)
        if not engines:
            raise failures[0]
        for exc in failures:  # some types serve; say why the others do not
            self.events.add("load-partial", model=model, reason=exc.message)
        return Placement(model, self.router.fleet_default(model), engines, self._epoch())

    async def fill(self, worker_id: str) -> None:
        """A worker that (re)joined: load what the fleet serves now (or preloads) where it fits there,
        so the host takes its share without waiting for a miss. Evicts nothing."""
        for model, versions in self.router.models().items():
            version = self.router.defaults(model).get(worker_id, versions[-1])  # its GPU type's default (rollout)
            served = bool(self.router.holders(model, version))
            if model in self.unloaded or not (served or self.config.model_config_for(model).preload):
                continue
            if not any(w == worker_id for w, _ in self.router.compatible(model, version)):
                continue
            try:
                await self.ensure_loaded(model, version, allow_eviction=False)
            except FleetError as exc:
                self.events.add("fill-skipped", worker=worker_id, model=model, reason=exc.message)

    async def ensure_loaded(self, model: str, version: str, *, allow_eviction: bool = True,
                            explicit: bool = False, only: "set[str] | None" = None) -> Placement:
        """Load the model where it fits (every compatible device with room; else evict on the best one).

        ``explicit`` (the repository API's load) also lifts an earlier explicit unload;
        on-demand loads from inference do not. ``only``: on these workers only."""
        if explicit:
            self.unloaded.discard(model)
        elif model in self.unloaded:
            raise NotReady(f"model '{model}' was unloaded; load it with POST /v2/repository/models/{model}/load")
        async with self._locks.setdefault(f"{model}:{version}", asyncio.Lock()):
            placements = await self._placement(model, version, only)
            # One engine of this model per worker: keep what is loaded, add where it fits.
            engines = {c.worker_id: c.manifest.engine_key for c in placements
                       if c.manifest.engine_key in self.router.workers[c.worker_id].loaded}
            problems: list[str] = []
            refusals: list[FleetError] = []
            sources: dict[str, ArtifactSource] = {}  # one read of each artifact per call, however many workers
            for choice in placements:
                if choice.worker_id in engines:
                    continue
                fits = self.router.workers[choice.worker_id].free_bytes >= choice.manifest.footprint_bytes
                if not fits and (engines or not allow_eviction):
                    continue
                if await self._load_on(choice.worker_id, choice.manifest, problems, refusals, sources):
                    engines[choice.worker_id] = choice.manifest.engine_key
            if not engines:
                raise self._failure(model, version, problems, refusals)
            return Placement(model, version, engines, self._epoch())

    async def _placement(self, model: str, version: str, only: "set[str] | None" = None):
        """Where the model can go; while the only workers that can run it are being replaced (a
        crash, an out-of-memory kill, a driver reset), wait for them, bounded (``worker_wait_s``)."""
        deadline = time.monotonic() + self.config.worker_wait_s
        announced = False
        while True:
            try:
                return self.router.placement(model, version, only)
            except NoCompatibleWorker:
                coming = [w for w in self.router.down_but_compatible(model, version) if self.pool.coming_back(w)]
                if not coming or time.monotonic() >= deadline:
                    raise
                if not announced:
                    self.events.add("waiting-for-worker", model=model, version=version, workers=coming)
                    announced = True
                await asyncio.sleep(WAIT_POLL_S)

    async def _load_on(self, worker_id: str, manifest: Manifest, problems: list[str], refusals: list[FleetError],
                       sources: dict[str, ArtifactSource]) -> bool:
        """Load one engine on one worker; False (noted in ``problems``) when the worker refused or died,
        or the artifact could not be had."""
        before = set(self.router.workers[worker_id].loaded)
        options = self.options_for(manifest.model)
        try:
            if manifest.engine_key not in sources:
                sources[manifest.engine_key] = await self._source(manifest)
            libraries: tuple = ()
            if manifest.custom_ops and is_trusted(manifest, options.trusted_sha256) and self._libraries is not None:
                libraries = (await self._libraries(manifest),)  # untrusted: the worker refuses before any fetch
            await call(self.pool.handle(worker_id).load.remote(manifest, sources[manifest.engine_key], options, *libraries))
        except _REFUSALS as exc:
            problems.append(f"{worker_id}: {exc}")
            refusals.append(exc)
            self.events.add("load-refused", worker=worker_id, model=manifest.model, reason=str(exc))
            await self.pool.refresh(worker_id)
            return False
        except RayActorError:
            problems.append(f"{worker_id}: worker died")
            await self.pool.check(worker_id)
            return False
        await self.pool.refresh(worker_id)  # the controller's router now has the new ledger
        evicted = sorted(before - self.router.workers[worker_id].loaded)
        self.events.add("load", worker=worker_id, engine=manifest.engine_key, evicted=evicted)
        return True

    def _failure(self, model: str, version: str, problems: list[str], refusals: list[FleetError]) -> FleetError:
        kinds = {type(r) for r in refusals}
        if RepositoryUnavailable in kinds:  # not the artifact's fault, nor the budgets': a 503 that says so
            return RepositoryUnavailable(f"model '{model}' version {version} could not be loaded: {'; '.join(problems)}")
        if refusals and kinds <= {ArtifactCorrupt, IncompatibleArtifact}:
            # not a capacity problem: say what is wrong with the artifacts themselves
            return refusals[0].__class__(f"model '{model}' version {version} could not be loaded: {'; '.join(problems)}")
        footprint = max(m.footprint_bytes for m in self.router.manifests(model, version))
        return NoCapacity(f"no capacity for model '{model}' version {version} ({format_bytes(footprint)}): "
                          f"{'; '.join(problems) or self.router.capacity_report(model, version)}")

    async def unload(self, model: str, version: str | None, manifests: list[Manifest], *, explicit: bool = True) -> list[str]:
        """Unload the model from every worker. Returns the engine keys unloaded. ``explicit`` (the
        repository API's unload): no request loads it again until a load says so."""
        keys = {m.engine_key for m in manifests if m.model == model and (version is None or m.version == version)}
        if not keys and model not in self.router.models():
            raise ModelNotFound(f"Request for unknown model: model '{model}' is not in the repository")
        if explicit:
            self.unloaded.add(model)
        done = []
        for worker_id, state in list(self.router.workers.items()):
            held = keys & state.loaded
            if not held or not state.alive:
                continue
            for key in held:
                if await call(self.pool.handle(worker_id).unload.remote(key)):
                    done.append(key)
                    self.events.add("unload", worker=worker_id, engine=key)
            await self.pool.refresh(worker_id)
        return done

"""The controller's part of version rollout: promotions (kept in the repository), and each worker
told its default versions. The policy itself is ``cluster.rollout`` (pure); the router applies it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from workers.errors import FleetError, InvalidInput

from cluster.controller.events import EventLog
from cluster.controller.loading import Loader
from cluster.controller.pool import WorkerPool
from cluster.controller.views import worker_view
from cluster.doctor import diagnose
from cluster.repository import Repository
from cluster.rollout import RolloutState, promote, rollback
from cluster.rollout_store import write_rollout
from cluster.router import Router


class Rollouts:
    def __init__(self, repo: Repository, router: Router, pool: WorkerPool, loader: Loader, events: EventLog,
                 changed: Callable[[], None]) -> None:
        self.repo = repo
        self.router = router  # the controller's
        self.pool = pool
        self.loader = loader
        self.events = events
        self._changed = changed
        self._pushed: dict[str, tuple] = {}  # worker id -> (handle, the default versions it was told)

    def view(self, model: str | None = None) -> list[dict]:
        models = [model] if model is not None else sorted(self.router.models())
        return [self.router.rollout_view(m) for m in models]

    async def promote(self, model: str, version: str, force: bool = False) -> dict:
        """Refused while a GPU type of the fleet has no artifact of ``version`` (its workers would stay on
        an older one) unless ``force``."""
        missing = self.router.types_missing(model, version)
        if missing and not force:
            raise InvalidInput(
                f"model '{model}' version {version} has no artifact for GPU type(s) {', '.join(missing)}: their workers "
                f"would keep serving an older version. Build it for them first (`fleet build SOURCE.onnx --name {model} "
                f"--version {version} --targets {','.join(missing)}`), or promote with --force to cap them")
        state = promote(self.router.rollout, model, version, self.router.models()[model])
        await self._apply(state, "promoted", model, version=version, missing=missing)
        return self.router.rollout_view(model)

    async def rollback(self, model: str) -> dict:
        self.router.resolve(model, None)  # ModelNotFound for a model the repository does not hold
        state = rollback(self.router.rollout, model)
        await self._apply(state, "rolled-back", model, version=state.promoted(model) or "per-type latest")
        return self.router.rollout_view(model)

    async def _apply(self, state: RolloutState, event: str, model: str, **fields) -> None:
        await asyncio.to_thread(write_rollout, self.repo, state)  # outlives the controller; every host reads it
        self.router.set_rollout(state)
        self.events.add(event, model=model, **fields)
        self._changed()
        try:  # the new defaults where they fit now; the rest load on the first request
            await self.loader.ensure_defaults(model, allow_eviction=False)
        except FleetError as exc:
            self.events.add("rollout-load-deferred", model=model, reason=exc.message)

    def push_defaults(self) -> None:
        """Tell each worker its default versions (for requests that name none over its own endpoints)."""
        handles = self.pool.handles()
        for record in self.pool.records():
            wid = record.worker_id
            handle = handles.get(wid)
            if handle is None or not record.alive:
                continue
            defaults = self.router.default_of(wid)
            if self._pushed.get(wid) == (handle, defaults):
                continue
            self._pushed[wid] = (handle, defaults)
            handle.set_default_versions.remote(defaults)  # not awaited: ordered before later calls on this handle


class RolloutVerbs:
    """The controller's verbs for rollout and runtimes (``FleetController`` has them; the CLI calls them)."""

    async def promote(self, model: str, version: str, force: bool = False) -> dict:
        """`fleet promote`: ``version`` serves the requests of ``model`` that name none."""
        self._need_gcs(f"promoting {model}")
        return await self.rollouts.promote(model, await self._resolve(model, version), force)

    async def rollback(self, model: str) -> dict:
        """`fleet rollback`: undo the last promotion of ``model``."""
        self._need_gcs(f"rolling back {model}")
        return await self.rollouts.rollback(model)

    async def doctor(self) -> dict:
        """`fleet doctor`: per host and GPU, what is installed, what the repository's targets miss, the fixes."""
        records = self.pool.records()
        views = [dict(worker_view(r, None, self._manifests), host=r.info.host, node=r.info.caps.node_id) for r in records]
        return diagnose(views, self.config, self._manifests, self.events.recent(200))

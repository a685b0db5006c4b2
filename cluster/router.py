"""The router: which worker serves a request, and where a model should load.

Plain Python, no Ray. Compatibility comes only from ``workers.targets.can_run``;
the router indexes its answers so a decision is a few dictionary lookups.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from workers.errors import ModelNotFound, NoCompatibleWorker
from workers.ledger import format_bytes
from workers.manifest import Manifest, version_sort_key
from workers.targets import WorkerCaps, can_run

from cluster.inventory import Inventory, Placement, WorkerRecord
from cluster.rollout import RolloutState, default_version, gpu_type, missing_types, rollout_view
from cluster.runtime_policy import PrecisionPolicy


def _kind(caps: WorkerCaps) -> tuple:
    """What can_run looks at in a worker: its device's identity class and its runtimes."""
    d = caps.device
    return (d.kind, d.compute_capability, d.simulated, caps.runtimes)


@dataclass
class WorkerState:
    """The router's view of one worker."""

    caps: WorkerCaps
    budget_bytes: int
    used_bytes: int = 0
    loaded: set[str] = field(default_factory=set)  # engine keys
    alive: bool = True
    outstanding: int = 0  # requests this router has in flight there
    standby: bool = False  # out of reach for now (its host's link): the front door keeps it, its checks decide

    @property
    def worker_id(self) -> str:
        return self.caps.worker_id

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @classmethod
    def of(cls, record: WorkerRecord) -> "WorkerState":
        health = record.health
        return cls(record.info.caps, health.budget_bytes, health.used_bytes, set(health.loaded), record.alive,
                   standby=record.standby)


@dataclass(frozen=True)
class Choice:
    worker_id: str
    manifest: Manifest


class Router:
    def __init__(self, precision_policy: PrecisionPolicy | None = None) -> None:
        self.workers: dict[str, WorkerState] = {}
        self._manifests: dict[str, dict[str, list[Manifest]]] = {}  # model -> version -> manifests
        self._latest: dict[str, str] = {}
        # (model, version) -> [(worker_id, manifest)] that can_run; computed once per inventory
        self._compatible: dict[tuple[str, str], list[tuple[str, Manifest]]] = {}
        self._holders: dict[tuple[str, str], list[Choice]] = {}
        self._turn = 0
        self._random = random.Random(0)
        self.rollout = RolloutState()
        self.precision_policy = precision_policy or PrecisionPolicy()
        # model -> worker id -> the version it serves unpinned requests with (cluster.rollout)
        self._defaults: dict[str, dict[str, str]] = {}

    # ---- inventory -------------------------------------------------------
    @classmethod
    def from_inventory(cls, inventory: Inventory) -> "Router":
        router = cls()
        router.apply(inventory)
        return router

    def apply(self, inventory: Inventory) -> None:
        """Take a controller snapshot. Compatibility is worked out again only when the
        artifacts or the kinds of workers changed, not when engines came and went."""
        manifests = list(inventory.manifests) if inventory.manifests is not None else self.all_manifests()
        rollout_changed = inventory.rollout is not None and inventory.rollout != self.rollout
        if inventory.rollout is not None:
            self.rollout = inventory.rollout
        policy_changed = inventory.precision_policy is not None and inventory.precision_policy != self.precision_policy
        if policy_changed:
            self.precision_policy = inventory.precision_policy
        self.set_inventory([WorkerState.of(w) for w in inventory.workers], manifests,
                           same_manifests=inventory.manifests is None and not policy_changed)
        if rollout_changed:
            self._reindex_defaults()

    def all_manifests(self) -> list[Manifest]:
        return [m for versions in self._manifests.values() for ms in versions.values() for m in ms]

    def set_inventory(self, workers: list[WorkerState], manifests: list[Manifest], same_manifests: bool = False) -> None:
        outstanding = {w.worker_id: w.outstanding for w in self.workers.values()}
        old_kinds = {wid: _kind(w.caps) for wid, w in self.workers.items()}
        self.workers = {w.worker_id: w for w in workers}
        for w in workers:
            w.outstanding = outstanding.get(w.worker_id, w.outstanding)
        if same_manifests and old_kinds == {wid: _kind(w.caps) for wid, w in self.workers.items()}:
            self._reindex_loaded()
            return
        self._manifests = {}
        for m in manifests:
            self._manifests.setdefault(m.model, {}).setdefault(m.version, []).append(m)
        self._latest = {model: max(vs, key=version_sort_key) for model, vs in self._manifests.items()}
        # Workers with the same device and runtimes get the same can_run answers: ask once per
        # kind of worker (a fleet of 1,000 GPUs has a handful of kinds), not once per worker.
        kinds: dict[tuple, list[WorkerState]] = {}
        for w in workers:
            kinds.setdefault(_kind(w.caps), []).append(w)
        self._compatible = {}
        for model, versions in self._manifests.items():
            for version, ms in versions.items():
                pairs = []
                for members in kinds.values():
                    for m in ms:
                        if can_run(m, members[0].caps) and self.precision_policy.allows(m, members[0].caps):
                            pairs.extend((w.worker_id, m) for w in members)
                self._compatible[(model, version)] = pairs
        self._reindex_defaults()
        self._reindex_loaded()

    def set_rollout(self, state: RolloutState) -> None:
        """Promotions changed (``fleet promote`` / ``fleet rollback``)."""
        self.rollout = state
        self._reindex_defaults()

    def _reindex_defaults(self) -> None:
        """Each worker's default version of each model (cluster.rollout): from the compatibility index."""
        self._defaults = {}
        for model, versions in self._manifests.items():
            runs_on: dict[str, set[str]] = {}  # version -> workers that can run it
            for version in versions:
                runs_on[version] = {w for w, _ in self._compatible.get((model, version), [])}
            promoted = self.rollout.promoted(model)
            defaults = {}
            for wid in self.workers:
                version = default_version(versions, _runs_on_worker(runs_on, wid), promoted)
                if version is not None:
                    defaults[wid] = version
            self._defaults[model] = defaults

    def _reindex_loaded(self) -> None:
        """(model, version) -> the live compatible workers holding one of its engines."""
        self._holders = {}
        for (model, version), pairs in self._compatible.items():
            holders = [Choice(wid, m) for wid, m in pairs if self.workers[wid].alive and m.engine_key in self.workers[wid].loaded]
            if holders:
                self._holders[(model, version)] = holders

    def mark_loaded(self, worker_id: str, key: str, used_bytes: int | None = None) -> None:
        w = self.workers[worker_id]
        w.loaded.add(key)
        if used_bytes is not None:
            w.used_bytes = used_bytes
        self._reindex_loaded()

    def apply_placement(self, placement: Placement) -> None:
        """What ``ensure_loaded`` just did, without waiting for the next snapshot."""
        for worker_id, key in placement.engines.items():
            if worker_id in self.workers:
                self.workers[worker_id].loaded.add(key)
        self._reindex_loaded()

    def mark_dead(self, worker_id: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].alive = False
            self._reindex_loaded()

    # ---- queries ---------------------------------------------------------
    def models(self) -> dict[str, list[str]]:
        return {m: sorted(vs, key=version_sort_key) for m, vs in self._manifests.items()}

    def resolve(self, model: str, version: str | None) -> str:
        versions = self._manifests.get(model)
        if not versions:
            raise ModelNotFound(f"Request for unknown model: model '{model}' is not in the repository")
        if version is None:
            return self.fleet_default(model)
        if version not in versions:
            raise ModelNotFound(f"Request for unknown model: model '{model}' has no version '{version}' "
                                f"(versions: {', '.join(sorted(versions))})")
        return version

    def fleet_default(self, model: str) -> str:
        """The one version that stands for unpinned requests where one must (metadata, a model's
        config): the promoted version, else the highest default of a live worker, else the latest."""
        promoted = self.rollout.promoted(model)
        if promoted is not None and promoted in self._manifests.get(model, {}):
            return promoted
        live = [v for w, v in self._defaults.get(model, {}).items() if self.workers[w].alive]
        return max(live, key=version_sort_key) if live else self._latest[model]

    def defaults(self, model: str) -> dict[str, str]:
        """Live worker id -> the version it serves unpinned requests of ``model`` with."""
        return {w: v for w, v in self._defaults.get(model, {}).items() if self.workers[w].alive}

    def default_of(self, worker_id: str) -> dict[str, str]:
        """Model -> the version this worker serves unpinned requests with (pushed to the worker)."""
        return {model: d[worker_id] for model, d in self._defaults.items() if worker_id in d}

    def unpinned_holders(self, model: str) -> list[Choice]:
        """Live workers holding an engine of their own default version of ``model``."""
        found = []
        for wid, version in self.defaults(model).items():
            for choice in self._holders.get((model, version), []):
                if choice.worker_id == wid:
                    found.append(choice)
        return found

    def choose_unpinned(self, model: str, among: "set[str] | None" = None) -> Choice | None:
        """A worker for a request that names no version: one holding its own default version."""
        return self._least_loaded(self.unpinned_holders(model), among)

    def unpinned_versions(self, model: str) -> dict[str, list[str]]:
        """Default version -> the live workers serving it (what an unpinned request needs loaded)."""
        by_version: dict[str, list[str]] = {}
        for wid, version in sorted(self.defaults(model).items()):
            by_version.setdefault(version, []).append(wid)
        return by_version

    def _types(self) -> dict[str, list[str]]:
        types: dict[str, list[str]] = {}
        for wid, w in sorted(self.workers.items()):
            if w.alive:
                types.setdefault(gpu_type(w.caps.device), []).append(wid)
        return types

    def _type_runs(self, model: str, members: list[str]):
        pairs = {(w, m.engine_key) for version in self._manifests.get(model, {})
                 for w, m in self._compatible.get((model, version), [])}
        return lambda m: any((w, m.engine_key) in pairs for w in members)

    def rollout_view(self, model: str) -> dict:
        """Per GPU type: the version unpinned requests get and the newer one it waits for (``fleet status``)."""
        types = {t: (members, self._type_runs(model, members)) for t, members in self._types().items()}
        return rollout_view(model, self._manifests.get(model, {}), types, self.rollout.promoted(model))

    def types_missing(self, model: str, version: str) -> list[str]:
        """GPU types of the live fleet with no artifact of (model, version) they can run."""
        types = {t: (members, self._type_runs(model, members)) for t, members in self._types().items()}
        return missing_types(version, self._manifests.get(model, {}), types)

    def manifests(self, model: str, version: str) -> list[Manifest]:
        return self._manifests.get(model, {}).get(version, [])

    def compatible(self, model: str, version: str) -> list[tuple[str, Manifest]]:
        """(worker, manifest) pairs that can_run, on live workers."""
        return [(w, m) for w, m in self._compatible.get((model, version), []) if self.workers[w].alive]

    def down_but_compatible(self, model: str, version: str) -> list[str]:
        """Workers that could run (model, version) but are not alive now (being replaced, perhaps)."""
        return sorted({w for w, _ in self._compatible.get((model, version), []) if not self.workers[w].alive})

    def standby_defaults(self, model: str) -> dict[str, str]:
        """Out-of-reach worker id -> its default version of ``model``, where it holds that engine."""
        defaults = {w: v for w, v in self._defaults.get(model, {}).items() if self.workers[w].standby}
        holders = {v: set(self.standby_holders(model, v)) for v in set(defaults.values())}
        return {w: v for w, v in defaults.items() if w in holders[v]}

    def standby_holders(self, model: str, version: str) -> list[str]:
        """Compatible workers holding an engine of (model, version) that are out of reach for now."""
        return sorted({w for w, m in self._compatible.get((model, version), [])
                       if self.workers[w].standby and m.engine_key in self.workers[w].loaded})

    def holders(self, model: str, version: str) -> list[str]:
        """The live compatible workers holding an engine of (model, version)."""
        return [c.worker_id for c in self._holders.get((model, version), [])]

    def choose(self, model: str, version: str, among: "set[str] | None" = None) -> Choice | None:
        """A live compatible worker holding the engine, None if there is none.

        Up to 16 holders: the least outstanding requests (ties take turns). More: the better
        of two picked at random ("power of two choices", as Ray Serve routes), which keeps
        a decision O(1) on large fleets with nearly the same balance. ``among``: only these
        workers (e.g. those on the host of a request's shared memory).
        """
        return self._least_loaded(self._holders.get((model, version)) or [], among)

    def _least_loaded(self, holders: list[Choice], among: "set[str] | None") -> Choice | None:
        if holders and among is not None:
            holders = [c for c in holders if c.worker_id in among]
        if not holders:
            return None
        workers = self.workers
        if len(holders) > 16:
            a, b = self._random.sample(holders, 2)
            return a if workers[a.worker_id].outstanding <= workers[b.worker_id].outstanding else b
        self._turn += 1
        n = len(holders)
        best, best_load = None, None
        for i in range(n):
            choice = holders[(self._turn + i) % n]
            load = workers[choice.worker_id].outstanding
            if best_load is None or load < best_load:
                best, best_load = choice, load
        return best

    def placement(self, model: str, version: str, only: "set[str] | None" = None) -> list[Choice]:
        """Where to load, best first: fits without eviction, then most free budget. ``only``: these
        workers (those whose default the version is, for an unpinned request)."""
        pairs = self.compatible(model, version)
        if only is not None:
            pairs = [(w, m) for w, m in pairs if w in only]
        if not pairs:
            raise self.no_compatible_worker(model, version)

        def rank(pair: tuple[str, Manifest]):
            w = self.workers[pair[0]]
            fits = w.free_bytes >= pair[1].footprint_bytes
            return (not fits, -(w.free_bytes - pair[1].footprint_bytes), w.outstanding, w.worker_id)

        return [Choice(w, m) for w, m in sorted(pairs, key=rank)]

    def no_compatible_worker(self, model: str, version: str) -> NoCompatibleWorker:
        built = sorted({m.target.describe() for m in self.manifests(model, version)})
        present = sorted(
            {f"{w.caps.device.describe()} with {', '.join(r.describe() for r in w.caps.runtimes)}"
             for w in self.workers.values() if w.alive}
        )
        return NoCompatibleWorker(
            f"model '{model}' version {version} has no artifact any live worker can run; "
            f"built targets: {'; '.join(built) or 'none'}; fleet has: {'; '.join(present) or 'no live workers'}"
        )

    def capacity_report(self, model: str, version: str) -> str:
        parts = []
        for worker_id, manifest in self.compatible(model, version):
            w = self.workers[worker_id]
            parts.append(
                f"{worker_id} ({w.caps.device.name}): {format_bytes(w.free_bytes)} free of {format_bytes(w.budget_bytes)}"
            )
        return "; ".join(parts)

    # ---- outstanding requests ------------------------------------------
    def begin(self, worker_id: str) -> None:
        self.workers[worker_id].outstanding += 1

    def end(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None and w.outstanding > 0:
            w.outstanding -= 1


def _runs_on_worker(runs_on: dict[str, set[str]], worker_id: str):
    """For default_version: whether an artifact runs on this worker (by the compatibility index)."""
    return lambda m: worker_id in runs_on.get(m.version, ())

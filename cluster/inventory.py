"""The fleet's inventory as typed values: the workers, what each holds, the artifacts.

The controller owns it; the ingress replicas, the batch job and the build farm read it
(``FleetController.inventory``) and route with ``Router.from_inventory``. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.manifest import Manifest
from workers.messages import WorkerHealth, WorkerInfo


@dataclass(frozen=True)
class WorkerRecord:
    """One worker as the controller last saw it."""

    info: WorkerInfo
    health: WorkerHealth
    alive: bool = True  # routable: the router sends it requests and loads
    state: str = "up"  # up, unreachable, draining, replacing, waiting for its host, out of service

    @property
    def standby(self) -> bool:
        """Not answering the controller, but not lost either (its host's link may be down): the front
        door keeps it as a server and its own checks say when it answers again."""
        return self.state == "unreachable"

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


@dataclass(frozen=True)
class Inventory:
    """A snapshot: ``epoch`` moves whenever anything in it changes.

    ``manifests`` is None when the caller already has generation ``manifest_generation``
    (the repository did not change): a snapshot then carries only the workers."""

    epoch: int
    workers: tuple[WorkerRecord, ...]
    manifest_generation: int
    manifests: tuple[Manifest, ...] | None
    shm: dict[str, frozenset[str]] = field(default_factory=dict)  # region -> workers that mapped it
    handles: dict[str, Any] = field(default_factory=dict, compare=False)  # worker id -> Ray actor handle
    rollout: Any = None  # cluster.rollout.RolloutState: promotions (None: the caller's are current)
    precision_policy: Any = None  # cluster.runtime_policy.PrecisionPolicy: which precisions serve on which GPU type

    def live_workers(self) -> list[WorkerRecord]:
        return [w for w in self.workers if w.alive]


@dataclass(frozen=True)
class Placement:
    """Where a model version's engines are in service, as ``ensure_loaded`` left them."""

    model: str
    version: str
    engines: dict[str, str]  # worker id -> engine key
    epoch: int  # the inventory epoch that includes this placement

    @property
    def workers(self) -> list[str]:
        return sorted(self.engines)

"""A host's TensorRT upgrade, planned (pure: no Ray, no I/O).

A plan runs only on the TensorRT release it was built with (``can_run``). A host moving from
10.4 to 10.16 needs each plan its workers run built again for the new release (same source,
model, version, precision, max_batch, build options and custom-op libraries: only the target's
TensorRT version changes) *before* its first worker restarts; once all its workers run the new
release, the old plans that no worker of the fleet can run any more are dropped. Plans another
host still runs (a V100 staying on 10.4) stay. The controller carries the plan out
(``cluster.controller.upgrades``); ``fleet upgrade NODE --tensorrt VERSION --dry-run`` shows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workers.build import BuildRequest
from workers.devices import Device
from workers.errors import SourceNotKept, UpgradeRefused
from workers.manifest import Manifest
from workers.targets import Runtime, Target, WorkerCaps, can_run, same_release


@dataclass(frozen=True)
class Rebuild:
    """One new plan: ``old`` built again for ``target`` (the new TensorRT release) on ``device``."""

    old: Manifest
    target: Target
    device: Device  # the node's GPU it is built on (its builder takes this identity)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.old.model, self.old.version, self.old.precision, self.target.key())

    @property
    def calibration_method(self) -> str | None:
        """int8: the calibration method the old plan used (its calibration is in the repository)."""
        recorded = self.old.build_options.get("calibration")
        return recorded.split("-", 1)[1] if recorded and "-" in recorded else None

    def request(self, source_name: str, custom_ops: tuple[str, ...] = ()) -> BuildRequest:
        """The build of the new plan, as the old one was built (its options are the cache key)."""
        options = {k: v for k, v in self.old.build_options.items() if not k.startswith("fallback_")}
        return BuildRequest(source_name, self.old.model, self.target, version=self.old.version,
                            max_batch=self.old.max_batch, options=options, custom_ops=custom_ops)

    def describe(self) -> str:
        return f"{self.old.model} v{self.old.version} {self.old.precision} for {self.target.describe()}"


@dataclass(frozen=True)
class UpgradePlan:
    node: str
    old_versions: tuple[str, ...]  # the TensorRT releases the node's workers have now
    version: str  # the release they move to
    rebuilds: tuple[Rebuild, ...]  # new plans to build first
    ready: tuple[Manifest, ...]  # new plans the repository has already (an upgrade run again)
    drop: tuple[Manifest, ...]  # old plans no worker of the fleet can run once the node is upgraded
    workers: tuple[str, ...]  # the node's workers, rolled one at a time

    def to_dict(self) -> dict:
        return {
            "node": self.node, "from": list(self.old_versions), "to": self.version, "workers": list(self.workers),
            "rebuild": [r.describe() for r in self.rebuilds],
            "ready": [f"{m.model} v{m.version} {m.precision} for {m.target.describe()}" for m in self.ready],
            "drop": [m.engine_key for m in self.drop],
        }


def tensorrt_versions(caps: WorkerCaps) -> tuple[str, ...]:
    return tuple(r.version for r in caps.runtimes if r.backend == "tensorrt")


def upgraded(caps: WorkerCaps, version: str) -> WorkerCaps:
    """The same worker with TensorRT ``version`` in place of the TensorRT it has (simulated stays simulated)."""
    trt = [r for r in caps.runtimes if r.backend == "tensorrt"]
    simulated = trt[0].simulated if trt else caps.device.simulated
    others = tuple(r for r in caps.runtimes if r.backend != "tensorrt")
    return dataclasses.replace(caps, runtimes=others + (Runtime("tensorrt", version, "tensorrt", simulated=simulated),))


def check_upgrade(node: str, workers: list[WorkerCaps], version: str,
                  refusal: Callable[[Device, str], str | None]) -> None:
    """UpgradeRefused when the node runs ``version`` already or one of its GPUs cannot run it
    (``refusal``: the release support table, ``cluster.runtime_policy.tensorrt_refusal``)."""
    have = sorted({v for w in workers for v in tensorrt_versions(w)})
    if have and all(same_release(v, version) for v in have):
        raise UpgradeRefused(f"node {node} runs TensorRT {', '.join(have)} already: nothing to upgrade")
    for caps in workers:
        why = refusal(caps.device, version)
        if why:
            raise UpgradeRefused(f"node {node} cannot move to TensorRT {version}: {why}. Nothing was changed")


def plan_upgrade(node: str, manifests: Iterable[Manifest], node_workers: list[WorkerCaps],
                 fleet_workers: list[WorkerCaps], version: str) -> UpgradePlan:
    """What moving ``node_workers`` (the node's, as they are now) to TensorRT ``version`` takes;
    ``fleet_workers``: every worker of the fleet (the node's among them or not)."""
    manifests = list(manifests)
    after_node = [upgraded(c, version) for c in node_workers]
    ids = {c.worker_id for c in node_workers}
    after_fleet = after_node + [c for c in fleet_workers if c.worker_id not in ids]
    stored = {(m.model, m.version, m.precision, m.target.key()): m for m in manifests}
    rebuilds: dict[tuple, Rebuild] = {}
    ready: dict[tuple, Manifest] = {}
    for m in manifests:
        if m.target.backend != "tensorrt":
            continue
        for before, after in zip(node_workers, after_node):
            if not can_run(m, before) or can_run(m, after):
                continue  # not served here now, or still runs after (a version-compatible plan)
            target = dataclasses.replace(m.target, backend_version=version)
            if not can_run(target, after):
                continue
            rebuild = Rebuild(m, target, before.device)
            have = stored.get(rebuild.key)
            if have is not None and have.source_sha256 == m.source_sha256 and have.max_batch == m.max_batch:
                ready.setdefault(rebuild.key, have)
            else:
                rebuilds.setdefault(rebuild.key, rebuild)
    drop = [m for m in manifests if m.target.backend == "tensorrt"
            and any(can_run(m, c) for c in node_workers) and not any(can_run(m, c) for c in after_fleet)]
    old = tuple(sorted({v for c in node_workers for v in tensorrt_versions(c)}))
    return UpgradePlan(node, old, version, tuple(rebuilds.values()), tuple(ready.values()), tuple(drop),
                       tuple(sorted(ids)))


def check_sources(plan: UpgradePlan, has_source: Callable[[str], bool]) -> None:
    """SourceNotKept naming every model whose source the repository does not keep (built before builds
    kept their sources), with the command that fixes it."""
    missing = sorted({(r.old.model, r.old.version, r.old.precision) for r in plan.rebuilds
                      if not has_source(r.old.source_sha256)})
    if missing:
        what = ", ".join(f"{m} v{v} ({p})" for m, v, p in missing)
        model, ver, precision = missing[0]
        raise SourceNotKept(
            f"the repository does not keep the source of {what} (built before builds kept their sources), so "
            f"node {plan.node} cannot be moved to TensorRT {plan.version}: run `fleet build SOURCE.onnx --name {model} "
            f"--version {ver} --precision {precision}` again for each (cached targets are not rebuilt; the source is "
            f"kept from then on), then `fleet upgrade {plan.node} --tensorrt {plan.version}`. Nothing was changed")

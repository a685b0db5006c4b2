"""The controller's part of a node's TensorRT upgrade (``fleet upgrade NODE --tensorrt VERSION``).

The plan is ``cluster.upgrade`` (pure); here it is carried out in order, each step an event and a
progress line:

1. the new plans are built first, by a temporary build-only worker started on that node with the
   new runtime (a simulated node: its declared GPU with the new simulated TensorRT; a real GPU: its
   type's environment with the new TensorRT, and what it probes is what it has), from the sources
   the repository keeps; each passes the usual accuracy check and is published. A failure stops
   the upgrade here: nothing else has changed and the old plans serve on;
2. the node's new release is recorded in the repository (a controller that restarts keeps it);
3. the node's workers are rolled one at a time (out of every route, what they hold finished,
   restarted with the new runtime, up with the new plans of what they served loaded) while the
   others serve the old plans;
4. the old plans no worker of the fleet can run any more are deleted, and the repository read again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cluster.calls import call
from cluster.config import FleetConfig
from cluster.controller.draining import UP, stop_worker
from cluster.controller.environments import prepare_environments
from cluster.controller.events import EventLog
from cluster.controller.loading import Loader
from cluster.controller.plan import WorkerActor, with_tensorrt
from cluster.controller.pool import WorkerPool
from cluster.repository import Repository
from cluster.rollout_store import write_tensorrt_upgrade
from cluster.router import Router
from cluster.runtime_policy import tensorrt_refusal
from cluster.upgrade import (
    Rebuild,
    UpgradePlan,
    check_sources,
    check_upgrade,
    plan_upgrade,
    tensorrt_versions,
)
from workers.actor import WorkerSpec
from workers.build import EvalData
from workers.devices import Device
from workers.errors import (
    BuildError,
    InvalidInput,
    NotReady,
    UnknownNode,
    UpgradeRefused,
)
from workers.manifest import Manifest
from workers.targets import can_run, parse_version, same_release

ROLL_DRAIN_S = 60.0  # how long a rolled worker may take to finish what it holds
BUILDER_START_S = 120.0


class Upgrades:
    def __init__(self, config: FleetConfig, repo: Repository, pool: WorkerPool, loader: Loader, router: Router,
                 events: EventLog, scan: Callable[[], Awaitable], routes_applied: Callable[[], Awaitable[None]],
                 manifests: Callable[[], list[Manifest]]) -> None:
        self.config = config
        self.repo = repo
        self.pool = pool
        self.loader = loader
        self.router = router  # the controller's
        self.events = events
        self._scan = scan
        self._routes_applied = routes_applied
        self._manifests = manifests
        self._lock = asyncio.Lock()
        self.progress: list[str] = []  # the running (or last) upgrade's lines, for the CLI

    def _say(self, line: str, event: str, **fields) -> None:
        self.progress.append(line)
        self.events.add(event, **fields)

    def _profile(self, device: Device):
        return self.config.runtime_profiles().for_device(device)

    async def plan(self, node: str, version: str) -> UpgradePlan:
        """What upgrading ``node`` to TensorRT ``version`` takes; the typed refusals when it cannot be done."""
        try:
            parse_version(version)
        except ValueError:
            raise InvalidInput(f"--tensorrt takes a release such as 10.16.1.11, got {version!r}") from None
        members = self.pool.of_node(node)
        if not members:
            raise UnknownNode(f"the fleet has no node {node!r}; its nodes: {', '.join(self.pool.node_names())}")
        down = [wid for wid, m in members.items() if m.state != UP or m.info is None]
        if down:
            raise NotReady(f"node {node}: worker(s) {', '.join(down)} not up; an upgrade rolls serving workers one at "
                           f"a time: wait until they are up (`fleet status`), then upgrade")
        node_caps = [m.info.caps for m in members.values()]
        check_upgrade(node, node_caps, version, tensorrt_refusal)
        fleet_caps = [r.info.caps for r in self.pool.records()]
        plan = plan_upgrade(node, self._manifests(), node_caps, fleet_caps, version)
        missing = {r.old.source_sha256 for r in plan.rebuilds}
        kept = {sha: await asyncio.to_thread(self.repo.has_source, sha) for sha in missing}
        check_sources(plan, kept.__getitem__)
        return plan

    async def run(self, node: str, version: str, dry_run: bool = False) -> dict:
        if self._lock.locked():
            raise UpgradeRefused("an upgrade is under way already; one at a time (`fleet status` shows its events)")
        async with self._lock:
            if not dry_run:
                self.progress = []
            plan = await self.plan(node, version)
            if dry_run:
                return dict(plan.to_dict(), dry_run=True)
            t0 = time.monotonic()
            self._say(f"upgrading {node} from TensorRT {', '.join(plan.old_versions)} to {version}: "
                      f"{len(plan.rebuilds)} plan(s) to build, {len(plan.workers)} worker(s) to roll",
                      "upgrade-started", node=node, to=version, **{"from": list(plan.old_versions)})
            try:
                built = await self._build_all(plan)
                await self._scan()
                await asyncio.to_thread(write_tensorrt_upgrade, self.repo, node, version)
                self.pool.tensorrt[node] = version
                self._say(f"recorded: {node} runs TensorRT {version} from now on (update the fleet config too)",
                          "upgrade-recorded", node=node, version=version)
                rolled = [await self._roll(node, wid, version) for wid in plan.workers]
                dropped = await self._drop(plan)
            except Exception as exc:
                reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                recorded = self.pool.tensorrt.get(node) == version
                self._say(f"FAILED: {reason}" + (f"; run `fleet upgrade {node} --tensorrt {version}` again to finish "
                                                 f"(what is done is kept)" if recorded else "; nothing was changed"),
                          "upgrade-failed", node=node, reason=reason)
                raise
            seconds = round(time.monotonic() - t0, 1)
            self._say(f"done in {seconds} s: {node} runs TensorRT {version}", "upgrade-done", node=node,
                      version=version, seconds=seconds)
            return dict(plan.to_dict(), built=built, rolled=rolled, dropped=dropped, seconds=seconds)

    # ---- 1. the new plans, built first on a builder with the new runtime -------------------
    async def _build_all(self, plan: UpgradePlan) -> list[str]:
        by_device: dict[str, list[Rebuild]] = {}
        for rebuild in plan.rebuilds:
            by_device.setdefault(rebuild.device.uuid, []).append(rebuild)
        built: list[str] = []
        for rebuilds in by_device.values():
            builder = await self._start_builder(plan, rebuilds[0].device)
            try:
                for rebuild in rebuilds:
                    built.append(await self._rebuild(builder, rebuild))
            finally:
                await stop_worker(builder)
        for m in plan.ready:
            self.progress.append(f"  ready already: {m.engine_key}")
        return built

    async def _start_builder(self, plan: UpgradePlan, device: Device):
        """A build-only worker on the node, with the node's GPU identity and the new runtime."""
        wid, member = next((w, m) for w, m in self.pool.of_node(plan.node).items() if m.info.caps.device == device)
        spec = with_tensorrt(member.spec, plan.version, self._profile(device))
        options = dict(member.options)  # its node, and its type's environment (unless the new TensorRT changes it)
        if spec.environment != member.spec.environment:
            options.pop("runtime_env", None)
            await _prepare(spec, options, self.events)
        if device.simulated:  # the declared GPU itself (no GPU slot taken: its serving worker holds it)
            budgets = dict(zip((d.uuid for d in member.spec.simulated_devices), member.spec.simulated_budgets))
            spec = dataclasses.replace(spec, simulated_devices=(device,), simulated_budgets=(budgets.get(device.uuid),))
        else:  # beside the serving worker on its GPU; its build workspace is bounded (build_workspace_bytes)
            env = {"CUDA_VISIBLE_DEVICES": device.uuid, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
            options["runtime_env"] = dict(options.get("runtime_env") or {}, env_vars=env)
        spec = dataclasses.replace(spec, worker_id=f"{wid}-builder")
        builder = WorkerActor.options(**dict(options, num_gpus=0)).remote(spec)
        try:
            info = await asyncio.wait_for(call(builder.info.remote()), BUILDER_START_S)
        except Exception:
            await stop_worker(builder)
            raise
        have = tensorrt_versions(info.caps)
        if not any(same_release(v, plan.version) for v in have):
            await stop_worker(builder)
            raise BuildError(f"the builder on {plan.node} has TensorRT {', '.join(have) or 'none'}, not {plan.version}: "
                             f"its environment did not install it (`fleet doctor`); nothing was changed")
        self._say(f"builder {spec.worker_id} up on {plan.node}: {device.describe()}, TensorRT {', '.join(have)}",
                  "upgrade-builder-up", node=plan.node, builder=spec.worker_id, tensorrt=have)
        return builder

    async def _rebuild(self, builder, rebuild: Rebuild) -> str:
        t0 = time.monotonic()
        old = rebuild.old
        source = await asyncio.to_thread(self.repo.read_source, old.source_sha256)
        libraries = {lib.file_name: await asyncio.to_thread(self.repo.read_library, lib) for lib in old.custom_ops}
        request = rebuild.request(f"{old.model}.onnx", tuple(libraries))
        calibration = evaluation = None
        if old.precision == "int8":
            calibration = await asyncio.to_thread(self.repo.find_calibration, old.source_sha256, rebuild.calibration_method)
            if calibration is None:
                raise BuildError(f"{old.model} v{old.version} is int8 and the repository has no calibration of its source "
                                 f"any more; run `fleet build ... --precision int8_calib` again; nothing was changed")
            if calibration.heldout is not None:
                rows = len(next(iter(calibration.heldout.values())))
                evaluation = EvalData(calibration.heldout, judged_on=f"{rows} calibration rows kept out of the calibration")
        manifest, data = await call(builder.build_from_bytes.remote(source, request, calibration, evaluation,
                                                                    libraries or None))
        by_sha = {lib.sha256: libraries[lib.file_name] for lib in old.custom_ops}
        stored = await asyncio.to_thread(self.repo.publish, Manifest.from_dict(manifest), data, by_sha)
        accuracy = {k: v for k, v in stored.manifest.accuracy.items() if k in ("rel_l2_error", "top1_agreement")}
        self._say(f"  built {rebuild.describe()} in {time.monotonic() - t0:.1f} s (passed: {accuracy})",
                  "upgrade-built", engine=stored.manifest.engine_key, accuracy=accuracy, location=stored.location)
        return stored.manifest.engine_key

    # ---- 3. the node's workers, one at a time ----------------------------------------------
    async def _roll(self, node: str, worker_id: str, version: str) -> dict:
        member = self.pool.of_node(node)[worker_id]
        held = sorted({tuple(key.split(":")[:2]) for key in self.router.workers[worker_id].loaded})
        spec = with_tensorrt(member.spec, version, self._profile(member.info.caps.device))
        self.progress.append(f"  rolling {worker_id} (serves {', '.join(f'{m} v{v}' for m, v in held) or 'nothing'}) ...")
        result = await self.pool.roll(worker_id, spec, self._routes_applied, ROLL_DRAIN_S)
        for model, model_version in held:  # the new plans of what it served, before the next worker goes
            await self.loader.ensure_loaded(model, model_version, allow_eviction=False, only={worker_id})
        await self._routes_applied()
        have = tensorrt_versions(self.pool.info(worker_id).caps)
        if not any(same_release(v, version) for v in have):
            raise NotReady(f"worker {worker_id} came back with TensorRT {', '.join(have)}, not {version}; the upgrade "
                           f"stopped there (`fleet doctor`)")
        loaded = sorted(self.router.workers[worker_id].loaded)
        self._say(f"  {worker_id}: TensorRT {', '.join(have)}, serving {', '.join(loaded) or 'nothing'} "
                  f"(drained in {result['drained_s']} s, back in {result['seconds']} s)",
                  "upgrade-worker-rolled", tensorrt=have, loaded=loaded, **result)
        return dict(result, loaded=loaded, tensorrt=have)

    # ---- 4. the old plans no worker runs any more ------------------------------------------
    async def _drop(self, plan: UpgradePlan) -> list[str]:
        workers = [r.info.caps for r in self.pool.records()]
        dropped = []
        for m in plan.drop:
            if any(can_run(m, caps) for caps in workers):
                continue  # a worker still runs it after all (one that joined meanwhile)
            if any(m.engine_key in state.loaded for state in self.router.workers.values()):
                await self.loader.unload(m.model, m.version, [m], explicit=False)
            await asyncio.to_thread(self.repo.remove_artifact, m)
            dropped.append(m.engine_key)
            self._say(f"  dropped {m.engine_key} (no worker of the fleet runs TensorRT {m.target.backend_version} "
                      f"for {m.target.compute_capability} any more)", "upgrade-dropped", engine=m.engine_key)
        await self._scan()
        return dropped


@dataclass
class _Placed:
    """What ``prepare_environments`` reads and sets of a worker to be started: its spec and Ray options."""

    spec: WorkerSpec
    options: dict


async def _prepare(spec: WorkerSpec, options: dict, events: EventLog) -> None:
    """The builder's environment (a real GPU's type with the new TensorRT), prepared on its node."""
    placed = _Placed(spec, options)
    await prepare_environments([placed], events)
    options.update(placed.options)


class UpgradeVerbs:
    """The controller's verbs for upgrades (``FleetController`` has them; the CLI calls them)."""

    async def upgrade_tensorrt(self, node: str, version: str, dry_run: bool = False) -> dict:
        """`fleet upgrade NODE --tensorrt VERSION`: rebuild, roll the node's workers, drop the old plans."""
        self._need_gcs(f"upgrading node {node}")
        return await self.upgrades.run(node, version, dry_run)

    async def upgrade_progress(self, since: int = 0) -> list[str]:
        """The running (or last) upgrade's progress lines from ``since`` on."""
        return self.upgrades.progress[since:]

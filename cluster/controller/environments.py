"""Each GPU type's Python environment, prepared by a Ray task on each node whose workers need it
(once per host: cached, ``cluster.runtime_envs``) and handed to those workers as their runtime_env."""

from __future__ import annotations

import asyncio
import time

import ray
from ray.exceptions import RayError

from workers.errors import FleetError

from cluster.calls import call
from cluster.controller.events import EventLog
from cluster.runtime_envs import PIP_TIMEOUT_S, prepare_environment

_prepare = ray.remote(prepare_environment)


async def prepare_environments(members: list, events: EventLog) -> None:
    """Prepare the environments ``members`` (the pool's, with ``spec`` and ``options``) ask for and set
    each one's ``runtime_env``. One that fails is reported; its workers start in the fleet's own
    environment, and what they really have is what they report (probe, don't declare)."""
    jobs: dict[tuple, list] = {}
    for member in members:
        if member.spec.environment:
            where = member.options.get("label_selector") or member.options.get("scheduling_strategy")
            jobs.setdefault((repr(where), member.spec.environment), []).append(member)

    async def prepare(group: list) -> None:
        first = group[0]
        placement = {k: v for k, v in first.options.items() if k in ("label_selector", "scheduling_strategy")}
        t0 = time.monotonic()
        try:
            python = await asyncio.wait_for(call(_prepare.options(num_cpus=0, **placement).remote(
                first.spec.environment)), PIP_TIMEOUT_S + 60)
        except (FleetError, asyncio.TimeoutError, RayError) as exc:
            events.add("runtime-env-failed", node=first.spec.node_name, packages=list(first.spec.environment),
                       reason=getattr(exc, "message", None) or str(exc) or type(exc).__name__)
            return
        events.add("runtime-env-ready", node=first.spec.node_name, packages=list(first.spec.environment),
                   seconds=round(time.monotonic() - t0, 1))
        for member in group:
            member.options = dict(member.options, runtime_env={"py_executable": python})

    await asyncio.gather(*(prepare(group) for group in jobs.values()))

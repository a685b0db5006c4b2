"""Ray call helpers: get a worker's own exception back, and tell failures apart.

Every caller of a worker (the data plane, the batch job, the build farm, the
controller) reads a failed call the same way: the worker process died
(``RayActorError``: try another worker), the engine was evicted under it
(``EngineNotHere``: refresh and try again), or the worker raised something it
meant (re-raise it as it is).
"""

from __future__ import annotations

import enum
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.errors import DeviceFailed, EngineNotHere


def unwrap(exc: BaseException) -> BaseException:
    """The exception a worker raised, without Ray's RayTaskError wrapper."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


async def call(ref) -> Any:
    """Await a Ray call, re-raising the remote exception itself."""
    try:
        return await ref
    except RayTaskError as exc:
        raise unwrap(exc) from None


def get(ref, timeout: float | None = None) -> Any:
    """``ray.get`` one call, re-raising the remote exception itself."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as exc:
        raise unwrap(exc) from None


class Failure(enum.Enum):
    WORKER_LOST = "worker-lost"  # the process is gone (or its GPU context broke): try another worker
    ENGINE_GONE = "engine-gone"  # evicted a moment ago: refresh the inventory, try again
    FINAL = "final"  # the worker meant it (bad input, ...): give it to the caller


def classify(exc: BaseException) -> tuple[Failure, BaseException]:
    """What a failed call to a worker means, and the worker's own exception."""
    if isinstance(exc, RayActorError):
        return Failure.WORKER_LOST, exc
    cause = unwrap(exc)
    if isinstance(cause, DeviceFailed):  # alive, but its GPU computes no more: as good as lost
        return Failure.WORKER_LOST, cause
    if isinstance(cause, EngineNotHere):
        return Failure.ENGINE_GONE, cause
    return Failure.FINAL, cause

"""Version rollout across a mixed fleet: which version of a model serves unpinned requests where.

Plain Python, no Ray. A request that names no version is served, on each worker, by that
worker's *default* version of the model:

- nothing promoted: the highest version with an artifact the worker can run (per-type latest).
  A version 2 built for the T4s only becomes the T4s' default; the P4 and the V100 keep
  serving version 1 until artifacts of version 2 for them pass their build;
- a version promoted (``fleet promote MODEL VERSION``): it caps every worker, which serves the
  highest version not newer than the promoted one that it can run; on every GPU type with an
  artifact of the promoted version, that is the promoted version itself;
- ``fleet rollback MODEL``: the promotion before the last one, or per-type latest when there
  was none.

A promotion is refused while some GPU type of the fleet has no artifact of that version
(its workers would stay on an older one); ``force`` caps them anyway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from workers.devices import Device
from workers.errors import InvalidInput, ModelNotFound
from workers.manifest import Manifest, version_sort_key

# GPU type: the short model name people use ("T4", "V100", "A100"): from "Tesla T4",
# "Tesla V100-SXM2-16GB", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3".
_VENDOR = re.compile(r"^(NVIDIA|Tesla|GeForce|Quadro)\s+", re.IGNORECASE)


def gpu_type(device: Device) -> str:
    """The GPU type of a device ("T4", "P4", "V100", ...), "cpu" for the CPU."""
    if not device.is_gpu:
        return "cpu"
    name = device.name.strip()
    while True:
        stripped = _VENDOR.sub("", name)
        if stripped == name:
            break
        name = stripped
    first = re.split(r"[\s\-_]+", name)[0] if name else ""
    return first or device.name


@dataclass
class RolloutState:
    """Promotions per model, newest last (rollback pops one)."""

    promotions: dict[str, list[str]] = field(default_factory=dict)

    def promoted(self, model: str) -> str | None:
        stack = self.promotions.get(model)
        return stack[-1] if stack else None

    def to_json(self) -> str:
        return json.dumps({"promotions": self.promotions}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "RolloutState":
        data = json.loads(text)
        promotions = data.get("promotions", {})
        if not isinstance(promotions, dict) or not all(isinstance(v, list) for v in promotions.values()):
            raise ValueError("rollout state: 'promotions' must map model names to lists of versions")
        return cls({str(m): [str(v) for v in vs] for m, vs in promotions.items()})


def promote(state: RolloutState, model: str, version: str, versions: Iterable[str]) -> RolloutState:
    """``version`` pins unpinned traffic of ``model`` from now on (``versions``: those in the repository)."""
    known = list(versions)
    if not known:
        raise ModelNotFound(f"Request for unknown model: model '{model}' is not in the repository")
    if version not in known:
        raise ModelNotFound(f"model '{model}' has no version '{version}' to promote "
                            f"(versions: {', '.join(sorted(known, key=version_sort_key))})")
    stack = list(state.promotions.get(model, []))
    if stack[-1:] != [version]:
        stack.append(version)
    return RolloutState({**state.promotions, model: stack})


def rollback(state: RolloutState, model: str) -> RolloutState:
    """Undo the last promotion of ``model``: the one before it, or per-type latest."""
    stack = list(state.promotions.get(model, []))
    if not stack:
        raise InvalidInput(f"model '{model}' has no promotion to roll back (unpinned requests already get each "
                           f"GPU type's latest version); pin one with `fleet promote {model} VERSION`")
    stack.pop()
    promotions = dict(state.promotions)
    if stack:
        promotions[model] = stack
    else:
        promotions.pop(model, None)
    return RolloutState(promotions)


RunsOn = Callable[[Manifest], bool]


def default_version(versions: dict[str, list[Manifest]], runs: RunsOn, promoted: str | None) -> str | None:
    """The version a worker serves unpinned requests with: the highest it has an artifact for,
    not newer than ``promoted`` when one is promoted; None when it can run none."""
    cap = version_sort_key(promoted) if promoted is not None else None
    for version in sorted(versions, key=version_sort_key, reverse=True):
        if cap is not None and version_sort_key(version) > cap:
            continue
        if any(runs(m) for m in versions[version]):
            return version
    return None


@dataclass(frozen=True)
class TypeRollout:
    """What one GPU type serves for one model: its default version, and the newest it could not take."""

    gpu_type: str
    workers: tuple[str, ...]
    default: str | None
    waiting_for: str | None = None  # a newer version this type has no artifact for yet


def rollout_view(model: str, versions: dict[str, list[Manifest]], types: dict[str, tuple[list[str], RunsOn]],
                 promoted: str | None) -> dict:
    """The status of one model's rollout: per GPU type, the default and what it waits for.

    ``types``: GPU type -> (its workers, whether an artifact runs there)."""
    latest = max(versions, key=version_sort_key) if versions else None
    target = promoted or latest
    rows = []
    for name, (members, runs) in sorted(types.items()):
        default = default_version(versions, runs, promoted)
        waiting = target if target is not None and default != target else None
        rows.append(TypeRollout(name, tuple(sorted(members)), default, waiting))
    defaults = {r.default for r in rows if r.default is not None}
    return {
        "model": model,
        "promoted": promoted,
        "latest": latest,
        "mixed": len(defaults) > 1,
        "types": [{"gpu_type": r.gpu_type, "workers": list(r.workers), "default": r.default,
                   "waiting_for": r.waiting_for} for r in rows],
    }


def missing_types(version: str, versions: dict[str, list[Manifest]], types: dict[str, tuple[list[str], RunsOn]]) -> list[str]:
    """GPU types of the fleet with no artifact of ``version`` they can run."""
    manifests = versions.get(version, [])
    return sorted(name for name, (_, runs) in types.items() if not any(runs(m) for m in manifests))

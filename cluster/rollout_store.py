"""Where promotions live: ``_rollout/state.json`` in the repository, so that they outlive the
controller and every host of the fleet reads the same (cluster.rollout); and, the same way, the
TensorRT release each upgraded node runs (``_upgrades/tensorrt.json``, written by ``fleet upgrade``,
applied by ``cluster.controller.plan`` over the config's)."""

from __future__ import annotations

import json
import logging

from cluster.repository import Repository
from cluster.rollout import RolloutState

log = logging.getLogger("forward-fleet.rollout")

ROLLOUT = "_rollout"
STATE_FILE = "state.json"
UPGRADES = "_upgrades"  # a directory of its own: a publish replaces the whole directory
TENSORRT_FILE = "tensorrt.json"


def read_rollout(repo: Repository) -> RolloutState:
    try:
        data = repo.store.read_bytes(f"{ROLLOUT}/{STATE_FILE}")
    except FileNotFoundError:
        return RolloutState()
    try:
        return RolloutState.from_json(data)
    except ValueError as exc:  # serve per-type latest rather than nothing; say so
        log.error("%s/%s in %s is unreadable (%s): serving each GPU type's latest version", ROLLOUT, STATE_FILE,
                  repo.describe(), exc)
        return RolloutState()


def write_rollout(repo: Repository, state: RolloutState) -> str:
    """Replace the state atomically (renamed into place on a directory; one object on a store)."""
    return repo._publish_files(ROLLOUT, {STATE_FILE: state.to_json().encode()}, last=STATE_FILE)


def read_tensorrt_upgrades(repo: Repository) -> dict[str, str]:
    """Node name -> the TensorRT release ``fleet upgrade`` moved it to (empty: none was)."""
    try:
        data = json.loads(repo.store.read_bytes(f"{UPGRADES}/{TENSORRT_FILE}"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:  # the config's releases rather than nothing; say so
        log.error("%s/%s in %s is unreadable (%s): nodes start with the config's TensorRT", UPGRADES, TENSORRT_FILE,
                  repo.describe(), exc)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_tensorrt_upgrade(repo: Repository, node: str, version: str) -> str:
    """Record that ``node`` runs TensorRT ``version`` from now on (replaced atomically)."""
    upgrades = dict(read_tensorrt_upgrades(repo), **{node: version})
    data = json.dumps(upgrades, indent=2, sort_keys=True).encode()
    return repo._publish_files(UPGRADES, {TENSORRT_FILE: data}, last=TENSORRT_FILE)

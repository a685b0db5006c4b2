"""Where promotions live: ``_rollout/state.json`` in the repository, so that they outlive the
controller and every host of the fleet reads the same (cluster.rollout)."""

from __future__ import annotations

import logging

from cluster.repository import Repository
from cluster.rollout import RolloutState

log = logging.getLogger("forward-fleet.rollout")

ROLLOUT = "_rollout"
STATE_FILE = "state.json"


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

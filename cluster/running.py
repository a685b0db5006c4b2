"""What a CLI command acts on: the running fleet, as its controller describes it.

``fleet build``, ``models``, ``infer``, ``batch`` and ``status`` take the repository, the
URL and the ports from the fleet itself (``FleetController.describe``), never from a
config default relative to the current directory. ``--url`` / ``FLEET_URL``,
``--config`` / ``--repository`` and ``--address`` still override; without a running
fleet, ``build`` and ``models`` work on the configured repository on their own.
"""

from __future__ import annotations

import argparse

from workers.errors import InvalidConfig, NotReady

from cluster.buildfarm import AnyRepository, FleetRepository
from cluster.config import load_config
from cluster.deploy import check_repository
from cluster.env import fleet_url
from cluster.nodes import RunningFleet, running_fleet
from cluster.repository import Repository

NO_FLEET = "no fleet is running on this machine's Ray cluster (start one with `fleet up`, or pass --address)"


def url_of(args: argparse.Namespace) -> str:
    """--url, else FLEET_URL, else the running fleet's own URL."""
    url = getattr(args, "url", None) or fleet_url()
    if url:
        return url
    try:
        fleet = running_fleet(getattr(args, "address", None))
    except NotReady as exc:
        raise NotReady(f"{exc.message}; or name the fleet with --url / FLEET_URL") from None
    if fleet is None:
        raise NotReady(f"{NO_FLEET}; or name the fleet with --url / FLEET_URL")
    return fleet.url


def repository_of(args: argparse.Namespace) -> tuple[AnyRepository, RunningFleet | None]:
    """The repository a command works on: --repository (alone, on this machine) if given; else the
    running fleet's, through its controller; else the one of --config (or the built-in default)."""
    explicit = getattr(args, "repository", None)
    fleet = None if explicit else running_fleet(getattr(args, "address", None))
    if fleet is not None:
        return FleetRepository(fleet.controller), fleet
    config = load_config(getattr(args, "config", None), repository=explicit)
    repo = Repository(config.store_spec())
    if not repo.is_local:
        check_repository(config)
    return repo, None


def dashboard_of(args: argparse.Namespace) -> str:
    """Ray's dashboard (jobs go there): --address, else the running fleet's cluster's, else --config's port."""
    if args.address:
        return args.address
    fleet = running_fleet(None)
    if fleet is not None and fleet.dashboard:
        return fleet.dashboard
    if fleet is None and not args.config:
        raise NotReady(f"{NO_FLEET}; or pass --address http://HEAD:DASHBOARD_PORT")
    return f"http://127.0.0.1:{load_config(args.config).dashboard_port}"


def require_fleet_for_targets(targets: str | None, fleet: RunningFleet | None, explicit_repository: bool) -> None:
    if targets in (None, "cpu") or fleet is not None:
        return
    if explicit_repository:
        raise InvalidConfig(f"--targets {targets} builds on the fleet's workers into the fleet's repository; "
                            f"--repository builds on this machine (drop one of them)")
    raise NotReady(f"--targets {targets} builds on the fleet's workers, but {NO_FLEET}; "
                   f"start one with `fleet up --config ...` (or use --local for a CPU artifact)")

"""forward-fleet's fleet layer: repository, router, controller, HTTP app, client, CLI."""

from cluster.client import AsyncFleetClient, FleetClient
from cluster.config import FleetConfig, load_config

__all__ = ["AsyncFleetClient", "FleetClient", "FleetConfig", "load_config"]

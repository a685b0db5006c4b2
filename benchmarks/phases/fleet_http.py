"""fleet-http: the fleet's KServe v2 endpoint, binary and JSON, driven by the load generator
(a separate process) at fixed concurrency levels."""

from __future__ import annotations

from benchmarks.common import local_fleet
from benchmarks.httpbench import http_matrix


def run(spec: dict) -> dict:
    """``spec["front_door"]`` (default True) and ``spec["protocols"]`` (default both) pick what runs."""
    with local_fleet(spec) as fleet:
        rows = http_matrix("fleet-http", fleet.mode, fleet.url, spec, protocols=spec.get("protocols", ("binary", "json")))
        return {"rows": rows, "info": {"deploy_s": fleet.deploy_s, "serve_mode": fleet.mode, "url": fleet.url}}

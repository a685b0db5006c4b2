"""fleet-levers: the fleet without its front door (HTTP through Ray Serve's ingress), binary only.

The orchestrator runs it once per Serve mode (classic proxy, direct ingress,
throughput-optimized + HAProxy: ``benchmarks.plans``), each in a fresh process and Ray,
to show what each of Serve's levers is worth on the fleet's miss path."""

from __future__ import annotations

from benchmarks.phases import fleet_http


def run(spec: dict) -> dict:
    return fleet_http.run(dict(spec, front_door=False, protocols=["binary"], shipped=False))

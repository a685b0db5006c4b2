"""Ray Serve's modes: the environment that selects one for a phase process, and how to reach Serve in it.

Ray Serve 2.60 reads its switches (``RAY_SERVE_THROUGHPUT_OPTIMIZED``, ``..._ENABLE_HA_PROXY``,
``..._ENABLE_DIRECT_INGRESS``) from the environment when it is imported, in every Serve
process, so each mode runs in a fresh Ray in a process of its own: the orchestrator
builds that process's environment here (``phase_env``), and the phase reads back which
mode it is in (``serve_mode``) and where Serve listens (``direct_ingress_url``).
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import requests

from cluster.env import ray_env
from cluster.net import free_port

# Every mode names all three switches, so cluster.env's defaults (setdefault) cannot
# change what a mode means.
SERVE_SWITCHES = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS")
SERVE_MODES = {
    "classic-proxy": dict.fromkeys(SERVE_SWITCHES, "0"),
    "direct-ingress": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0",
                       "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "throughput-optimized+haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                                     "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
}
# Direct-ingress replicas otherwise drain for 30 s + 5 s on delete; a benchmark has no
# clients to protect at teardown. (Shutdown only: no effect on the measured path.)
TEARDOWN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
# Where direct-ingress replicas listen: Serve allocates their HTTP ports from range(MIN, MAX).
DI_PORT_MIN, DI_PORT_MAX = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
DI_PORTS = 16  # ingress replicas of the fleet (<= 8) and the naive apps (one each), with room to spare


def mode_of(env) -> str:
    """Which Serve mode an environment selects (SERVE_MODES' names, or the two without a lever here)."""
    on = lambda k: env.get(k) == "1"  # noqa: E731
    if on("RAY_SERVE_ENABLE_HA_PROXY"):
        return "throughput-optimized+haproxy" if on("RAY_SERVE_THROUGHPUT_OPTIMIZED") else "haproxy"
    if on("RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        return "throughput-optimized"
    return "direct-ingress" if on("RAY_SERVE_ENABLE_DIRECT_INGRESS") else "classic-proxy"


def serve_mode() -> str:
    """The Serve mode of this (phase) process."""
    return mode_of(os.environ)


def fleet_mode(front_door: bool) -> str:
    """How the fleet of this phase process serves HTTP, as rows and the chart name it."""
    return f"front door + {serve_mode()}" if front_door else serve_mode()


def fleet_env() -> dict[str, str]:
    """This process's environment with the fleet's defaults (cluster.env.ray_env) and none of the
    caller's Serve switches: a phase never inherits a mode from the shell it was started in."""
    saved = {k: os.environ.pop(k) for k in SERVE_SWITCHES if k in os.environ}
    try:
        return ray_env()
    finally:
        os.environ.update(saved)


def shipped_mode() -> str:
    """The Serve mode the fleet runs in by default (what cluster.env sets when the shell sets none)."""
    return mode_of(fleet_env())


def phase_env(mode: str | None, scratch: Path) -> dict[str, str]:
    """The complete environment of a phase process running Ray Serve in ``mode`` (None: as shipped).

    Complete before the process starts, so that a phase module may import Ray and Serve at
    its top. HAProxy mode keeps its config, admin socket and state under /tmp/haproxy-serve
    by default, shared by every Serve on the host: give each run its own directory so a
    benchmark never rewrites another Ray's HAProxy (or the other way round). Serve adds a
    56-character subdirectory and HAProxy takes socket paths of at most 97 characters, so
    ``scratch`` must be short (/tmp/ffb-XXXXXXXX).
    """
    env = dict(fleet_env(), **(SERVE_MODES[mode] if mode else {}), **TEARDOWN_ENV)
    low = _free_port_block(DI_PORTS)
    env.update({DI_PORT_MIN: str(low), DI_PORT_MAX: str(low + DI_PORTS)})
    if "haproxy" in mode_of(env):
        env.update(
            # fixed ports by default (8404, 9101) on all interfaces: one HAProxy per host
            RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(scratch / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(scratch / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(scratch),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(scratch / "server-state"),
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=str(scratch / "metrics.sock"),
        )
    return env


def _free_port_block(n: int, tries: int = 50) -> int:
    """The first of ``n`` consecutive ports nothing listens on now, between Ray's worker ports
    (10002-19999) and Serve's default direct-ingress range (30000-31000), below the kernel's
    ephemeral ports: another Ray on this host never hands these out."""
    rng = random.Random()
    for _ in range(tries):
        low = rng.randrange(20000, 30000 - n)
        if all(_bindable(p) for p in range(low, low + n)):
            return low
    raise RuntimeError(f"no {n} consecutive free ports in 20000-29999 after {tries} tries")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def direct_ingress_url(app_name: str, timeout_s: float = 60) -> str | None:
    """Where ``app_name``'s ingress replica listens itself under direct ingress without HAProxy, else None.

    Ray Serve has no public call that names a replica's port (the Serve controller's
    target groups are private API, and ``serve.status()`` does not carry them). This
    needs none: ``phase_env`` chose the port range Serve allocates direct-ingress ports
    from (the same kind of switch that selects the mode), and every direct-ingress replica
    answers Serve's documented ``GET /-/routes`` with ``{route_prefix: app_name}``, so the
    replica of ``app_name`` is the port in that range whose routes name it.
    """
    mode = serve_mode()
    if "haproxy" in mode or mode == "classic-proxy":
        return None
    if DI_PORT_MIN not in os.environ or DI_PORT_MAX not in os.environ:
        raise RuntimeError(f"{DI_PORT_MIN} and {DI_PORT_MAX} are not set: run phases through benchmarks.cli")
    ports = range(int(os.environ[DI_PORT_MIN]), int(os.environ[DI_PORT_MAX]))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for port in ports:
            url = f"http://127.0.0.1:{port}"
            try:
                routes = requests.get(url + "/-/routes", timeout=2).json()
            except (requests.RequestException, ValueError):
                continue
            if isinstance(routes, dict) and app_name in routes.values():
                return url
        time.sleep(0.5)
    raise RuntimeError(f"no direct-ingress replica of app {app_name} in ports {ports.start}-{ports.stop - 1} "
                       f"within {timeout_s:.0f} s")

"""GCS fault tolerance for a head `fleet up` starts: Redis, Ray's settings, the keeper.

``ray_start_settings`` gives the environment and flags of `ray start --head` (Ray reads
``RAY_REDIS_ADDRESS``; ``RAY_gcs_rpc_server_reconnect_timeout_s`` is how long raylets and
workers wait for a GCS that went away). ``gcs_fault_tolerance.redis: local`` starts a
redis-server on the head for it (append-only, so it also survives its own restart);
``fleet down`` stops it and drops its data, as it stops the keeper (cluster/gcs_keeper.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from workers.errors import NotReady

from cluster.config import GcsFaultTolerance
from cluster.console import say
from cluster.gcs_keeper import STATE_DIR, start_keeper, stop_keepers

__all__ = ["after_head_started", "node_env", "ray_start_settings", "start_local_redis", "stop_keepers",
           "stop_local_redis"]

REDIS_PASSWORD_ENV = "FLEET_GCS_REDIS_PASSWORD"


def ray_start_settings(ft: GcsFaultTolerance) -> tuple[dict[str, str], list[str]]:
    """Environment and extra `ray start` flags: for the head (Redis) and every node (the reconnect wait)."""
    if not ft.enabled:
        return {}, []
    env = {"RAY_REDIS_ADDRESS": ft.redis_address() or "",
           "RAY_gcs_rpc_server_reconnect_timeout_s": str(ft.reconnect_timeout_s)}
    password = os.environ.get(REDIS_PASSWORD_ENV)
    return env, ([f"--redis-password={password}"] if password else [])


def node_env(ft: GcsFaultTolerance) -> dict[str, str]:
    """What a non-head `ray start` needs: only the reconnect wait."""
    return {"RAY_gcs_rpc_server_reconnect_timeout_s": str(ft.reconnect_timeout_s)} if ft.enabled else {}


def _redis_dir(port: int) -> Path:
    return STATE_DIR / f"redis-{port}"


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_local_redis(ft: GcsFaultTolerance, timeout_s: float = 10.0) -> None:
    """redis-server on 127.0.0.1:local_redis_port for the GCS (a fresh one: old data is dropped)."""
    port = ft.local_redis_port
    binary = shutil.which("redis-server")
    if binary is None:
        raise NotReady("gcs_fault_tolerance.redis is \"local\" but redis-server is not installed "
                       "(Debian/Ubuntu: apt install redis-server); or name a Redis as host:port")
    if _reachable(port):
        raise NotReady(f"gcs_fault_tolerance.redis is \"local\" but 127.0.0.1:{port} is taken; "
                       f"set gcs_fault_tolerance.local_redis_port to a free port")
    data = _redis_dir(port)
    shutil.rmtree(data, ignore_errors=True)  # a new head starts with empty tables
    data.mkdir(parents=True)
    subprocess.run([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
                    "--save", "", "--daemonize", "yes", "--pidfile", str(data / "redis.pid"),
                    "--logfile", str(data / "redis.log")], check=True, capture_output=True)
    deadline = time.monotonic() + timeout_s
    while not _reachable(port):
        if time.monotonic() > deadline:
            raise NotReady(f"redis-server did not start on 127.0.0.1:{port}; see {data / 'redis.log'}")
        time.sleep(0.1)
    say(f"GCS fault tolerance: redis-server on 127.0.0.1:{port} (data in {data})")


def stop_local_redis() -> None:
    for pid_file in STATE_DIR.glob("redis-*/redis.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        shutil.rmtree(pid_file.parent, ignore_errors=True)


def after_head_started(ft: GcsFaultTolerance, ray_port: int) -> None:
    if ft.enabled and ft.restart:
        log = start_keeper(ray_port, ft.restart_delay_s)
        say(f"GCS fault tolerance: the GCS is restarted {ft.restart_delay_s:g} s after it dies (log: {log})")

"""Environment variables forward-fleet reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def ray_env() -> dict[str, str]:
    """Environment for Ray CLI subprocesses and drivers.

    Ray 2.60 turns token authentication on once ``~/.ray/auth_token`` exists; its
    CLI clients then need ``RAY_AUTH_MODE=token``. We keep authentication on.
    """
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    # Ray Serve's throughput-optimized mode (direct ingress, user code on the replica's loop):
    # several times the requests/s of the classic settings here (docs/performance.md). The
    # fleet's own HAProxy (cluster/frontdoor.py) stands in front of Serve, so Serve's HAProxy
    # mode (fixed host-wide ports 8404/9101 and /tmp/haproxy-serve) stays off.
    env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    env.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "0")
    # Serve keeps a direct-ingress replica 30 s after it is told to stop, for outside load balancers to
    # notice; the fleet's own front door is the only one in front of it, and a 30 s wait made every
    # `fleet down` and Ctrl-C slow.
    env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    # Ray's GCS declares a node dead after this many missed health checks (3 s apart; Ray's default 5):
    # a host whose link flaps for up to ~30 s keeps its node and its workers (docs/multihost.md) instead
    # of losing them and starting anew. Routing does not wait for it: the controller takes a worker that
    # does not answer for 5 s out of its routes on its own.
    env.setdefault("RAY_health_check_failure_threshold", "10")
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def apply_ray_env() -> None:
    """Put ``ray_env()``'s defaults into this process before Ray is imported.

    Ray reads ``RAY_AUTH_MODE`` when it is imported, not when ``ray.init`` runs.
    """
    for key, value in ray_env().items():
        os.environ.setdefault(key, value)


def auth_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def fleet_url() -> str | None:
    """``FLEET_URL``: the fleet a command talks to over HTTP (else: ask the running fleet)."""
    return os.environ.get("FLEET_URL") or None


def fleet_token() -> str | None:
    return os.environ.get("FLEET_AUTH_TOKEN") or None


def ray_address() -> str | None:
    """``RAY_ADDRESS``: the Ray cluster a command acts on (else the one `ray start` last recorded here)."""
    return os.environ.get("RAY_ADDRESS") or None


def aws_credentials_found() -> bool:
    """Whether this process has S3 credentials where pyarrow's AWS chain looks (environment, ~/.aws)."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if any(env.get(k) for k in ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")):
        return True
    return Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials").is_file()


def runtime_cache_root() -> Path:
    """Where each host keeps the Python environments of its GPU types (``FLEET_RUNTIME_CACHE``)."""
    return Path(os.environ.get("FLEET_RUNTIME_CACHE") or Path.home() / ".cache" / "forward-fleet" / "runtimes")

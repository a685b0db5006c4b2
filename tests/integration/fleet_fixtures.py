"""Helpers to start a real fleet (real Ray, real Serve, real HTTP) inside a test module."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import ray

from cluster import fleet
from cluster.buildfarm import build_locally, local_target
from cluster.config import load_config
from cluster.names import NAMESPACE
from cluster.repository import Repository
from workers.build import BuildRequest
from workers.manifest import sha256_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_cpu(repo_root: Path, source: Path, name: str, max_batch: int = 64, **options) -> None:
    request = BuildRequest(str(source), name, local_target(), max_batch=max_batch, options=options)
    outcome = build_locally(Repository(repo_root), request, sha256_file(source))
    assert outcome.ok, outcome.error


@contextmanager
def running_fleet(config_path: str | None, repo_root: Path, *, cluster_address: str | None = None, **overrides):
    """Deploy a fleet on a fresh Ray (or on ``cluster_address``); yields (config, url)."""
    config = load_config(config_path, repository=str(repo_root), port=free_port(), **overrides)
    if cluster_address is None:
        ray.init(namespace=NAMESPACE, num_cpus=2, log_to_driver=False, include_dashboard=False)
    else:
        ray.init(address=cluster_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        fleet.deploy(config)
        yield config, f"http://127.0.0.1:{config.port}"
    finally:
        fleet.teardown()
        ray.shutdown()

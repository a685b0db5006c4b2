"""Helpers to start a real fleet (real Ray, real Serve, real HTTP) inside a test module."""

from __future__ import annotations

import collections
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import numpy as np
import ray

from cluster import deploy, nodes
from cluster.buildfarm import build_locally, local_target
from cluster.client import FleetClient
from cluster.config import load_config
from cluster.names import NAMESPACE
from cluster.net import free_port
from cluster.repository import Repository
from workers.build import BuildRequest
from workers.manifest import sha256_file


CHECKOUT = Path(__file__).resolve().parents[2]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a `fleet` or `python -m cluster...` subprocess started in another directory:
    this checkout first on the path, whatever else is installed."""
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def distinct_model(source: Path, out: Path, tag: str) -> Path:
    """A copy of an ONNX model with its own bytes (and so its own sha256): no host's artifact cache
    can hold it already, whatever ran before in this session."""
    import onnx

    model = onnx.load(str(source))
    model.doc_string = f"forward-fleet test copy: {tag}"
    onnx.save(model, str(out))
    return out


def build_cpu(repo_root: Path, source: Path, name: str, max_batch: int = 64, **options) -> None:
    request = BuildRequest(str(source), name, local_target(), max_batch=max_batch, options=options)
    outcome = build_locally(Repository(repo_root), request, sha256_file(source))
    assert outcome.ok, outcome.error


def _start_local_ray() -> None:
    """A fresh local Ray; once more if its node timed out starting (a 2-core box under other load:
    "The current node timed out during startup"), which is the machine, not the fleet under test."""
    for attempt in (1, 2):
        try:
            ray.init(address="local", namespace=NAMESPACE, num_cpus=2, log_to_driver=False, include_dashboard=False)
            return
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()


@contextmanager
def running_fleet(config_path: str | None, repo_root: Path, *, cluster_address: str | None = None, **overrides):
    """Deploy a fleet on a fresh Ray (or on ``cluster_address``); yields (config, url)."""
    overrides.setdefault("grpc_port", free_port())  # never Triton's 8001: other fleets share this machine
    config = load_config(config_path, repository=str(repo_root), port=free_port(), **overrides)
    if cluster_address is None:
        _start_local_ray()
    else:
        ray.init(address=cluster_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        deploy.deploy(config)
        yield config, config.url
    finally:
        deploy.teardown()
        ray.shutdown()


@contextmanager
def simulated_cluster(config_path: str | Path):
    """cluster.nodes.simulated_cluster for a config file."""
    with nodes.simulated_cluster(load_config(config_path)) as cluster:
        yield cluster


def worker_handles(controller) -> dict:
    """Worker id -> Ray actor handle, from the controller's inventory."""
    return ray.get(controller.inventory.remote()).handles


def digits_rows(n: int):
    """n rows of the digits test split, repeated, as float32 [n, 64]."""
    import numpy as np

    from cluster.demo import digits_split

    X = digits_split()[1]
    return np.tile(X, (-(-n // len(X)), 1))[:n].astype(np.float32)


def write_parquet_rows(path: Path, X, column: str = "input") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({column: pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])})
    pq.write_table(table, path, row_group_size=10_000)
    return path


def read_parts(out: Path):
    """All part files of a batch job's output, concatenated (row_id, label)."""
    import numpy as np
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    row_ids = np.concatenate([t["row_id"].to_numpy() for t in tables])
    labels = np.concatenate([t["label"].to_numpy() for t in tables])
    return row_ids, labels


class Traffic:
    """Client threads sending one-row requests for ``model`` through the fleet's URL until the block ends
    (``rate``: requests per second over all threads; None: as fast as they are answered): how many were
    sent, which worker and target answered each (``served_by``, ``targets``), and every exception
    (``errors``, checked by the test)."""

    def __init__(self, url: str, model: str, threads: int = 4, rate: float | None = None) -> None:
        self.url, self.model = url, model
        self.interval = threads / rate if rate else 0.0  # each thread's pace
        self.sent = 0
        self.served_by: collections.Counter = collections.Counter()
        self.targets: collections.Counter = collections.Counter()
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send) for _ in range(threads)]

    def _send(self) -> None:
        with FleetClient(self.url) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                with self._lock:
                    self.sent += 1
                try:
                    client.infer(self.model, {"input": np.zeros((1, 64), np.float32)})
                    with self._lock:
                        self.served_by[client.last_parameters["fleet_worker"]] += 1
                        self.targets[client.last_parameters["fleet_target"]] += 1
                except Exception as exc:  # noqa: BLE001 - recorded, checked by the test
                    with self._lock:
                        self.errors.append(exc)
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

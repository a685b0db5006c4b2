"""A real S3 endpoint for tests: moto's server in its own process, over HTTP, on a free port.

Its log goes nowhere (it logs every request). ``stop()`` takes the endpoint away, as an
object store going down would; ``start()`` brings an empty one back on the same port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator

import pyarrow.fs as pafs

from workers.storage import StoreSpec
from cluster.net import free_port

KEY = "testing"  # moto takes any credentials; the fleet still sends these
REGION = "us-east-1"



class MotoS3:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto's server exited {self.proc.returncode} (port {self.port} taken?)")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto's server did not listen on {self.endpoint} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region=REGION, access_key=KEY,
                                 secret_key=KEY, allow_bucket_creation=True)

    def create_bucket(self, bucket: str) -> None:
        self.fs().create_dir(bucket)

    def uri(self, path: str) -> str:
        """s3://path with this endpoint in the query (how Ray Data and the batch job are told)."""
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={REGION}"

    def spec(self, path: str) -> StoreSpec:
        return StoreSpec(f"s3://{path}", endpoint_override=self.endpoint, scheme="http", region=REGION,
                         access_key=KEY, secret_key=KEY)

    def storage_config(self) -> dict:
        """The fleet config's ``storage:`` for this endpoint."""
        return {"endpoint_override": self.endpoint, "scheme": "http", "region": REGION, "access_key": KEY,
                "secret_key": KEY}


@contextmanager
def moto_s3(*buckets: str) -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    try:
        for bucket in buckets:
            server.create_bucket(bucket)
        yield server
    finally:
        server.stop()

"""Ray nodes that see nothing of the head's files: each in its own mount namespace, with the head's
repository directory hidden under an empty tmpfs and a temporary directory of its own.

As root, file permissions would not stop a read, so the directory is really out of reach: the
node's `ray start` runs under ``unshare --mount`` (private propagation), which mounts a tmpfs
over the repository path first. Everything the node's workers start inherits that namespace and
``TMPDIR``. Each node is a `ray start --block` in its own process group, so tearing it down ends
exactly its processes (never `ray stop`, which would end every Ray on the machine); a marker in
their environment finds any that escaped.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cluster.env import ray_env
from cluster.names import NODE_LABEL
from cluster.nodes import ray_cli_path

MARKER = "FLEET_TEST_ISOLATED_NODE"


@dataclass
class IsolatedNode:
    name: str
    tmpdir: Path
    proc: subprocess.Popen
    marker: str
    log: Path

    @property
    def cache(self) -> Path:
        return self.tmpdir / "forward-fleet-artifacts"


@dataclass
class IsolatedNodes:
    gcs_address: str
    hidden: Path  # the head's directory the nodes must not see
    root: Path  # where each node's own temporary directory goes
    nodes: dict[str, IsolatedNode] = field(default_factory=dict)

    def add(self, name: str, gpus: int, labels: dict[str, str] | None = None) -> IsolatedNode:
        tmpdir = self.root / name / "tmp"
        tmpdir.mkdir(parents=True)
        marker = uuid.uuid4().hex
        label_text = ",".join(f"{k}={v}" for k, v in {NODE_LABEL: name, **(labels or {})}.items())
        start = [ray_cli_path(), "start", f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
                 "--num-cpus=0", f"--num-gpus={gpus}", f"--labels={label_text}", "--disable-usage-stats", "--block"]
        script = (f"mount -t tmpfs -o size=1m,mode=0700 fleet-hidden {shlex.quote(str(self.hidden))} && "
                  f"exec {shlex.join(start)}")
        env = {k: v for k, v in ray_env().items() if k != "FLEET_ARTIFACT_CACHE"}
        env.update(TMPDIR=str(tmpdir), RAY_TMPDIR="/tmp", **{MARKER: marker})  # Ray's own files stay in /tmp/ray
        log = self.root / name / "ray-start.log"
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        node = IsolatedNode(name, tmpdir, proc, marker, log)
        self.nodes[name] = node
        return node

    def wait_joined(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
            alive = {(n.get("Labels") or {}).get(NODE_LABEL) for n in ray.nodes() if n.get("Alive")}
            if set(self.nodes) <= alive:
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes {sorted(set(self.nodes) - alive)} did not join within {timeout_s} s")

    def stop(self) -> list[int]:
        """End every node's processes; returns the pids that had to be killed after their group was gone."""
        for node in self.nodes.values():
            if node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes.values():
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)
        return self._kill_marked(time.monotonic() + 15)

    def _kill_marked(self, deadline: float) -> list[int]:
        markers = {f"{MARKER}={n.marker}".encode() for n in self.nodes.values()}
        leftovers: list[int] = []
        while True:
            found = [pid for pid in _pids() if markers & set(_environ(pid))]
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the raylet's children exit on their own once it is gone
        for pid in found:
            leftovers.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []

"""Separate hosts on one machine: a bed of network, mount, PID and UTS namespaces joined by a bridge.

Each host of the bed is what a machine of a real fleet is to the others: its own network stack
(its own address on a bridge, no route out), its own ``/tmp``, ``/dev/shm`` and artifact cache
(tmpfs mounts), its own process tree (a PID namespace, so ``ray stop`` there ends only that host's
Ray) and its own hostname. The head stays in this (the root) namespace, on the bridge's address:
a pytest driver joins it as a driver on the head does. Hosts see the software (the checkout, the
venv) as every machine of a fleet has it installed, and nothing of the head's files that is hidden
(the repository directory, ``~/.ray``): tmpfs mounts cover them.

All traffic stays inside: the subnet is a /24 of 198.18.0.0/15 (the benchmarking range, RFC 2544)
not used on this machine, the namespaces have no default route, and everything is removed again
by ``down`` (namespaces, links, every process of every host: killing a PID namespace's first
process ends all of it).

Used by the pytest fixture (tests/integration/test_multihost.py) and by ``scripts/bed.py``.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.isolated_nodes import _environ, _pids

BED_RANGE = ipaddress.ip_network("198.18.0.0/15")
REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER = "FLEET_TEST_BED"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise BedError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class BedError(RuntimeError):
    pass


def namespaces_permitted() -> tuple[bool, str]:
    """Whether this process may build a bed (root, ip(8), unshare(1), nsenter(1), network namespaces)."""
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed (iproute2, util-linux)"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    probe = f"ffprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"network namespaces are not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    text = _ip("-o", "-4", "addr").stdout + _ip("-4", "route").stdout
    nets = []
    for word in text.split():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    return [n for n in nets if n.version == 4]


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface or route of this machine uses (another bed may run)."""
    used = _subnets_in_use()
    candidates = list(BED_RANGE.subnets(new_prefix=24))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise BedError("every /24 of 198.18.0.0/15 is in use on this machine")


@dataclass
class Host:
    name: str
    netns: str
    veth: str  # its link's end in the root namespace, on the bridge: set it down to cut the host off
    address: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    earlier: list[subprocess.Popen] = field(default_factory=list)  # processes it ran before (a host that left)

    @property
    def pid(self) -> int | None:
        """The first process of the host's PID namespace (in this namespace's numbering)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None


@dataclass
class HostBed:
    work: Path  # logs
    hidden: list[Path] = field(default_factory=list)  # directories of this machine no host may see
    bed_id: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network | None = None
    bridge: str = ""
    _processes: list[subprocess.Popen] = field(default_factory=list)

    # ---- the network ------------------------------------------------------------------
    @property
    def head_address(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def up(self) -> "HostBed":
        self.subnet = free_subnet()
        self.bridge = f"ffb{self.bed_id}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.head_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.work.mkdir(parents=True, exist_ok=True)
        return self

    def add_host(self, name: str) -> Host:
        """A host's namespace and its link to the bridge (nothing runs in it yet: ``start``)."""
        assert self.subnet is not None
        index = len(self.hosts)
        netns = f"ff-{self.bed_id}-{index}"
        veth, inside = f"ffv{self.bed_id}{index}", f"ffi{self.bed_id}{index}"
        address = str(self.subnet.network_address + 11 + index)
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", netns, "link", "set", inside, "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        host = Host(name, netns, veth, address)
        self.hosts[name] = host
        return host

    def cut(self, name: str) -> None:
        """The host's link goes down: nothing reaches it, nothing leaves it (its processes live on)."""
        _ip("link", "set", self.hosts[name].veth, "down")

    def mend(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].veth, "up")

    # ---- processes ------------------------------------------------------------------------
    def start(self, name: str, command: list[str], env: dict[str, str]) -> Host:
        """Run ``command`` as the first process of the host (its PID namespace ends with it)."""
        host = self.hosts[name]
        mounts = ["mount -t tmpfs -o mode=1777,size=2g fleet-tmp /tmp",
                  "mount -t tmpfs -o mode=1777,size=2g fleet-shm /dev/shm"]
        mounts += [f"mount -t tmpfs -o size=1m,mode=0700 fleet-hidden {shlex.quote(str(p))}" for p in self.hidden
                   if p.is_dir() and not _under(p, Path("/tmp"))]
        script = " && ".join([*mounts, f"hostname {shlex.quote(name)}", f"cd {shlex.quote(str(REPO_ROOT))}",
                              f"exec {shlex.join(command)}"])
        host.log = self.work / f"{name}.log"
        if host.proc is not None:
            host.earlier.append(host.proc)
        env = {**env, MARKER: self.bed_id, "TMPDIR": "/tmp"}
        host.proc = subprocess.Popen(
            # --kill-child: the host's PID namespace ends with this process, however it ends (a killed
            # `unshare --fork` alone leaves its child, the namespace's first process, running).
            ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--kill-child", "--mount-proc", "--mount", "--uts",
             "--propagation", "private", "sh", "-c", script],
            env=env, stdout=open(host.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        return host

    def run_on(self, name: str, command: list[str], env: dict[str, str] | None = None, timeout: float = 120,
               ) -> subprocess.CompletedProcess:
        """A command on a running host, in all its namespaces (as a person logged in there would run it)."""
        pid = self.hosts[name].pid
        if pid is None:
            raise BedError(f"host {name} is not running")
        return subprocess.run(["nsenter", "-t", str(pid), "-a", *command], env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def run_head(self, command: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        """A process of the head (this namespace), in its own process group: ended by ``down``."""
        proc = subprocess.Popen(command, env={**env, MARKER: f"{self.bed_id}-head"}, stdout=open(self.work / log, "a"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self._processes.append(proc)
        return proc

    def kill(self, name: str) -> None:
        """The host dies at once: every process in it, no goodbye."""
        host = self.hosts[name]
        if host.proc is not None and host.proc.poll() is None:
            pid = host.pid
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            host.proc.wait(30)

    def stop(self, name: str, timeout_s: float = 60) -> int | None:
        """Ask the host's first process to stop (SIGTERM), then kill what is left; its exit status."""
        host = self.hosts[name]
        if host.proc is None:
            return None
        pid = host.pid
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        try:
            return host.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(name)
            return None

    def down(self) -> list[str]:
        """End every process, remove every namespace and link. Returns processes (pid and command) that
        outlived their host (killed then)."""
        for name, host in self.hosts.items():
            self.kill(name)
            for proc in host.earlier:  # a host that left and joined again: its first run, if it lingers
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        for proc in self._processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
        leftovers = _kill_marked(self.bed_id, time.monotonic() + 15)
        # The head's Ray processes (Ray Data's actors among them) may take longer to follow their
        # raylet; they are this machine's, not a host's: ended, not reported.
        _kill_marked(f"{self.bed_id}-head", time.monotonic() + 5)
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        return leftovers


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _kill_marked(bed_id: str, deadline: float) -> list[str]:
    """Processes that carry this bed's marker: the head's children exit on their own once it is gone."""
    marker = f"{MARKER}={bed_id}".encode()
    while True:
        found = [pid for pid in _pids() if marker in _environ(pid) and pid != os.getpid()]
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    named = [f"{pid} {_cmdline(pid)}" for pid in found]
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return named


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"





# ---- a fleet on the bed ------------------------------------------------------------------


class FleetBed:
    """A Ray head in this namespace, on the bridge, and hosts that join it with ``fleet join --block``
    (the command a real machine runs), each taking a node of the config (its simulated GPUs)."""

    def __init__(self, work: Path, config_path: str, hidden: list[Path]) -> None:
        if _under(REPO_ROOT, Path("/tmp")):  # each host mounts its own /tmp: the checkout would vanish there
            raise RuntimeError(f"the bed gives each host its own /tmp, which hides this checkout ({REPO_ROOT}): "
                               f"run the tests from a clone outside /tmp")
        self.bed = HostBed(work, hidden=hidden)
        self.config_path = str((REPO_ROOT / config_path).resolve())
        self.port = 0
        self.nodes: dict[str, str] = {}  # host -> the declared node it plays

    @property
    def address(self) -> str:
        return f"{self.bed.head_address}:{self.port}"

    def up(self, env: dict[str, str], timeout_s: float = 60) -> "FleetBed":
        from cluster.net import free_port
        from cluster.nodes import probe_gcs, ray_cli_path

        self.env = env
        self.bed.up()
        self.port = free_port(self.bed.head_address)
        self.bed.run_head([ray_cli_path(), "start", "--head", f"--node-ip-address={self.bed.head_address}",
                           f"--port={self.port}", "--num-cpus=2", "--include-dashboard=false",
                           "--disable-usage-stats", "--block"], env, "head.log")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                probe_gcs(self.address, timeout_s=1)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise BedError(f"the head did not start: {(self.bed.work / 'head.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def join(self, host: str, node: str) -> Host:
        """``fleet join --block`` as the host's first process (adding the host on first use)."""
        if host not in self.bed.hosts:
            self.bed.add_host(host)
        self.nodes[host] = node
        command = [sys.executable, "-m", "cluster.cli", "join",
                   f"--address={self.address}", f"--config={self.config_path}", f"--node={node}", "--block"]
        env = {**self.env, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("FLEET_ARTIFACT_CACHE", None)  # each host's own, under its own /tmp
        return self.bed.start(host, command, env)

    def down(self) -> list[str]:
        return self.bed.down()

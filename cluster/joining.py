"""A machine joins a running fleet (``fleet join``) and leaves it (``fleet leave``).

Joining is a Ray node started against the head's GCS (``ray start --address``); the
controller sees the node appear (``WorkerPool.watch_hosts``) and starts a worker per GPU
there (or the declared simulated GPUs of ``--node``), which then loads what the fleet
serves. ``--block`` keeps the node in the foreground: Ctrl-C or SIGTERM leaves the fleet
cleanly, and a node that Ray gave up on (its link was down longer than Ray waits, ~60 s)
is started again, so the host comes back by itself once the network does.

Leaving asks the controller to drain this host's workers (out of every route, in-flight
requests finished, then stopped), then stops this host's Ray.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import ray

from workers.devices import Device
from workers.errors import NotReady

from cluster.calls import get
from cluster.config import FleetConfig
from cluster.console import say
from cluster.env import auth_token_path, ray_env
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.nodes import host_gpu_labels, labels_flag, node_labels, probe_gcs, ray_cli_path

REJOIN_PAUSE_S = 2.0


def _leaving_mark() -> Path:
    """Left by ``fleet leave``: a ``fleet join --block`` on this host exits instead of joining again."""
    return Path(tempfile.gettempdir()) / "forward-fleet-leaving"


def ray_start_args(address: str, config: FleetConfig | None = None, node_name: str | None = None,
                   node_ip: str | None = None, gpus: "list[Device] | None" = None) -> list[str]:
    """``ray start`` for this host: a declared (simulated) node's labels and GPU count, or Ray's own
    view of this machine (its GPUs, its CPUs) with its GPU type as labels (``gpus``: NVML's, by default)."""
    args = [ray_cli_path(), "start", f"--address={address}", "--disable-usage-stats"]
    if node_ip:
        args.append(f"--node-ip-address={node_ip}")
    if node_name is not None:
        declared = {n.name: n for n in (config.nodes if config else [])}
        if node_name not in declared:
            raise NotReady(f"node '{node_name}' is not declared in the config (declared: "
                           f"{', '.join(sorted(declared)) or 'none'}); pass --config with the fleet's config")
        node = declared[node_name]
        args += [f"--num-gpus={len(node.gpus)}", "--num-cpus=0", f"--labels={node_labels(node)}"]
    else:  # a real host: its GPU type, so that its workers start in that type's environment
        args += labels_flag(host_gpu_labels(gpus))
    return args


def check_can_join(address: str) -> None:
    """The head answers and this host has the cluster's token (Ray's token authentication)."""
    probe_gcs(address)
    env = ray_env()
    if not env.get("RAY_AUTH_TOKEN") and not auth_token_path().exists():
        raise NotReady(f"this host has no Ray auth token: copy ~/.ray/auth_token from the head to {auth_token_path()} "
                       f"(or set RAY_AUTH_TOKEN) before joining")


def join(args: list[str], address: str, block: bool) -> int:
    """Start this host's Ray node. ``block``: stay in the foreground, start it again if Ray drops it,
    and leave the fleet on Ctrl-C / SIGTERM."""
    check_can_join(address)
    if not block:
        proc = subprocess.run(args, env=ray_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise NotReady(f"ray start failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
        say(f"joined the fleet at {address}; `fleet leave` drains this host and takes it out")
        return 0
    leaving = threading.Event()
    node: subprocess.Popen | None = None
    _leaving_mark().unlink(missing_ok=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: leaving.set())
    while not leaving.is_set():
        t0 = time.monotonic()
        node = subprocess.Popen([*args, "--block"], env=ray_env())
        say(f"joining the fleet at {address} ...")
        while node.poll() is None and not leaving.is_set() and not _leaving_mark().exists():
            leaving.wait(0.5)
        if leaving.is_set():
            break
        if _leaving_mark().exists():  # `fleet leave` drained this host and stops its node
            _stop(node)
            _leaving_mark().unlink(missing_ok=True)
            say("this host left the fleet (fleet leave)")
            return 0
        say(f"this host's Ray node exited ({node.returncode}) after {time.monotonic() - t0:.0f} s "
            f"(the head gave up on it, or it could not reach the head); starting it again")
        leaving.wait(REJOIN_PAUSE_S)
    say("leaving the fleet ...")
    report = leave(address)
    if node is not None:
        _stop(node)
    return 0 if not report.get("timed_out") else 1


def _stop(node: subprocess.Popen) -> None:
    """The `ray start --block` of this host, once its node is stopped (or stopping)."""
    try:
        node.wait(30)
    except subprocess.TimeoutExpired:
        node.terminate()
        node.wait(30)


def leave(address: str, timeout_s: float = 60.0) -> dict:
    """Drain this host's workers (the controller takes them out of every route and waits for what they
    hold), then stop this host's Ray."""
    report: dict = {}
    _leaving_mark().touch()
    try:
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        node_id = ray.get_runtime_context().get_node_id()
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        address_here = ray.util.get_node_ip_address()
        report = get(controller.drain_host.remote(node_id, timeout_s, address_here), timeout=timeout_s + 60)
        say(f"drained {len(report['workers'])} worker(s) in {report['seconds']:.1f} s"
            f"{' (timed out: some requests were still running)' if report['timed_out'] else ''}")
    except (ValueError, NotReady, ray.exceptions.RayError, ConnectionError) as exc:
        say(f"could not drain this host through the fleet ({exc}); stopping its Ray anyway")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_cli_path(), "stop"], env=ray_env(), capture_output=True, text=True)
    return report

"""The Ray processes of a fleet: `ray start` nodes on this host, connecting, the running controller.

``fleet up`` starts a head (and, for a simulated fleet, one labelled node per declared
node) with ``start_nodes`` and ``fleet down`` stops them; ``connect`` joins a running
Ray; ``simulated_cluster`` is an in-process ``ray.cluster_utils.Cluster`` for tests,
the soak and benchmarks.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

from workers.devices import Device, host_gpus
from workers.errors import FleetError, NotReady

from cluster import gcs_ft
from cluster.config import FleetConfig
from cluster.console import say
from cluster.calls import get
from cluster.env import auth_token_path, ray_address, ray_env
from cluster.net import free_port
from cluster.rollout import gpu_type
from cluster.names import CC_LABEL, CONTROLLER_NAME, GPU_LABEL, NAMESPACE, NODE_LABEL


def ray_cli_path() -> str:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def _ray_cli(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([ray_cli_path(), *args], env={**ray_env(), **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise NotReady(f"{what} failed (ray {' '.join(args[:2])} exited {proc.returncode}):\n{tail}")


def host_gpu_labels(gpus: "list[Device] | None" = None) -> dict[str, str]:
    """This host's GPU type and compute capability as Ray node labels (its first GPU's, from NVML), so
    that the fleet starts the workers of a real host in its GPU type's environment (``gpu_types``);
    {} on a host without GPUs. A host mixing GPU types is labelled by its first."""
    gpus = [g for g in (host_gpus() if gpus is None else gpus) if g.is_gpu]
    if not gpus:
        return {}
    first = gpus[0]
    if len({(g.name, g.compute_capability) for g in gpus}) > 1:
        say(f"this host mixes GPU types; its workers all start in the environment of its first GPU ({first.name})")
    labels = {GPU_LABEL: gpu_type(first)}
    if first.compute_capability:
        labels[CC_LABEL] = first.compute_capability
    return labels


def labels_flag(labels: dict[str, str]) -> list[str]:
    """``ray start``'s ``--labels`` for these labels ([] for none)."""
    return [f"--labels={','.join(f'{k}={v}' for k, v in labels.items())}"] if labels else []


def node_labels(node) -> str:
    labels = {NODE_LABEL: node.name, **node.labels}
    if node.gpus:
        labels.setdefault(GPU_LABEL, node.gpus[0].model.replace(" ", "-"))
    return ",".join(f"{k}={v}" for k, v in labels.items())


def start_nodes(config: FleetConfig) -> str:
    """`ray start` a head on 127.0.0.1 plus one node per declared simulated node (all stopped
    again if one fails)."""
    if not auth_token_path().exists():
        _ray_cli(["get-auth-token", "--generate"], "creating the Ray auth token")
    t0 = time.monotonic()
    try:
        address = _start_head(config)
        for node in config.nodes:
            say(f"starting simulated node {node.name} with {len(node.gpus)} GPU(s) [{node_labels(node)}] ...")
            _ray_cli(
                [
                    "start", f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-gpus={len(node.gpus)}",
                    "--num-cpus=0", f"--labels={node_labels(node)}", "--disable-usage-stats",
                ],
                f"starting node {node.name}",
                gcs_ft.node_env(config.gcs_fault_tolerance),
            )
    except BaseException:
        stop_nodes()
        raise
    say(f"Ray is up in {time.monotonic() - t0:.1f} s")
    return address


def _start_head(config: FleetConfig) -> str:
    address = f"127.0.0.1:{config.ray_port}"
    ft = config.gcs_fault_tolerance
    if ft.redis == "local":
        gcs_ft.start_local_redis(ft)
    head_env, head_flags = gcs_ft.ray_start_settings(ft)
    agent_port = free_port()
    say(f"starting Ray head on {address} (dashboard 127.0.0.1:{config.dashboard_port}"
        f"{', GCS tables in Redis at ' + str(ft.redis_address()) if ft.enabled else ''}) ...")
    _ray_cli(
        [
            "start", "--head", f"--port={config.ray_port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={config.dashboard_port}",
            f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats", *head_flags,
            *labels_flag(host_gpu_labels()),
        ],
        "starting the Ray head",
        head_env,
    )
    _wait_for_job_agent(agent_port)
    gcs_ft.after_head_started(ft, config.ray_port)
    return address


def _wait_for_job_agent(port: int, timeout_s: float = 60.0) -> None:
    """The head's dashboard agent takes jobs (`ray job submit`); Ray's job server gives up after
    10 s without one ("No available agent to submit job"), which a loaded machine can take."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            say(f"warning: Ray's dashboard agent (127.0.0.1:{port}) is not up after {timeout_s:.0f} s; "
                f"`ray job submit` may answer 'No available agent' for a while")
            return
        time.sleep(0.25)


def stop_nodes() -> None:
    """`ray stop`: ends every Ray process this host started (first the GCS keepers, so that none
    starts the GCS again; after it, a Redis `fleet up` started for the GCS)."""
    gcs_ft.stop_keepers()
    subprocess.run([ray_cli_path(), "stop", "--force"], env=ray_env(), capture_output=True, text=True)
    gcs_ft.stop_local_redis()


def probe_gcs(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast and clearly when nothing listens at the GCS address (ray.init would wait minutes)."""
    if address == "auto":
        current = Path("/tmp/ray/ray_current_cluster")
        if not current.exists():
            raise NotReady("no Ray cluster is running on this machine; start the fleet with `fleet up`")
        address = current.read_text().strip()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # ray:// or other schemes: let Ray judge
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise NotReady(
            f"cannot reach Ray's GCS at {address}: {exc.strerror or exc}. Is the head running "
            f"(`fleet up`, or `ray start --head`) and is the address right?"
        ) from None


def connect(address: str | None) -> str | None:
    """Join a running Ray (or start a local one for "local"/None). Returns its dashboard's address
    (host:port) when this call connected and Ray told it."""
    if ray.is_initialized():
        return None
    if address not in (None, "local"):
        probe_gcs(address)
    try:
        context = ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        return getattr(context, "dashboard_url", None) or None
    except ConnectionError as exc:
        raise NotReady(
            f"cannot reach Ray's GCS at {address or 'auto'}: {exc}. Start the fleet with `fleet up`, "
            f"or pass the address of a running head."
        ) from None


def disconnect() -> None:
    """Leave Ray before its nodes stop, so the driver sees no raylet die under it."""
    if ray.is_initialized():
        ray.shutdown()


def running_controller(address: str | None = None):
    """The controller of a running fleet (connecting to Ray if needed), or None."""
    fleet = running_fleet(address)
    return fleet.controller if fleet is not None else None


@dataclass(frozen=True)
class RunningFleet:
    """A fleet found on the Ray cluster: its controller and what it says of itself (``describe``)."""

    controller: object  # the controller's actor handle
    info: dict  # url, ports, repository (FleetController.describe)
    dashboard: str | None  # http://host:port of Ray's dashboard, when this process connected

    @property
    def url(self) -> str:
        return self.info["url"]


def running_fleet(address: str | None = None) -> RunningFleet | None:
    """The fleet on the Ray cluster at ``address`` (else ``RAY_ADDRESS``, else the one `ray start`
    recorded on this machine), or None when no Ray or no fleet runs there."""
    dashboard = None
    if not ray.is_initialized():
        address = address or ray_address()
        if address is None and not Path("/tmp/ray/ray_current_cluster").exists():
            return None
        try:
            dashboard = connect(address or "auto")
        except NotReady as exc:
            # A cluster is recorded here (or named) but its head does not answer: its GCS may be
            # restarting. Acting on something else (a local build) would surprise; say so instead.
            raise NotReady(f"{exc.message} If the fleet was stopped, `fleet down` clears what is left; "
                           f"--repository acts on a repository without a fleet") from None
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
    try:
        info = get(controller.describe.remote(), timeout=30)
    except (FleetError, ray.exceptions.RayError) as exc:
        raise NotReady(f"the fleet's controller did not answer: {exc}") from None
    return RunningFleet(controller, info, f"http://{dashboard}" if dashboard and "://" not in dashboard else dashboard)


class FleetWatch:
    """Whether a fleet this process started is still there (``fleet up --foreground``): its controller
    answers, and the head's GCS takes connections (``grace_s`` allows a GCS that restarts)."""

    def __init__(self, address: str, controller, grace_s: float = 3.0) -> None:
        self.address, self.controller, self.grace_s = address, controller, grace_s
        self._unreachable_since: float | None = None

    def gone(self) -> str | None:
        """Why the fleet is gone, or None while it runs."""
        try:
            probe_gcs(self.address, timeout_s=1.0)
        except NotReady:
            now = time.monotonic()
            self._unreachable_since = self._unreachable_since or now
            if now - self._unreachable_since >= self.grace_s:
                return f"the head's GCS at {self.address} does not answer"
            return None
        self._unreachable_since = None
        try:
            ray.get(self.controller.describe.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return "its controller was stopped (fleet down)"
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            return None  # busy or the GCS restarting: ask again
        return None


@contextmanager
def simulated_cluster(config: FleetConfig):
    """An in-process Ray cluster (ray.cluster_utils) with one labelled node per declared node.

    For tests, the soak and benchmarks on one machine; ``fleet up`` uses real `ray start`
    nodes instead. ``cluster.fleet_nodes`` maps node names to Ray nodes (to take one away
    with ``cluster.remove_node`` and bring it back with ``add_simulated_node``).
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.fleet_nodes = {}
        for node in config.nodes:
            add_simulated_node(cluster, node)
        yield cluster
    finally:
        cluster.shutdown()




def add_simulated_node(cluster, node) -> None:
    """One declared node (``NodeDecl``) as a labelled Ray node of an in-process cluster."""
    cluster.fleet_nodes[node.name] = cluster.add_node(
        num_cpus=0, num_gpus=len(node.gpus), labels={NODE_LABEL: node.name, **node.labels})

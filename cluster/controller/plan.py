"""Which workers a fleet has and where they go: one per declared (simulated) GPU, placed by its
node's label, and one per GPU (or CPU) of every other Ray node (``discover_nodes``); and the worker
actor itself, as the fleet runs it (``RayFleetWorker``: its endpoints bound to its node's address).
A node upgraded by ``fleet upgrade`` (its TensorRT release, kept in the repository) gets that release
(``with_tensorrt``) instead of the config's.
"""

from __future__ import annotations

import dataclasses

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.actor import FleetWorker, WorkerSpec
from workers.devices import Device
from workers.grpc_server import GrpcOptions
from workers.http import HttpOptions
from workers.messages import WorkerInfo
from workers.targets import Runtime

from cluster.config import FleetConfig
from cluster.forward import GrpcMissForwarder, IngressForwarder
from cluster.names import CC_LABEL, GPU_LABEL, NODE_LABEL
from cluster.net import is_loopback, is_wildcard
from cluster.runtime_policy import RuntimeProfile

WORKER_MAX_CONCURRENCY = 64


class RayFleetWorker(FleetWorker):
    """FleetWorker plus what only the fleet knows: its node's address, where misses go, and how to
    read an artifact the controller sent through Ray's object store."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec, read_object=ray.get)

    def info(self) -> WorkerInfo:
        return dataclasses.replace(super().info(), node_id=ray.get_runtime_context().get_node_id())

    def serve_http(self, options: HttpOptions, ingress_url: str, grpc: GrpcOptions | None = None,
                   grpc_front: str | None = None, head_address: str | None = None) -> WorkerInfo:
        """Start the worker's own endpoints (HTTP; gRPC too when the fleet serves gRPC: its misses go
        back to the fleet's gRPC port, ``grpc_front``). ``options.host`` None: bind this node's own
        address, or loopback on the head's host (``head_address``), where the front door is."""
        host = options.host or bind_address(ray.util.get_node_ip_address(), head_address)
        self.start_http(dataclasses.replace(options, host=host), on_miss=IngressForwarder(ingress_url))
        if grpc is not None:
            self.start_grpc(dataclasses.replace(grpc, host=host),
                            on_miss=GrpcMissForwarder(grpc_front) if grpc_front else None)
        info = self.info()
        node = ray.util.get_node_ip_address()
        for name in ("http", "grpc"):
            address = getattr(info, name)
            if address is not None and is_wildcard(address[0]):
                info = dataclasses.replace(info, **{name: (node, address[1])})
        return info


def bind_address(node_address: str, head_address: str | None) -> str:
    """Where a worker listens by default: loopback on the head's host (the front door is there), its
    node's own address on any other host (never every interface)."""
    if is_loopback(node_address) or node_address == head_address:
        return "127.0.0.1"
    return node_address


WorkerActor = ray.remote(RayFleetWorker)


def _common(config: FleetConfig) -> dict:
    return dict(memory_fraction=config.memory_fraction, reserve_bytes=config.reserve_bytes, slots=config.slots,
                intra_op_threads=config.intra_op_threads, cache_bytes=config.artifact_cache_bytes,
                build_workspace_bytes=config.build_workspace_bytes, build_wait_s=config.build_wait_s,
                gil_switch_interval_ms=config.gil_switch_interval_ms, shm_pinning=config.client_shm_pinning,
                shm_pin_threads=config.client_shm_pin_threads)


_BASE = {"num_cpus": 0, "max_concurrency": WORKER_MAX_CONCURRENCY}


def with_tensorrt(spec: WorkerSpec, version: str, profile: RuntimeProfile | None) -> WorkerSpec:
    """A worker's spec on TensorRT ``version``: a simulated GPU declares it (executed on the CPU as
    before); a real GPU gets its type's environment with ``tensorrt-cu12==version`` (what it then has
    is what it probes)."""
    if spec.simulated_devices:
        return dataclasses.replace(spec, simulated_runtimes=(Runtime("tensorrt", version, "tensorrt", simulated=True),))
    return dataclasses.replace(spec, environment=_tensorrt_environment(version, profile))


def _tensorrt_environment(version: str, profile: RuntimeProfile | None) -> tuple[str, ...]:
    """A real GPU type's environment with TensorRT ``version`` instead of its profile's."""
    return dataclasses.replace(profile or RuntimeProfile(), tensorrt=version).packages(simulated=False)


def plan_declared(config: FleetConfig, tensorrt: dict[str, str] | None = None) -> list[tuple[WorkerSpec, dict]]:
    """One worker per declared (simulated) GPU, placed by its node's label (whenever that node is up).
    ``tensorrt``: node name -> the TensorRT release ``fleet upgrade`` moved it to."""
    plan = []
    profiles = config.runtime_profiles()
    for node in config.nodes:
        devices = node.simulated_devices()
        for i, _ in enumerate(node.gpus):
            profile = profiles.for_device(devices[i])
            spec = WorkerSpec(worker_id=f"{node.name}-gpu{i}", node_name=node.name,
                              simulated_devices=devices, simulated_runtimes=node.simulated_runtimes(),
                              simulated_budgets=tuple(g.budget for g in node.gpus), labels=dict(node.labels),
                              environment=profile.packages(simulated=True) if profile else (), **_common(config))
            if node.name in (tensorrt or {}):
                spec = with_tensorrt(spec, (tensorrt or {})[node.name], profile)
            plan.append((spec, dict(_BASE, num_gpus=1, label_selector={NODE_LABEL: node.name})))
    return plan


def plan_node(config: FleetConfig, node: dict, tensorrt: dict[str, str] | None = None) -> list[tuple[WorkerSpec, dict]]:
    """One worker per GPU (or one for the CPU) of a Ray node found in the cluster (``ray.nodes()``' entry)."""
    short = node.get("NodeManagerAddress", "node") + "-" + node["NodeID"][:6]
    pinned = dict(_BASE, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
    gpus = int(node.get("Resources", {}).get("GPU", 0))
    # a real host's GPU type comes from its node label (`ray start --labels fleet.gpu=T4`)
    labels = node.get("Labels") or {}
    label, cc = labels.get(GPU_LABEL), labels.get(CC_LABEL)  # set by `fleet join` / `fleet up` from NVML
    profile = config.runtime_profiles().for_device(Device(label or "", "", "gpu", cc, 0)) if label or cc else None
    environment = profile.packages(simulated=False) if profile else ()
    if short in (tensorrt or {}):
        environment = _tensorrt_environment((tensorrt or {})[short], profile)
    plan = [(WorkerSpec(worker_id=f"{short}-gpu{i}", node_name=short, environment=environment, **_common(config)),
             dict(pinned, num_gpus=1)) for i in range(gpus)]
    if not gpus:
        spec = WorkerSpec(worker_id=f"{short}-cpu", node_name=short, budget_bytes=config.cpu_budget, **_common(config))
        plan.append((spec, pinned))
    return plan


def discoverable(node: dict) -> bool:
    """A live Ray node the fleet plans its own workers for (a declared node's label means: not this way)."""
    return bool(node.get("Alive")) and NODE_LABEL not in (node.get("Labels") or {})


def plan_workers(config: FleetConfig, tensorrt: dict[str, str] | None = None) -> list[tuple[WorkerSpec, dict]]:
    """One worker per declared (simulated) GPU, and per GPU (or CPU) of every other Ray node up now
    (``tensorrt``: the nodes ``fleet upgrade`` moved to another TensorRT release)."""
    plan = plan_declared(config, tensorrt)
    if config.discover_nodes:
        for node in ray.nodes():
            if discoverable(node):
                plan += plan_node(config, node, tensorrt)
    return plan


def host_state(node_id: str | None, node: dict, left: set[str]) -> str:
    if node_id is None:
        return "not joined"
    if node_id in left:
        return "leaving" if node.get("Alive") else "left"
    if not node:
        return "unknown"
    return "alive" if node.get("Alive") else "dead"

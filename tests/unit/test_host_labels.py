"""A real host is labelled with its GPU type when it joins (or is the head), and its workers start
in that type's environment (``gpu_types``). The labels come from NVML; here the GPUs are given."""

from cluster.config import FleetConfig
from cluster.controller.plan import plan_node
from cluster.joining import ray_start_args
from cluster.nodes import host_gpu_labels
from workers.devices import Device

T4 = Device("Tesla T4", "GPU-1", "gpu", "7.5", 15 << 30)
P4 = Device("Tesla P4", "GPU-2", "gpu", "6.1", 8 << 30)


def _node(labels: dict, gpus: int = 2) -> dict:
    return {"NodeID": "ab" * 28, "NodeManagerAddress": "10.0.0.7", "Alive": True, "Labels": labels,
            "Resources": {"GPU": gpus, "CPU": 8}}


def test_a_host_is_labelled_with_its_first_gpus_type_and_compute_capability():
    assert host_gpu_labels([T4, T4]) == {"fleet.gpu": "T4", "fleet.cc": "7.5"}
    assert host_gpu_labels([]) == {}
    args = ray_start_args("10.0.0.1:6379", gpus=[P4])
    assert "--labels=fleet.gpu=P4,fleet.cc=6.1" in args
    assert not any(a.startswith("--labels") for a in ray_start_args("10.0.0.1:6379", gpus=[]))


def test_a_declared_node_keeps_its_declared_labels():
    config = FleetConfig.model_validate({"nodes": [{"name": "t4-node", "labels": {"fleet.gpu": "T4"}, "gpus": [
        {"model": "Tesla T4", "compute_capability": "7.5", "memory": "15GiB"}]}]})
    args = ray_start_args("10.0.0.1:6379", config, "t4-node", gpus=[P4])
    assert "--labels=fleet.node=t4-node,fleet.gpu=T4" in args and "--num-gpus=1" in args


def test_a_joined_hosts_workers_start_in_its_gpu_types_environment():
    config = FleetConfig.model_validate({"discover_nodes": True, "gpu_types": {
        "T4": {"onnxruntime": "1.31.1"}, "6.1": {"onnxruntime": "1.30.0"}}})
    by_type = plan_node(config, _node({"fleet.gpu": "T4", "fleet.cc": "7.5"}))
    assert [spec.environment for spec, _ in by_type] == [("onnxruntime-gpu==1.31.1",)] * 2
    by_cc = plan_node(config, _node({"fleet.gpu": "P4", "fleet.cc": "6.1"}, gpus=1))
    assert [spec.environment for spec, _ in by_cc] == [("onnxruntime-gpu==1.30.0",)]
    unlabelled = plan_node(config, _node({}, gpus=1))
    assert [spec.environment for spec, _ in unlabelled] == [()]  # the fleet's own environment

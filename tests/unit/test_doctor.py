"""`fleet doctor` (cluster.doctor): a pure function of the workers' probes, the config and the repository."""

from cluster.config import FleetConfig
from cluster.doctor import diagnose, render
from workers.devices import Device
from workers.manifest import Manifest
from workers.targets import Runtime, Target
from workers.tensors import TensorSpec


def view(worker_id, node, name, cc, trt, ort, opset, environment=()):
    device = Device(name, f"SIM-{worker_id}", "gpu", cc, 1 << 30, simulated=True)
    runtimes = [Runtime("tensorrt", trt, "tensorrt", simulated=True), Runtime("onnxruntime", ort, "cpu", max_opset=opset)]
    probe = {"python": f"/envs/{ort}/bin/python", "onnxruntime": ort, "providers": ["CPUExecutionProvider"],
             "max_opset": opset, "cuda_run": None, "tensorrt": None, "tensorrt_builder": None,
             "environment": list(environment), "problems": []}
    return {"worker_id": worker_id, "node": node, "host": "h", "device": device.to_dict(),
            "runtimes": [r.to_dict() for r in runtimes], "probe": probe, "runtime_problems": []}


def plan(cc, trt, version="1"):
    spec = (TensorSpec("input", "FP32", (-1, 4)),)
    target = Target("tensorrt", trt, cc, provider="tensorrt", simulated=True, opset=17)
    return Manifest("digits", version, "float32", target, "model.onnx", "0" * 64, "1" * 64, spec, spec, 10)


def test_one_misconfigured_host_is_named_with_the_fix():
    config = FleetConfig.model_validate({"nodes": [], "discover_nodes": True,
                                         "gpu_types": {"P4": {"onnxruntime": "1.30.0"}, "V100": {"onnxruntime": "1.31.1"}}})
    views = [view("t4-gpu0", "t4-node", "Tesla T4", "7.5", "10.16.1", "1.32.0", 28),
             view("v100-gpu0", "v100-node", "Tesla V100-SXM2-16GB", "7.0", "10.4.0", "1.31.1", 26, ["onnxruntime==1.31.1"]),
             view("p4-gpu0", "p4-node", "Tesla P4", "6.1", "8.6.1", "1.32.0", 28, ["onnxruntime==1.30.0"])]
    manifests = [plan("7.5", "10.16.1"), plan("7.0", "10.4.0")]
    events = [{"event": "runtime-env-failed", "node": "p4-node", "packages": ["onnxruntime==1.30.0"],
               "reason": "could not prepare ...\nERROR: No matching distribution found for onnxruntime==1.30.0"}]
    report = diagnose(views, config, manifests, events)
    by_id = {w["worker_id"]: w for h in report["hosts"] for w in h["workers"]}
    assert not by_id["t4-gpu0"]["problems"] and not by_id["v100-gpu0"]["problems"] and not by_id["v100-gpu0"]["missing"]
    p4 = by_id["p4-gpu0"]
    assert any("gpu_types.P4.onnxruntime is 1.30.0, the worker runs ONNX Runtime 1.32.0" in p for p in p4["problems"])
    assert any("No matching distribution found" in p for p in p4["problems"])
    assert p4["missing"] and "digits version 1" in p4["missing"][0]
    assert "fleet build SOURCE.onnx --name digits --version 1 --targets P4" in p4["fixes"]
    assert any("fleet runtimes --config" in f and "onnxruntime==1.30.0" in f for f in p4["fixes"])
    text = render(report)
    assert "PROBLEM" in text and "p4-gpu0" in text and report["problems"] == 3

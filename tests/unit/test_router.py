import pytest

from cluster.router import Router, WorkerState
from workers.devices import Device
from workers.errors import ModelNotFound, NoCompatibleWorker
from workers.manifest import Manifest
from workers.targets import Runtime, Target, WorkerCaps
from workers.tensors import TensorSpec

ORT = Runtime("onnxruntime", "1.23.2", "cpu")


def state(worker_id, cc, trt_version, budget=100, used=0, loaded=()):
    device = Device(worker_id, f"SIM-{worker_id}", "gpu", cc, 1000, simulated=True)
    caps = WorkerCaps(worker_id, device, (Runtime("tensorrt", trt_version, "tensorrt", simulated=True), ORT))
    return WorkerState(caps, budget_bytes=budget, used_bytes=used, loaded=set(loaded))


def manifest(model, cc, trt_version, footprint=10, version="1"):
    target = Target("tensorrt", trt_version, cc, provider="tensorrt", simulated=True)
    spec = (TensorSpec("input", "FP32", (-1, 4)),)
    return Manifest(model, version, "float32", target, "model.onnx", "0" * 64, "1" * 64, spec, spec, footprint)


@pytest.fixture
def fleet():
    t4a, t4b = state("t4-a", "7.5", "10.16.1"), state("t4-b", "7.5", "10.16.1")
    p4, v100 = state("p4", "6.1", "8.6.1"), state("v100", "7.0", "10.4.0")
    m75 = manifest("only75", "7.5", "10.16.1")
    router = Router()
    router.set_inventory([t4a, t4b, p4, v100], [m75, manifest("gone", "8.0", "10.16.1")])
    return router, m75


def test_only_compatible_workers_are_candidates(fleet):
    router, m75 = fleet
    assert sorted(w for w, _ in router.compatible("only75", "1")) == ["t4-a", "t4-b"]
    assert {c.worker_id for c in router.placement("only75", "1")} == {"t4-a", "t4-b"}


def test_choose_least_outstanding_among_holders(fleet):
    router, m75 = fleet
    assert router.choose("only75", "1") is None  # nobody holds it yet
    router.mark_loaded("t4-a", m75.engine_key)
    router.mark_loaded("t4-b", m75.engine_key)
    router.begin("t4-a")
    assert router.choose("only75", "1").worker_id == "t4-b"
    router.begin("t4-b")
    router.begin("t4-b")
    assert router.choose("only75", "1").worker_id == "t4-a"
    router.mark_dead("t4-a")
    assert router.choose("only75", "1").worker_id == "t4-b"


def test_ties_take_turns(fleet):
    router, m75 = fleet
    router.mark_loaded("t4-a", m75.engine_key)
    router.mark_loaded("t4-b", m75.engine_key)
    picks = {router.choose("only75", "1").worker_id for _ in range(4)}
    assert picks == {"t4-a", "t4-b"}


def test_no_compatible_worker_names_built_and_present_targets(fleet):
    router, _ = fleet
    with pytest.raises(NoCompatibleWorker) as err:
        router.placement("gone", "1")
    msg = str(err.value)
    assert "built targets: 8.0 (TensorRT 10.16.1) [simulated]" in msg
    assert "Tesla" not in msg and "p4 (compute capability 6.1, simulated)" in msg


def test_placement_prefers_room_without_eviction():
    a = state("a", "7.5", "10.16.1", budget=100, used=95)
    b = state("b", "7.5", "10.16.1", budget=100, used=50)
    router = Router()
    m = manifest("m", "7.5", "10.16.1", footprint=20)
    router.set_inventory([a, b], [m])
    assert [c.worker_id for c in router.placement("m", "1")] == ["b", "a"]


def test_versions_resolve_latest():
    router = Router()
    router.set_inventory([state("a", "7.5", "10.16.1")], [manifest("m", "7.5", "10.16.1", version=v) for v in ("1", "2", "10")])
    assert router.resolve("m", None) == "10"
    with pytest.raises(ModelNotFound):
        router.resolve("m", "3")
    with pytest.raises(ModelNotFound):
        router.resolve("other", None)

"""Version rollout across GPU types (cluster.rollout + the router's per-worker defaults): no Ray."""

import pytest

from cluster.frontdoor.routes import routes_from
from cluster.rollout import RolloutState, gpu_type, promote, rollback
from cluster.router import Router, WorkerState
from cluster.runtime_policy import PrecisionPolicy
from workers.devices import Device
from workers.errors import InvalidInput, ModelNotFound
from workers.manifest import Manifest
from workers.targets import Runtime, Target, WorkerCaps
from workers.tensors import TensorSpec

TYPES = {"T4": ("Tesla T4", "7.5", "10.16.1"), "P4": ("Tesla P4", "6.1", "8.6.1"),
         "V100": ("Tesla V100-SXM2-16GB", "7.0", "10.4.0")}


def worker(worker_id, kind, loaded=()):
    name, cc, trt = TYPES[kind]
    device = Device(name, f"SIM-{worker_id}", "gpu", cc, 1 << 30, simulated=True)
    caps = WorkerCaps(worker_id, device, (Runtime("tensorrt", trt, "tensorrt", simulated=True),
                                          Runtime("onnxruntime", "1.32.0", "cpu")))
    return WorkerState(caps, budget_bytes=1 << 30, loaded=set(loaded))


def artifact(kind, version, model="m", precision="float32"):
    _, cc, trt = TYPES[kind]
    target = Target("tensorrt", trt, cc, provider="tensorrt", simulated=True, precision=precision)
    spec = (TensorSpec("input", "FP32", (-1, 4)),)
    return Manifest(model, version, precision, target, "model.onnx", "0" * 64, "1" * 64, spec, spec, 10)


def fleet(manifests, loaded_all=True):
    """t4-a, t4-b, p4, v100; with ``loaded_all`` each holds every artifact it can run."""
    keys = {m.engine_key for m in manifests}
    ws = [worker("t4-a", "T4", keys if loaded_all else ()), worker("t4-b", "T4", keys if loaded_all else ()),
          worker("p4", "P4", keys if loaded_all else ()), worker("v100", "V100", keys if loaded_all else ())]
    router = Router()
    router.set_inventory(ws, manifests)
    return router


V1 = [artifact(k, "1") for k in TYPES]


def test_gpu_type_is_the_short_model_name():
    assert gpu_type(Device("Tesla V100-SXM2-16GB", "u", "gpu", "7.0", 1)) == "V100"
    assert gpu_type(Device("NVIDIA H100 80GB HBM3", "u", "gpu", "9.0", 1)) == "H100"
    assert gpu_type(Device("NVIDIA A100-SXM4-80GB", "u", "gpu", "8.0", 1)) == "A100"
    assert gpu_type(Device("CPU x86_64", "u", "cpu", None, 1)) == "cpu"


def test_version_2_for_one_type_moves_only_that_type():
    router = fleet(V1 + [artifact("T4", "2")])
    assert router.defaults("m") == {"t4-a": "2", "t4-b": "2", "p4": "1", "v100": "1"}
    # unpinned requests: the T4s serve version 2, the others keep version 1 (not all onto the T4s)
    picks = {router.choose_unpinned("m").worker_id: None for _ in range(16)}
    assert set(picks) == {"t4-a", "t4-b", "p4", "v100"}
    served = {c.worker_id: c.manifest.version for c in router.unpinned_holders("m")}
    assert served == {"t4-a": "2", "t4-b": "2", "p4": "1", "v100": "1"}
    view = router.rollout_view("m")
    assert view["mixed"] and view["latest"] == "2"
    assert {t["gpu_type"]: (t["default"], t["waiting_for"]) for t in view["types"]} == {
        "T4": ("2", None), "P4": ("1", "2"), "V100": ("1", "2")}
    assert router.types_missing("m", "2") == ["P4", "V100"]


def test_promote_pins_unpinned_traffic_and_rollback_returns():
    router = fleet(V1 + [artifact(k, "2") for k in TYPES])
    assert set(router.defaults("m").values()) == {"2"}  # per-type latest: every type has version 2
    state = promote(RolloutState(), "m", "1", router.models()["m"])
    router.set_rollout(state)
    assert set(router.defaults("m").values()) == {"1"}
    assert router.resolve("m", None) == "1" and not router.rollout_view("m")["mixed"]
    state = promote(state, "m", "2", router.models()["m"])
    router.set_rollout(state)
    assert set(router.defaults("m").values()) == {"2"}
    state = rollback(state, "m")  # back to the previous promotion
    router.set_rollout(state)
    assert state.promoted("m") == "1" and set(router.defaults("m").values()) == {"1"}
    state = rollback(state, "m")  # and then to per-type latest
    router.set_rollout(state)
    assert state.promoted("m") is None and set(router.defaults("m").values()) == {"2"}
    with pytest.raises(InvalidInput, match="no promotion to roll back"):
        rollback(state, "m")
    with pytest.raises(ModelNotFound, match="no version '9'"):
        promote(state, "m", "9", router.models()["m"])


def test_promoted_version_caps_types_without_its_artifact():
    router = fleet(V1 + [artifact("T4", "2"), artifact("T4", "3"), artifact("P4", "3")])
    router.set_rollout(promote(RolloutState(), "m", "2", router.models()["m"]))
    # T4 has 2; P4 has 1 and 3 but 3 is newer than the promotion: 1; V100 has 1 only
    assert router.defaults("m") == {"t4-a": "2", "t4-b": "2", "p4": "1", "v100": "1"}


def test_pinned_requests_are_not_affected():
    router = fleet(V1 + [artifact("T4", "2")])
    assert {c.worker_id for c in [router.choose("m", "1") for _ in range(8)]} == {"t4-a", "t4-b", "p4", "v100"}
    assert {router.choose("m", "2").worker_id for _ in range(8)} == {"t4-a", "t4-b"}


def test_front_door_routes_unpinned_requests_by_each_workers_default():
    router = fleet(V1 + [artifact("T4", "2")])
    addresses = {w: ("127.0.0.1", 9000 + i) for i, w in enumerate(sorted(router.workers))}
    routes = routes_from(router, addresses)
    unpinned = [r for r in routes if r.latest]
    assert len(unpinned) == 1 and unpinned[0].version == ""  # mixed: its own route, every type in it
    assert {s.name for s in unpinned[0].servers} == {"t4-a", "t4-b", "p4", "v100"}
    router.set_rollout(promote(RolloutState(), "m", "1", router.models()["m"]))
    routes = routes_from(router, addresses)
    assert [(r.version, len(r.servers)) for r in routes if r.latest] == [("1", 4)]  # one version: as before
    # a worker holding only version 1 where its default is 2 is not in the unpinned route
    router = fleet(V1 + [artifact("T4", "2")], loaded_all=False)
    for w in router.workers:
        router.mark_loaded(w, artifact(TYPES_OF[w], "1").engine_key)
    routes = routes_from(router, addresses)
    assert [sorted(s.name for s in r.servers) for r in routes if r.latest] == [["p4", "v100"]]


TYPES_OF = {"t4-a": "T4", "t4-b": "T4", "p4": "P4", "v100": "V100"}


def test_precision_policy_keeps_float16_off_the_p4():
    fp16 = [artifact(k, "1", precision="float16") for k in TYPES]
    router = Router()
    router.precision_policy = PrecisionPolicy(by_type=(("P4", ("float32", "int8")),))
    keys = {m.engine_key for m in fp16}
    router.set_inventory([worker("p4", "P4", keys), worker("t4-a", "T4", keys)], fp16)
    assert {w for w, _ in router.compatible("m", "1")} == {"t4-a"}
    assert router.defaults("m") == {"t4-a": "1"}

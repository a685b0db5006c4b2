"""Planning a host's TensorRT upgrade (cluster.upgrade, pure): what is rebuilt first, what is dropped after."""

import dataclasses

import pytest

from cluster.config import load_config
from cluster.controller.plan import plan_declared, with_tensorrt
from cluster.repository import Repository
from cluster.rollout import RolloutState, promote
from cluster.rollout_store import (
    read_rollout,
    read_tensorrt_upgrades,
    write_rollout,
    write_tensorrt_upgrade,
)
from cluster.runtime_policy import RuntimeProfile, tensorrt_refusal
from cluster.upgrade import check_sources, check_upgrade, plan_upgrade, upgraded
from tests.unit.fleet_doubles import ORT, caps, manifest
from workers.actor import WorkerSpec
from workers.errors import SourceNotKept, UpgradeRefused
from workers.targets import Target, can_run

OLD, NEW = "10.4.0", "10.16.1.11"
T4S = [caps("t4-gpu0", "7.5", OLD), caps("t4-gpu1", "7.5", OLD)]
V100 = caps("v100-gpu0", "7.0", OLD)
P4 = caps("p4-gpu0", "6.1", "8.6.1")
FLEET = T4S + [V100, P4]


def test_the_plans_the_node_runs_are_rebuilt_for_the_new_release_once_per_target():
    t4 = manifest("mlp", "7.5", OLD)
    v100 = manifest("mlp", "7.0", OLD)
    p4 = manifest("mlp", "6.1", "8.6.1")
    plan = plan_upgrade("t4-node", [t4, v100, p4], T4S, FLEET, NEW)
    assert len(plan.rebuilds) == 1  # two T4s, one target
    rebuild = plan.rebuilds[0]
    assert rebuild.old == t4 and rebuild.device == T4S[0].device
    assert rebuild.target == dataclasses.replace(t4.target, backend_version=NEW)
    assert rebuild.target.key() == "tensorrt-10.16.1-sm75-sim"
    assert all(can_run(rebuild.target, upgraded(c, NEW)) for c in T4S)
    assert plan.drop == (t4,)  # the V100's 10.4 plan and the P4's stay: their hosts still run them
    assert plan.old_versions == (OLD,) and plan.workers == ("t4-gpu0", "t4-gpu1")


def test_the_rebuild_is_the_old_build_with_the_new_target():
    old = dataclasses.replace(manifest("mlp", "7.5", OLD, version="3"), max_batch=256,
                              build_options={"footprint_bytes": 5, "fallback_reason": "x"})
    rebuild = plan_upgrade("t4-node", [old], T4S, FLEET, NEW).rebuilds[0]
    request = rebuild.request("source.onnx")
    assert (request.model, request.version, request.max_batch) == ("mlp", "3", 256)
    assert request.options == {"footprint_bytes": 5} and request.target.backend_version == NEW
    assert rebuild.calibration_method is None
    int8 = dataclasses.replace(old, build_options={"calibration": "0123456789abcdef-entropy"})
    assert plan_upgrade("t4-node", [int8], T4S, FLEET, NEW).rebuilds[0].calibration_method == "entropy"


def test_a_new_plan_already_in_the_repository_is_not_built_again():
    old = manifest("mlp", "7.5", OLD)
    new = manifest("mlp", "7.5", NEW)
    plan = plan_upgrade("t4-node", [old, new], T4S, FLEET, NEW)
    assert plan.rebuilds == () and plan.ready == (new,) and plan.drop == (old,)


def test_version_compatible_plans_and_onnx_runtime_artifacts_are_left_alone():
    vc = Target("tensorrt", OLD, "7.5", provider="tensorrt", simulated=True, version_compatible=True)
    compatible = dataclasses.replace(manifest("vc", "7.5", OLD), target=vc)
    cpu = dataclasses.replace(manifest("cpu"), target=Target("onnxruntime", ORT.version))
    plan = plan_upgrade("t4-node", [compatible, cpu], T4S, FLEET, NEW)
    assert plan.rebuilds == () and plan.drop == ()


def test_an_old_plan_another_host_still_runs_is_kept():
    other_t4 = caps("t4b-gpu0", "7.5", OLD)  # a second T4 host, staying on 10.4
    plan = plan_upgrade("t4-node", [manifest("mlp", "7.5", OLD)], T4S, FLEET + [other_t4], NEW)
    assert len(plan.rebuilds) == 1 and plan.drop == ()


def test_refused_upgrades_say_why():
    with pytest.raises(UpgradeRefused, match="runs TensorRT 10.16.1.11 already"):
        check_upgrade("t4-node", [caps("a", "7.5", NEW)], "10.16.1", tensorrt_refusal)
    with pytest.raises(UpgradeRefused, match="TensorRT 10.4 is its last release"):
        check_upgrade("v100-node", [V100], NEW, tensorrt_refusal)
    with pytest.raises(UpgradeRefused, match="TensorRT 8.6 is their last release"):
        check_upgrade("p4-node", [P4], "10.4.0", tensorrt_refusal)
    with pytest.raises(UpgradeRefused, match="TensorRT 11 needs 7.5"):
        check_upgrade("v100-node", [V100], "11.0.0", tensorrt_refusal)
    check_upgrade("t4-node", T4S, NEW, tensorrt_refusal)
    check_upgrade("p4-node", [caps("p4", "6.1", "8.5.3")], "8.6.1", tensorrt_refusal)


def test_a_source_the_repository_does_not_keep_is_named_with_the_fix():
    plan = plan_upgrade("t4-node", [manifest("mlp", "7.5", OLD)], T4S, FLEET, NEW)
    check_sources(plan, lambda sha: True)
    with pytest.raises(SourceNotKept, match=r"mlp v1 \(float32\).*run `fleet build SOURCE.onnx --name mlp --version 1"):
        check_sources(plan, lambda sha: False)


def test_a_recorded_upgrade_plans_the_node_on_its_new_release(tmp_path):
    repo = Repository(tmp_path / "repo")
    assert read_tensorrt_upgrades(repo) == {}
    write_rollout(repo, promote(RolloutState(), "m", "1", ["1"]))
    write_tensorrt_upgrade(repo, "t4-node", "10.17.0")
    write_tensorrt_upgrade(repo, "t4-node", NEW)  # replaced, others kept
    write_tensorrt_upgrade(repo, "p4-node", "8.6.1")
    assert read_tensorrt_upgrades(repo) == {"t4-node": NEW, "p4-node": "8.6.1"}
    assert read_rollout(repo).promoted("m") == "1"  # a directory of its own: the promotions stay
    config = load_config("configs/hetero-sim.yaml")
    before = {s.worker_id: s for s, _ in plan_declared(config)}
    after = {s.worker_id: s for s, _ in plan_declared(config, {"t4-node": "10.17.0"})}
    assert [r.version for r in after["t4-node-gpu1"].simulated_runtimes] == ["10.17.0"]
    assert after["t4-node-gpu1"].simulated_devices == before["t4-node-gpu1"].simulated_devices
    assert after["v100-node-gpu0"] == before["v100-node-gpu0"]
    assert after["v100-node-gpu0"].environment == ("onnxruntime==1.31.1",)
    # a real GPU: its type's environment, with the new TensorRT in place of the old
    real = with_tensorrt(WorkerSpec("h-gpu0", environment=("onnxruntime-gpu==1.32.0", "tensorrt-cu12==10.4.0")), NEW,
                         RuntimeProfile(onnxruntime="1.32.0", tensorrt="10.4.0"))
    assert real.environment == ("onnxruntime-gpu==1.32.0", f"tensorrt-cu12=={NEW}")

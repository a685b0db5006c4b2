"""Faults on the simulated fleet and around it: lost nodes, corrupt artifacts, forced wrong
targets, a full disk during a build, an unreachable GCS."""

import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import requests

from cluster.buildfarm import build_on_fleet
from cluster.client import FleetClient
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.repository import Repository
from tests.integration.fleet_fixtures import checkout_env, distinct_model, running_fleet, simulated_cluster, worker_handles
from workers.artifacts import RayObject
from workers.errors import ArtifactCorrupt, IncompatibleArtifact, NoCompatibleWorker

pytestmark = pytest.mark.integration
X = np.zeros((1, 64), np.float32)


@pytest.fixture(scope="module")
def sim(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("faults")
    with simulated_cluster("configs/hetero-sim.yaml") as cluster:
        with running_fleet("configs/hetero-sim.yaml", work / "repo", cluster_address=cluster.address) as (cfg, url):
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            repo = Repository(cfg.repository)
            fragile = distinct_model(demo_models["digits-mlp"], work / "fragile.onnx", "fragile")  # in no cache yet
            for name, targets in (("only-p4", "P4"), ("only-t4", "T4"), ("fragile", "V100"), ("everywhere", "auto")):
                build_on_fleet(controller, fragile if name == "fragile" else demo_models["digits-mlp"], model=name,
                               targets=targets)
            yield {"cluster": cluster, "url": url, "controller": controller, "repo": repo}


def status(sim):
    return {w["worker_id"]: w for n in requests.get(sim["url"] + "/v2/fleet/status", timeout=30).json()["nodes"] for w in n["workers"]}


def test_corrupt_artifact_is_refused_reported_and_others_unaffected(sim):
    (art,) = sim["repo"].artifacts("fragile")
    with open(sim["repo"].root / art.key, "r+b") as f:
        f.seek(200)
        f.write(b"\x00bitrot\x00")
    with FleetClient(sim["url"]) as client:
        with pytest.raises(ArtifactCorrupt, match="is corrupt: sha256 .* rebuild it with `fleet build`"):
            client.infer("fragile", {"input": X})
        client.infer("everywhere", {"input": X})  # other models unaffected
    events = requests.get(sim["url"] + "/v2/fleet/status", timeout=30).json()["events"]
    assert any(e["event"] == "load-refused" and "corrupt" in e["reason"] for e in events)
    assert all("fragile" not in " ".join(e["key"] for e in w["ledger"]) for w in status(sim).values())


def test_wrong_target_forced_onto_a_worker_is_refused_by_the_worker(sim):
    (t4_plan,) = sim["repo"].artifacts("only-t4")
    p4 = worker_handles(sim["controller"])["p4-node-gpu0"]
    with pytest.raises(IncompatibleArtifact, match="refuses only-t4 built for 7.5 .* device has 6.1"):
        try:
            ray.get(p4.load.remote(t4_plan.manifest, RayObject(ray.put(b"never read"), "a test")))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
    assert t4_plan.manifest.engine_key not in ray.get(p4.health.remote()).loaded


def test_node_lost(sim):
    with FleetClient(sim["url"]) as client:
        client.infer("only-p4", {"input": X})
        sim["cluster"].remove_node(sim["cluster"].fleet_nodes["p4-node"])
        deadline = time.monotonic() + 60
        while status(sim)["p4-node-gpu0"]["alive"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not status(sim)["p4-node-gpu0"]["alive"]
        with pytest.raises(NoCompatibleWorker, match="no artifact any live worker can run"):
            client.infer("only-p4", {"input": X})
        for _ in range(10):  # the rest of the fleet serves on
            client.infer("everywhere", {"input": X})
            assert client.last_parameters["fleet_worker"] != "p4-node-gpu0"


def test_disk_full_during_a_build_leaves_no_partial_artifact(tmp_path, demo_models):
    def small_files():  # "disk full": any write past 8 KiB fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))

    repo = tmp_path / "repo"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "build", str(demo_models["digits-mlp"]), "--name", "digits-mlp", "--local",
         "--repository", str(repo)], capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert result.returncode == 1
    assert "could not write the artifact" in result.stderr and "File too large" in result.stderr
    assert Repository(repo).artifacts() == []
    assert not (repo / ".staging").exists() or not any((repo / ".staging").iterdir())


def test_unreachable_gcs_at_fleet_up_is_a_clear_fast_error(tmp_path):
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--address", "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=checkout_env())
    assert result.returncode == 2
    assert "cannot reach Ray's GCS at 127.0.0.1:9" in result.stderr
    assert time.monotonic() - t0 < 30

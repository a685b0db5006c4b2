"""No file path crosses a process boundary: the simulated T4/P4/V100 fleet with every worker node in
its own mount namespace, where the head's repository directory is an empty tmpfs, and with its own
temporary directory (so its own artifact cache). Builds come back as bytes, artifacts go out through
Ray, calibrations live in the repository, and build -> load -> infer works as before.
"""

import collections
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import ray

from cluster import deploy
from cluster.buildfarm import FleetRepository, build_on_fleet, prepare_build
from cluster.client import FleetClient
from cluster.config import load_config
from cluster.demo import digits_split
from cluster.names import CONTROLLER_NAME, NAMESPACE, NODE_LABEL
from cluster.net import free_port
from tests.integration.fleet_fixtures import worker_handles
from tests.integration.isolated_nodes import IsolatedNodes
from tests.needs import skip_unless
from workers.artifacts import RepositoryObject
from workers.errors import ArtifactCorrupt
from workers.storage import StoreSpec

pytestmark = pytest.mark.integration
CONFIG = "configs/hetero-sim.yaml"


@ray.remote(num_cpus=0)
def look_around(path: str) -> tuple[list[str] | None, str]:
    """On a node: what it sees at the head's repository path, and its own temporary directory."""
    import os
    import tempfile

    return (os.listdir(path) if os.path.isdir(path) else None), tempfile.gettempdir()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    skip_unless(os.geteuid() == 0 and shutil.which("unshare") is not None,
                "needs root and unshare(1) to give each simulated node its own mount namespace")
    from ray.cluster_utils import Cluster

    work = tmp_path_factory.mktemp("isolated")
    repo = work / "repo"
    repo.mkdir()
    config = load_config(CONFIG, repository=str(repo), port=free_port())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = IsolatedNodes(cluster.address, repo, work / "hosts")
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        for node in config.nodes:  # one at a time: `ray start` allows a raylet 30 s to register, on 2 busy cores
            nodes.add(node.name, len(node.gpus), node.labels)
            nodes.wait_joined()
        deploy.deploy(config)
        yield {"repo": repo, "nodes": nodes.nodes, "url": f"http://127.0.0.1:{config.port}", "work": work,
               "controller": ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)}
    finally:
        if ray.is_initialized():
            deploy.teardown()
            ray.shutdown()
        leftovers = nodes.stop()
        cluster.shutdown()
        assert leftovers == [], f"processes of the isolated nodes outlived them: {leftovers}"


def test_build_load_infer_with_no_shared_directory(fleet, demo_models, digits_test):
    outcomes = build_on_fleet(fleet["controller"], demo_models["digits-mlp"], model="digits-all", targets="auto",
                              max_batch=256)
    assert sorted(o.target.key() for o in outcomes if o.ok and not o.cached) == [
        "tensorrt-10.16.1-sm75-sim", "tensorrt-10.4.0-sm70-sim", "tensorrt-8.6.1-sm61-sim"]
    # published on the head by the controller, and out of every worker node's sight
    assert len(list(fleet["repo"].glob("digits-all/1/float32/*/manifest.json"))) == 3
    for name, node in fleet["nodes"].items():
        listing, tmpdir = ray.get(look_around.options(label_selector={NODE_LABEL: name}).remote(str(fleet["repo"])))
        assert listing == [] and tmpdir == str(node.tmpdir), (name, listing, tmpdir)

    X = digits_test[0][:16]
    expected = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})[0]
    served = collections.Counter()
    with FleetClient(fleet["url"]) as client:
        client.load("digits-all")  # on every compatible worker: each fetches through its host's cache
        # Every holder is in the front door's routes a moment after the load returns (the routes
        # follow the ledger): until then the holders already routed answer.
        deadline = time.monotonic() + 20
        while len(served) < 2 and time.monotonic() < deadline:
            np.testing.assert_array_equal(client.infer("digits-all", {"input": X})["label"], expected)
            served[client.last_parameters["fleet_worker"]] += 1
    assert len(served) >= 2, served

    caches = {w: ray.get(h.stats.remote())["artifact_cache"] for w, h in worker_handles(fleet["controller"]).items()}
    for worker, cache in caches.items():
        node = fleet["nodes"][worker.rsplit("-gpu", 1)[0]]
        assert cache["root"] == str(node.cache)  # its own host's cache, under its own TMPDIR
    assert caches["t4-node-gpu0"]["fills"] + caches["t4-node-gpu1"]["fills"] == 1  # one fetch per host
    assert caches["p4-node-gpu0"]["fills"] == 1 and caches["v100-node-gpu0"]["fills"] == 1
    for node in fleet["nodes"].values():
        assert [p.name for p in node.cache.glob("*/model.onnx")], f"nothing in {node.cache}"


def test_a_path_handed_to_a_worker_would_not_be_there(fleet):
    """What this module guards against, shown once: the head's path means nothing on a worker node."""
    (manifest_path,) = fleet["repo"].glob("digits-all/1/float32/tensorrt-8.6.1-sm61-sim/manifest.json")
    from workers.manifest import Manifest

    manifest = Manifest.read(manifest_path.parent)
    p4 = worker_handles(fleet["controller"])["p4-node-gpu0"]
    as_a_path = RepositoryObject(StoreSpec(str(fleet["repo"])), f"{manifest_path.parent.relative_to(fleet['repo'])}/model.onnx")
    stale = manifest.__class__.from_dict(manifest.to_dict() | {"model": "digits-path", "artifact_sha256": "1" * 64})
    with pytest.raises(ArtifactCorrupt, match="is missing from the repository"):
        try:
            ray.get(p4.load.remote(stale, as_a_path))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None


def test_int8_calibration_lives_in_the_repository_and_builds_on_a_worker(fleet, demo_models):
    X_train, X_test, _, y_test = digits_split()
    np.savez(fleet["work"] / "train.npz", input=X_train[:256])
    source = Path(demo_models["digits-mlp"])
    prepared = prepare_build(FleetRepository(fleet["controller"]), source, "int8_calib",
                             calib_data=str(fleet["work"] / "train.npz"))
    assert list(fleet["repo"].glob("_calibration/*/ranges.json"))  # stored by the controller, on the head
    (outcome,) = build_on_fleet(fleet["controller"], source, model="digits-int8", targets="T4", prepared=prepared,
                                accept_accuracy_loss=True)
    assert outcome.ok, outcome.error
    with FleetClient(fleet["url"]) as client:
        labels = client.infer("digits-int8", {"input": X_test[:64].astype(np.float32)})["label"]
    assert np.mean(labels == y_test[:64]) > 0.85

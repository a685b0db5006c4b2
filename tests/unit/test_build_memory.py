"""A build on a worker counts its memory in the device's ledger before it starts, or waits: it never
pushes a loaded engine out (real FleetWorker, real ONNX Runtime builds, a simulated T4)."""

import threading
import time

import pytest

from cluster.buildfarm import build_locally, local_target
from cluster.repository import Repository
from workers.actor import FleetWorker, WorkerSpec
from workers.build import BuildRequest, build_memory_bytes
from workers.devices import Device
from workers.errors import NoCapacity
from workers.manifest import sha256_file
from workers.targets import Runtime, Target

T4 = Device("Tesla T4", "SIM-t4-0", "gpu", "7.5", 15 << 30, simulated=True)
T4_TRT = Runtime("tensorrt", "10.16.1", "tensorrt", simulated=True)
PLAN = Target("tensorrt", "10.16.1", "7.5", provider="tensorrt", simulated=True)
WORKSPACE = 8 << 20


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, demo_models):
    repo = Repository(tmp_path_factory.mktemp("repo"))
    path = demo_models["cnn-small"]
    build_locally(repo, BuildRequest(str(path), "cnn-small", local_target(), max_batch=64), sha256_file(path))
    (stored,) = repo.artifacts("cnn-small")
    return repo, stored.manifest


def worker_beside(cnn, source, wait_s: float) -> tuple[FleetWorker, int]:
    """A T4 whose budget holds the loaded cnn or the build, not both."""
    repo, manifest = cnn
    need = build_memory_bytes(BuildRequest(str(source), "digits-b", PLAN, workspace_bytes=WORKSPACE))
    spec = WorkerSpec("t4", simulated_devices=(T4,), simulated_runtimes=(T4_TRT,),
                      budget_bytes=manifest.footprint_bytes + need - 1, build_workspace_bytes=WORKSPACE,
                      build_wait_s=wait_s)
    worker = FleetWorker(spec)
    worker.load(manifest, repo.object_source(manifest))
    return worker, need


def test_a_build_waits_for_room_and_never_evicts_a_loaded_engine(cnn, demo_models):
    source = demo_models["digits-mlp"]
    worker, need = worker_beside(cnn, source, wait_s=60)
    engine = cnn[1].engine_key
    held = []
    real_build = worker._build

    def observed_build(*args):  # what the ledger holds while the build runs
        held.append(worker.runner.ledger_snapshot())
        return real_build(*args)

    worker._build = observed_build
    done = []
    request = BuildRequest("digits-mlp.onnx", "digits-b", PLAN, max_batch=64)
    thread = threading.Thread(target=lambda: done.append(worker.build_from_bytes(source.read_bytes(), request)))
    thread.start()
    time.sleep(2.0)
    assert not done and not held  # waiting: it did not start ...
    assert worker.health().loaded == {engine}  # ... and the engine it would not fit beside still serves
    assert worker.health().counters["evictions"] == 0
    assert worker.unload(engine)  # room: the build goes ahead
    thread.join(60)
    manifest, data = done[0]
    assert manifest["target"]["compute_capability"] == "7.5" and data
    (during,) = held
    (entry,) = [e for e in during["entries"] if e["key"].startswith("build:")]
    assert entry["key"] == "build:digits-b:1:tensorrt-10.16.1-sm75-sim" and entry["footprint_bytes"] == need
    assert entry["loading"]  # never an eviction victim
    assert worker.runner.ledger_snapshot()["entries"] == []  # released after


def test_a_build_that_finds_no_room_in_time_fails_clearly_and_the_engine_stays(cnn, demo_models):
    source = demo_models["digits-mlp"]
    worker, need = worker_beside(cnn, source, wait_s=0.5)
    request = BuildRequest("digits-mlp.onnx", "digits-b", PLAN, max_batch=64)
    with pytest.raises(NoCapacity, match=r"building digits-b:1:tensorrt-10.16.1-sm75-sim needs .* never pushes a "
                                         r"loaded engine out"):
        worker.build_from_bytes(source.read_bytes(), request)
    assert worker.health().loaded == {cnn[1].engine_key}
    assert [e["key"] for e in worker.runner.ledger_snapshot()["entries"]] == [cnn[1].engine_key]

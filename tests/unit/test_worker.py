"""FleetWorker and its EngineRunner without Ray: real ONNX Runtime, real files, real threads."""

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from cluster.buildfarm import build_locally, local_target
from cluster.repository import Repository
from workers.actor import FleetWorker, WorkerSpec
from workers.artifacts import CACHE_ENV, RepositoryObject
from workers.build import BuildRequest
from workers.devices import Device
from workers.errors import ArtifactCorrupt, EngineNotHere, IncompatibleArtifact, InvalidInput, NoCapacity, Overloaded
from workers.kserve.codec import InferRequest
from workers.manifest import Manifest, sha256_file
from workers.messages import LoadOptions
from workers.storage import StoreSpec
from workers.targets import Runtime, Target


@pytest.fixture(scope="module")
def repo(tmp_path_factory, demo_models):
    repo = Repository(tmp_path_factory.mktemp("repo"))
    for name, path in demo_models.items():
        build_locally(repo, BuildRequest(str(path), name, local_target(), max_batch=64), sha256_file(path))
    return repo


def art(repo, model):
    (a,) = repo.artifacts(model)
    return a


def infer(worker, model, feeds, version=None):
    return worker.infer(model, InferRequest(feeds), version).outputs


def wait_until(condition, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.001)


def test_load_infer_matches_onnxruntime(repo, demo_models, digits_test):
    worker = FleetWorker(WorkerSpec("w"))
    a = art(repo, "digits-mlp")
    worker.load(a.manifest, repo.object_source(a.manifest))
    X = digits_test[0][:8]
    reply = worker.infer("digits-mlp", InferRequest({"input": X}))
    ref = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})
    np.testing.assert_array_equal(reply.outputs["label"], ref[0])
    np.testing.assert_allclose(reply.outputs["probabilities"], ref[1], rtol=1e-6)
    assert (reply.version, reply.target_key) == ("1", a.manifest.target.key())
    health = worker.health()
    assert health.loaded == {a.manifest.engine_key}
    assert health.used_bytes == a.manifest.footprint_bytes
    assert worker.unload(a.manifest.engine_key) and worker.health().used_bytes == 0
    with pytest.raises(EngineNotHere, match="not loaded"):
        infer(worker, "digits-mlp", {"input": X})


def test_bad_feeds_are_refused_by_name(repo):
    worker = FleetWorker(WorkerSpec("w"))
    a = art(repo, "digits-mlp")
    worker.load(a.manifest, repo.object_source(a.manifest))
    with pytest.raises(InvalidInput, match="unknown input 'x'"):
        infer(worker, "digits-mlp", {"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(InvalidInput, match=r"dimension 1 is 63, expected 64"):
        infer(worker, "digits-mlp", {"input": np.zeros((1, 63), np.float32)})
    with pytest.raises(InvalidInput, match="datatype FP64 does not match the model's FP32"):
        infer(worker, "digits-mlp", {"input": np.zeros((1, 64))})
    with pytest.raises(InvalidInput, match="rank 1"):
        infer(worker, "digits-mlp", {"input": np.zeros(64, np.float32)})
    assert worker.health().counters["failures"] == 4


def test_non_finite_inputs_refused_only_where_the_model_config_says(repo):
    a = art(repo, "digits-mlp")
    strict, lenient = FleetWorker(WorkerSpec("strict")), FleetWorker(WorkerSpec("lenient"))
    strict.load(a.manifest, repo.object_source(a.manifest), LoadOptions(reject_non_finite=True))
    lenient.load(a.manifest, repo.object_source(a.manifest))
    x = np.zeros((2, 64), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(InvalidInput, match="1 NaN or Inf"):
        infer(strict, "digits-mlp", {"input": x})
    assert infer(lenient, "digits-mlp", {"input": x})["label"].shape == (2,)


def test_request_over_max_batch_is_split(repo, demo_models, digits_test):
    worker = FleetWorker(WorkerSpec("w"))
    a = art(repo, "digits-mlp")
    assert a.manifest.max_batch == 64
    worker.load(a.manifest, repo.object_source(a.manifest))
    X = digits_test[0][:150]
    out = infer(worker, "digits-mlp", {"input": X})
    ref = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})
    np.testing.assert_array_equal(out["label"], ref[0])
    assert out["probabilities"].shape == (150, 10)
    np.testing.assert_allclose(out["probabilities"], ref[1], rtol=1e-6)
    assert worker.runner.engine_stats()[a.manifest.engine_key]["exec_count"] >= 3  # 64 + 64 + 22 rows


def test_split_requests_are_right_when_their_chunks_are_merged_with_others(repo, digits_test):
    """A request over max batch has its chunks' outputs written into one array each; a chunk the
    batcher merged with other requests is copied into its rows."""
    worker = FleetWorker(WorkerSpec("w", slots=2))
    a = art(repo, "digits-mlp")
    worker.load(a.manifest, repo.object_source(a.manifest), LoadOptions(max_queue_delay_us=20_000))
    X = digits_test[0]
    expected = {"label": np.concatenate([infer(worker, "digits-mlp", {"input": X[i:i + 1]})["label"] for i in range(150)])}
    errors = []

    def big():
        for _ in range(10):
            out = infer(worker, "digits-mlp", {"input": X[:150]})
            if not np.array_equal(out["label"], expected["label"]) or out["probabilities"].shape != (150, 10):
                errors.append("big")

    def small(offset):
        for i in range(30):
            row = (offset * 30 + i) % 150
            if infer(worker, "digits-mlp", {"input": X[row:row + 3]})["label"][0] != expected["label"][row]:
                errors.append(row)

    threads = [threading.Thread(target=big) for _ in range(2)] + [threading.Thread(target=small, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_inference_is_correct(repo, digits_test):
    worker = FleetWorker(WorkerSpec("w", slots=4))
    a = art(repo, "digits-mlp")
    worker.load(a.manifest, repo.object_source(a.manifest))
    X = digits_test[0]
    expected = infer(worker, "digits-mlp", {"input": X})["label"]
    errors = []

    def run(offset):
        for i in range(25):
            row = (offset * 25 + i) % len(X)
            got = infer(worker, "digits-mlp", {"input": X[row : row + 1]})["label"][0]
            if got != expected[row]:
                errors.append((row, got))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert worker.health().counters["inferences"] == 16 * 25 + 1


def test_budget_evicts_lru_idle_and_refuses_what_never_fits(repo):
    cnn, mlp = art(repo, "cnn-small"), art(repo, "digits-mlp")
    budget = max(cnn.manifest.footprint_bytes, mlp.manifest.footprint_bytes) + 1000
    worker = FleetWorker(WorkerSpec("w", budget_bytes=budget))
    worker.load(cnn.manifest, repo.object_source(cnn.manifest))
    worker.load(mlp.manifest, repo.object_source(mlp.manifest))  # does not fit beside cnn: evicts it
    health = worker.health()
    assert health.loaded == {mlp.manifest.engine_key}
    assert health.counters["evictions"] == 1
    assert health.used_bytes <= budget
    tiny = FleetWorker(WorkerSpec("tiny", budget_bytes=1000))
    with pytest.raises(NoCapacity, match="more than the whole budget"):
        tiny.load(mlp.manifest, repo.object_source(mlp.manifest))
    assert tiny.health().used_bytes == 0


def test_unload_waits_for_in_flight_inference_then_releases_the_engine(repo):
    worker = FleetWorker(WorkerSpec("w"))
    a = art(repo, "cnn-small")
    key = a.manifest.engine_key
    worker.load(a.manifest, repo.object_source(a.manifest))
    engine = worker.runner._engines[key].engine
    batch = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
    results = []
    thread = threading.Thread(target=lambda: results.append(infer(worker, "cnn-small", {"input": batch})))
    thread.start()
    wait_until(lambda: worker.ledger.get(key) is not None and worker.ledger.get(key).in_flight, what="the run to start")
    assert engine.active
    assert worker.unload(key)  # must wait for the inference, not break it
    # unload returned only once the run was done (the batcher counts it before releasing it) ...
    assert worker.runner.engine_stats()[key]["success"] == 1
    assert not engine.active  # ... and then really released the engine
    thread.join(30)
    assert results and results[0]["logits"].shape == (64, 10)
    assert worker.ledger.get(key) is None and worker.health().loaded == frozenset()


def test_worker_refuses_wrong_target_and_corrupt_artifacts(repo, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # a host that has never seen this artifact
    a = art(repo, "digits-mlp")
    p4 = Device("Tesla P4", "SIM-1", "gpu", "6.1", 8 << 30, simulated=True)
    plan_t4 = Manifest.from_dict(a.manifest.to_dict() | {
        "target": Target("tensorrt", "10.16.1", "7.5", provider="tensorrt", simulated=True).to_dict()})
    worker = FleetWorker(WorkerSpec("p4", simulated_devices=(p4,), simulated_runtimes=(Runtime("tensorrt", "8.6.1", "tensorrt", simulated=True),)))
    with pytest.raises(IncompatibleArtifact, match="refuses digits-mlp built for 7.5 .*device has 6.1"):
        worker.load(plan_t4, repo.object_source(a.manifest))
    assert worker.artifacts.stats.fills == 0  # refused before a byte was fetched
    # corrupt copy: sha256 mismatch is refused before ONNX Runtime sees the bytes
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (repo.root / a.key).read_bytes()
    (broken / "model.onnx").write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ArtifactCorrupt, match="does not match the manifest"):
        FleetWorker(WorkerSpec("w")).load(a.manifest, RepositoryObject(StoreSpec(str(broken)), "model.onnx"))


def test_a_load_never_evicts_an_engine_that_is_still_loading(repo):
    """Two different models loading at once into a budget that holds one: the second gets a clear
    NoCapacity while the first loads (not a KeyError from evicting it), and evicts it once it serves."""
    from workers.engines import open_engine
    from workers.runner import EngineRunner

    cnn, mlp = art(repo, "cnn-small"), art(repo, "digits-mlp")
    activating, release = threading.Event(), threading.Event()

    def slow_open(path, target, **kwargs):
        engine = open_engine(path, target, **kwargs)
        if "cnn" in str(path):
            inner = engine.activate

            def activate():
                activating.set()
                assert release.wait(30)
                return inner()

            engine.activate = activate
        return engine

    budget = max(cnn.manifest.footprint_bytes, mlp.manifest.footprint_bytes) + 1000
    worker = FleetWorker(WorkerSpec("w", budget_bytes=budget))
    runner = EngineRunner(worker.caps, budget, engine_factory=slow_open)
    first = threading.Thread(target=runner.load, args=(cnn.manifest, repo.root / cnn.key))
    first.start()
    try:
        assert activating.wait(30)
        assert runner.ledger.get(cnn.manifest.engine_key).loading
        with pytest.raises(NoCapacity, match="busy or still loading"):
            runner.load(mlp.manifest, repo.root / mlp.key)
    finally:
        release.set()
        first.join(30)
    assert runner.health().loaded == {cnn.manifest.engine_key}
    runner.load(mlp.manifest, repo.root / mlp.key)  # now cnn is idle and in service: it is evicted
    assert runner.health().loaded == {mlp.manifest.engine_key} and runner.health().counters["evictions"] == 1
    runner.close()


def test_the_models_allow_tf32_reaches_the_engine(repo):
    """models.<m>.allow_tf32 travels with the load (LoadOptions) to the ONNX Runtime CUDA provider's use_tf32."""
    from workers.engines import open_engine
    from workers.runner import EngineRunner

    opened = []

    def recording(path, target, **kwargs):
        opened.append(kwargs["allow_tf32"])
        return open_engine(path, target, **kwargs)

    a = art(repo, "digits-mlp")
    worker = FleetWorker(WorkerSpec("w"))
    runner = EngineRunner(worker.caps, 1 << 30, engine_factory=recording)
    artifact = repo.root / a.key
    runner.load(a.manifest, artifact, LoadOptions(allow_tf32=True))
    runner.unload(a.manifest.engine_key)
    runner.load(a.manifest, artifact)
    assert opened == [True, False]
    runner.close()
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    assert OnnxRuntimeEngine("x.onnx", provider="cuda", allow_tf32=True)._cuda_options()["use_tf32"] == 1
    assert OnnxRuntimeEngine("x.onnx", provider="cuda")._cuda_options()["use_tf32"] == 0


def test_max_queue_size_refuses_at_once_and_admits_again_once_the_queue_drains(repo):
    worker = FleetWorker(WorkerSpec("w"))
    a = art(repo, "cnn-small")
    key = a.manifest.engine_key
    worker.load(a.manifest, repo.object_source(a.manifest), LoadOptions(max_queue_size=2, dynamic_batching=False))
    loaded = worker.runner._engines[key]
    slots = loaded.slot_count
    batch = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
    futures, refused = [], 0
    for _ in range(slots):  # the engine is busy: nothing submitted below can finish yet
        loaded.slots.acquire()
    for _ in range(slots + 2 + 5):
        try:
            futures.append(worker.runner.submit(InferRequest({"input": batch}), "cnn-small"))
        except Overloaded as exc:
            refused += 1
            assert "max_queue_size" in str(exc)
    for _ in range(slots):
        loaded.slots.release()
    assert len(futures) == slots + 2 and refused == 5
    assert all(f.result(60).outputs["logits"].shape == (64, 10) for f in futures)
    stats = worker.runner.engine_stats()[key]
    assert (stats["rejected"], stats["success"]) == (5, slots + 2)
    assert worker.ledger.get(key).in_flight == 0
    assert worker.runner.submit(InferRequest({"input": batch[:1]}), "cnn-small").result(30).outputs["logits"].shape == (1, 10)


def test_a_request_over_max_batch_writes_its_chunks_into_the_clients_shared_memory(repo, digits_test, monkeypatch):
    """Inputs and outputs in a client's region, 150 rows over a max batch of 64: each chunk's outputs
    are written into their rows of the region by the engine (the answer points there), and are the
    model's, also with small requests merged into the chunks meanwhile."""
    import uuid
    from multiprocessing import shared_memory

    from workers.kserve.codec import RequestedOutput, ShmInput, ShmWritten
    from workers.shm import ShmRef

    from workers.loaded import LoadedEngine

    worker = FleetWorker(WorkerSpec("w", slots=2))
    a = art(repo, "digits-mlp")
    worker.load(a.manifest, repo.object_source(a.manifest), LoadOptions(max_queue_delay_us=5_000))
    X = digits_test[0]
    expected = infer(worker, "digits-mlp", {"input": X[:150]})
    targets = []  # the arrays the chunks were written into, per request over max batch
    output_arrays = LoadedEngine._output_arrays
    monkeypatch.setattr(LoadedEngine, "_output_arrays",
                        lambda self, rows, given: targets.append(output_arrays(self, rows, given)) or targets[-1])
    region = shared_memory.SharedMemory(name=f"fftest_{uuid.uuid4().hex[:10]}", create=True, size=1 << 16)
    try:
        np.ndarray((150, 64), np.float32, buffer=region.buf)[:] = X[:150]
        assert worker.register_shm("r", "/" + region.name, 0, 1 << 16)
        outputs = {"probabilities": ShmRef("r", 150 * 10 * 4, 150 * 64 * 4), "label": ShmRef("r", 150 * 8, 150 * 74 * 4)}
        request = InferRequest({}, outputs=[RequestedOutput(n, binary=True, shm=ref) for n, ref in outputs.items()],
                               shm_inputs={"input": ShmInput(ShmRef("r", 150 * 64 * 4, 0), "FP32", (150, 64))})
        small = threading.Thread(target=lambda: [infer(worker, "digits-mlp", {"input": X[i:i + 3]}) for i in range(20)])
        small.start()
        for _ in range(5):
            reply = worker.infer("digits-mlp", request)
            assert all(isinstance(reply.outputs[n], ShmWritten) for n in outputs)
            np.testing.assert_array_equal(np.ndarray((150, 10), np.float32, buffer=region.buf, offset=150 * 64 * 4),
                                          expected["probabilities"])
            np.testing.assert_array_equal(np.ndarray((150,), np.int64, buffer=region.buf, offset=150 * 74 * 4),
                                          expected["label"])
            np.ndarray((150 * 12,), np.float32, buffer=region.buf, offset=150 * 64 * 4)[:] = -1  # the next writes anew
        small.join()
        # the region's own memory (views of the worker's mapping), not new arrays copied there after
        assert len(targets) == 5 and all(t[n].base is not None for t in targets for n in outputs)
    finally:
        worker.unregister_shm("r")
        worker.shutdown()
        region.close()
        region.unlink()

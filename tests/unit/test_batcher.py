"""Dynamic batching on a real ONNX Runtime engine."""

import threading

import numpy as np
import pytest

from workers.actor import FleetWorker, WorkerSpec
from workers.kserve.codec import InferRequest
from workers.messages import LoadOptions
from workers.batcher import BatchingOptions, DynamicBatcher
from workers.engines.onnxruntime import OnnxRuntimeEngine


@pytest.fixture(scope="module")
def mlp(demo_models):
    with OnnxRuntimeEngine(demo_models["digits-mlp"]) as engine:
        yield engine


def fire(batcher, rows, barrier=None):
    results = [None] * len(rows)

    def one(i):
        if barrier:
            barrier.wait()
        results[i] = batcher.submit({"input": rows[i : i + 1]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_32_concurrent_requests_run_in_fewer_batches_with_identical_outputs(mlp, digits_test):
    X = digits_test[0][:32]
    batcher = DynamicBatcher(mlp.infer, BatchingOptions(max_batch=64, max_queue_delay_us=20_000), slots=2)
    try:
        results = fire(batcher, X, threading.Barrier(32))
    finally:
        batcher.close()
    assert batcher.stats.success == 32 and batcher.stats.inference_count == 32
    assert batcher.stats.exec_count < 32, batcher.stats
    assert max(batcher.stats.batch_sizes) > 1
    for i, out in enumerate(results):
        alone = mlp.infer({"input": X[i : i + 1]})
        np.testing.assert_array_equal(out["label"], alone["label"])
        np.testing.assert_array_equal(out["probabilities"], alone["probabilities"])  # bitwise


def test_batches_never_exceed_max_batch(mlp, digits_test):
    batcher = DynamicBatcher(mlp.infer, BatchingOptions(max_batch=4, max_queue_delay_us=50_000), slots=1)
    try:
        fire(batcher, digits_test[0][:20], threading.Barrier(20))
    finally:
        batcher.close()
    assert max(batcher.stats.batch_sizes) <= 4 and batcher.stats.inference_count == 20


def test_preferred_batch_size_dispatches_early(mlp, digits_test):
    # with a 10 s delay only the preferred size (or max batch) can end a batch quickly
    batcher = DynamicBatcher(mlp.infer, BatchingOptions(max_batch=64, max_queue_delay_us=10_000_000, preferred_batch_sizes=(4,)), slots=1)
    try:
        fire(batcher, digits_test[0][:8], threading.Barrier(8))
    finally:
        batcher.close()
    assert batcher.stats.batch_sizes == {4: 2}


def test_a_failing_batch_fails_each_request_and_the_batcher_goes_on(mlp, digits_test):
    calls = []

    def flaky(feeds):
        calls.append(len(feeds["input"]))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return mlp.infer(feeds)

    batcher = DynamicBatcher(flaky, BatchingOptions(max_batch=8, max_queue_delay_us=0), slots=1)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            batcher.submit({"input": digits_test[0][:1]})
        assert batcher.submit({"input": digits_test[0][:1]})["label"].shape == (1,)
    finally:
        batcher.close()
    assert batcher.stats.failure == 1 and batcher.stats.success == 1


def test_worker_batches_concurrent_requests(tmp_path, demo_models, digits_test):
    from cluster.buildfarm import build_locally, local_target
    from cluster.repository import Repository
    from workers.build import BuildRequest
    from workers.manifest import sha256_file

    repo = Repository(tmp_path)
    art = build_locally(repo, BuildRequest(str(demo_models["digits-mlp"]), "m", local_target()), sha256_file(demo_models["digits-mlp"])).artifact
    worker = FleetWorker(WorkerSpec("w", slots=2))
    worker.load(art.manifest, repo.object_source(art.manifest), LoadOptions(max_queue_delay_us=20_000))
    key = art.manifest.engine_key
    X = digits_test[0][:32]
    barrier = threading.Barrier(32)
    out = [None] * 32

    def one(i):
        barrier.wait()
        out[i] = worker.infer("m", InferRequest({"input": X[i : i + 1]})).outputs["label"][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = worker.runner.engine_stats()[key]
    assert stats["batching"] and stats["success"] == 32 and stats["exec_count"] < 32
    assert out == list(worker.infer("m", InferRequest({"input": X})).outputs["label"])
    worker.shutdown()


def test_slots_bound_the_runs_at_once_and_a_cancelled_request_costs_no_slot(mlp, digits_test):
    """``slots`` runs at most at once, and all of them used; a request whose caller cancelled its future
    before the answer leaves its slot serving: afterwards two runs still meet at once (the engine here is
    the real one, gated)."""
    running, peak, lock, gate = [0], [0], threading.Lock(), threading.Event()
    both = threading.Barrier(2, timeout=10)  # passed only by two runs at the same time
    meet = [False]

    def run(feeds, out=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(10)
        if meet[0]:
            both.wait()
        try:
            return mlp.run(feeds, out)
        finally:
            with lock:
                running[0] -= 1

    X = digits_test[0][:64].astype(np.float32)
    batcher = DynamicBatcher(run, BatchingOptions(max_batch=8, max_queue_delay_us=0), slots=2)
    try:
        futures = [batcher.submit_nowait({"input": X[i:i + 8]}) for i in range(0, 64, 8)]  # 8 full batches
        cancelled = futures[-1].cancel()  # still queued behind the gate: its caller gave up
        threading.Timer(0.2, gate.set).start()
        outputs = [f.result(timeout=10) for f in futures[:-1]]
        for _ in range(1000):  # the cancelled request's batch runs too (and is not answered)
            if batcher.stats.exec_count == 8:
                break
            threading.Event().wait(0.01)
        meet[0] = True
        later = [batcher.submit_nowait({"input": X[i:i + 8]}) for i in (0, 8)]
        later = [f.result(timeout=20) for f in later]  # both slots still serve
    finally:
        batcher.close()
    assert cancelled and peak[0] == 2
    expected = mlp.run({"input": X})["label"]
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in outputs]), expected[:56])
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in later]), expected[:16])
    assert not any(t.is_alive() for t in batcher._runners)  # close() ended every slot's thread


def test_a_request_done_leaves_no_reference_to_its_inputs_in_the_batcher():
    """A binary HTTP body is read into a buffer that its inputs then view; the worker reads the next body
    into the same buffer once nothing views it (workers/httpwire.py). A slot or the collector keeping its
    last batch while it waits would keep every such buffer from being used again."""
    import time

    from workers.httpwire import _unviewed

    batcher = DynamicBatcher(lambda feeds: {"y": feeds["x"] * 2}, BatchingOptions(max_batch=8), slots=2)
    try:
        for _ in range(3):
            body = bytearray(4 * 4 * 8)
            feeds = {"x": np.frombuffer(body, np.float32).reshape(4, 8)}
            assert batcher.submit(feeds)["y"].shape == (4, 8)
            del feeds
            deadline = time.monotonic() + 5
            while not _unviewed(body) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _unviewed(body)
    finally:
        batcher.close()

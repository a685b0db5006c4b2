"""Batch inference on the simulated fleet: sharing by architecture, lost workers, resume."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import ray

from cluster.batch import TMP_GLOB, BatchJob, run_job
from cluster.batch_io import MAX_PART_ROWS
from cluster.buildfarm import build_on_fleet
from cluster.names import CONTROLLER_NAME, NAMESPACE
from tests.integration.fleet_fixtures import (
    digits_rows,
    read_parts,
    running_fleet,
    simulated_cluster,
    worker_handles,
    write_parquet_rows,
)
from workers.errors import InvalidInput, ModelNotFound, NotReady

pytestmark = pytest.mark.integration
ROWS = 20_000


@pytest.fixture(scope="module")
def sim(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("batch-sim")
    with simulated_cluster("configs/hetero-sim.yaml") as cluster:
        with running_fleet("configs/hetero-sim.yaml", work / "repo", cluster_address=cluster.address) as (cfg, url):
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            build_on_fleet(controller, demo_models["digits-mlp"], model="digits-t4-v100",
                           targets="T4,V100", max_batch=256)
            X = digits_rows(ROWS)
            data = write_parquet_rows(work / "rows.parquet", X)
            expected = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})[0]
            yield {"work": work, "controller": controller, "address": cluster.address, "data": data, "expected": expected,
                   "repo_root": cfg.repository}


def check_exactly_once(out, expected):
    assert not list(out.glob(TMP_GLOB)), "a half-written part was left behind"
    row_ids, labels = read_parts(out)
    assert len(row_ids) == len(expected)
    assert np.array_equal(np.sort(row_ids), np.arange(len(expected)))  # each row once
    order = np.argsort(row_ids)
    np.testing.assert_array_equal(labels[order], expected)


def test_t4_and_v100_share_the_rows_and_the_p4_gets_none(sim):
    out = sim["work"] / "out-share"
    summary = run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out), batch_size=1000), sim["controller"])
    check_exactly_once(out, sim["expected"])
    by_device = {}
    for worker, rows in summary.rows_per_worker.items():
        by_device[summary.devices[worker].split(" (")[0]] = by_device.get(summary.devices[worker].split(" (")[0], 0) + rows
    assert by_device.get("Tesla T4", 0) > 0 and by_device.get("Tesla V100-SXM2-16GB", 0) > 0
    assert "Tesla P4" not in by_device
    assert summary.rows_written == ROWS and sum(summary.rows_per_worker.values()) == ROWS


def test_killing_a_worker_during_the_job_loses_no_row(sim):
    out = sim["work"] / "out-kill"
    handles = worker_handles(sim["controller"])

    def killer():
        deadline = time.monotonic() + 60
        while len(list(out.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        ray.kill(handles["t4-node-gpu0"], no_restart=True)

    t = threading.Thread(target=killer)
    t.start()
    summary = run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out), batch_size=500), sim["controller"])
    t.join()
    check_exactly_once(out, sim["expected"])
    assert summary.rows_written == ROWS


def test_interrupted_job_resumes_without_duplicates(sim):
    out = sim["work"] / "out-resume"
    env = dict(os.environ, RAY_ADDRESS=sim["address"])
    cmd = [sys.executable, "-m", "cluster.batch", "--model", "digits-t4-v100", "--input", str(sim["data"]),
           "--output", str(out), "--batch-size", "250"]
    log = open(sim["work"] / "resume.log", "w")  # a file, not a pipe: Ray Data logs a lot
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, (sim["work"] / "resume.log").read_text()[-3000:]
    proc.kill()  # interrupted mid-job
    proc.wait()
    log.close()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 0 < done_before < ROWS // 250
    (out / ".part-00077.12345.tmp").write_bytes(b"half a part, from a run that was killed while writing")
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_before} of {ROWS // 250} parts already done" in rerun.stderr
    check_exactly_once(out, sim["expected"])


def test_clear_early_failures(sim, tmp_path):
    with pytest.raises(ModelNotFound):
        run_job(BatchJob("no-such-model", str(sim["data"]), str(tmp_path / "a")), sim["controller"])
    with pytest.raises(InvalidInput, match="input 'input' has no column"):
        bad = write_parquet_rows(tmp_path / "bad.parquet", digits_rows(10), column="pixels")
        write_parquet_rows(tmp_path / "two.parquet", digits_rows(10))
        import pyarrow.parquet as pq
        import pyarrow as pa

        t = pq.read_table(bad)
        pq.write_table(t.append_column("other", pa.array(range(10))), bad)
        run_job(BatchJob("digits-t4-v100", str(bad), str(tmp_path / "b")), sim["controller"])
    with pytest.raises(InvalidInput, match=r"rows of shape \[32\], input 'input' needs \[64\]"):
        narrow = write_parquet_rows(tmp_path / "narrow.parquet", digits_rows(10)[:, :32])
        run_job(BatchJob("digits-t4-v100", str(narrow), str(tmp_path / "c")), sim["controller"])
    assert not list((tmp_path / "c").glob("part-*"))


def after_parts(out, n, action):
    """Run ``action`` in a thread once ``n`` parts of the job are written (the job is under way)."""

    def wait_then_act():
        deadline = time.monotonic() + 60
        while len(list(out.glob("part-*.parquet"))) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait_then_act)
    thread.start()
    return thread


def test_a_part_whose_engine_was_evicted_is_retried_and_no_row_is_lost(sim):
    """An eviction (another model needed the budget) under a running job: the worker says the engine
    is not there any more, the part goes again, the fleet loads the model again where it fits."""
    out = sim["work"] / "out-evict"
    placement = ray.get(sim["controller"].ensure_loaded.remote("digits-t4-v100"))
    key = placement.engines["v100-node-gpu0"]  # it fits everywhere: every compatible worker holds it
    v100 = worker_handles(sim["controller"])["v100-node-gpu0"]
    # Small parts (200): the job is still sending when the eviction comes, so parts reach the V100 after
    # it (with 40 parts the whole job took 0.3 s, and at times ended before the watcher saw 3 parts).
    thread = after_parts(out, 1, lambda: ray.get(v100.unload.remote(key)))
    summary = run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out), batch_size=100), sim["controller"])
    thread.join()
    check_exactly_once(out, sim["expected"])
    assert summary.rows_written == ROWS and summary.retries >= 1  # the eviction did hit parts in flight


def test_a_job_gives_up_after_its_retry_limit_with_a_clear_error(sim):
    out = sim["work"] / "out-give-up"
    thread = after_parts(out, 2, lambda: ray.kill(worker_handles(sim["controller"])["t4-node-gpu1"], no_restart=True))
    with pytest.raises(NotReady, match=r"failed 1 times, the last on worker t4-node-gpu1: .*giving up \(--max-retries 0\)"):
        run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out), batch_size=250, max_retries=0), sim["controller"])
    thread.join()
    assert not list(out.glob(TMP_GLOB))
    # the parts written stay; a rerun (retries allowed, no part size given: its first run's) finishes the job
    # with every row once
    summary = run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out)), sim["controller"])
    check_exactly_once(out, sim["expected"])
    assert summary.parts == ROWS // 250 and summary.parts_skipped >= 2
    assert json.loads((out / "_job.json").read_text())["batch_size"] == 250


def test_a_job_not_told_its_part_size_sizes_parts_by_the_models_tensors(sim):
    """digits-mlp's rows are 64 floats in and 10 out: parts of 128 MB would hold 450,000 of them; at most 65,536."""
    out = sim["work"] / "out-sized"
    summary = run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out)), sim["controller"])
    check_exactly_once(out, sim["expected"])
    assert json.loads((out / "_job.json").read_text())["batch_size"] == MAX_PART_ROWS
    assert summary.parts == 1 and len(list(out.glob("part-*.parquet"))) == 1


def test_another_job_into_the_same_output_is_refused(sim):
    out = sim["work"] / "out-share"  # written by the first test of this module
    assert (out / "_job.json").exists()
    with pytest.raises(InvalidInput, match="holds parts of a different job"):
        run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out), batch_size=777), sim["controller"])
    other = write_parquet_rows(sim["work"] / "other.parquet", digits_rows(10))
    with pytest.raises(InvalidInput, match="holds parts of a different job"):
        run_job(BatchJob("digits-t4-v100", str(other), str(out), batch_size=1000), sim["controller"])
    check_exactly_once(out, sim["expected"])  # and nothing of the first job was touched


def test_a_job_whose_only_worker_is_killed_waits_for_its_replacement_and_finishes(sim, demo_models):
    """Only the P4 can run this build; it is killed mid-job (a CUDA fault, an OOM kill). The job
    waits, bounded and saying so, for the controller's replacement, then finishes every row once."""
    build_on_fleet(sim["controller"], demo_models["digits-mlp"], model="digits-p4",
                   targets="P4", max_batch=256)
    out = sim["work"] / "out-only-worker"
    thread = after_parts(out, 3, lambda: ray.kill(worker_handles(sim["controller"])["p4-node-gpu0"], no_restart=True))
    summary = run_job(BatchJob("digits-p4", str(sim["data"]), str(out), batch_size=500), sim["controller"])
    thread.join()
    check_exactly_once(out, sim["expected"])
    assert summary.retries >= 1 and set(summary.rows_per_worker) == {"p4-node-gpu0"}


def test_a_job_goes_on_when_every_worker_of_a_host_is_killed(sim):
    """Both T4s (one host) are killed mid-job: the V100 takes the rest, the T4s come back, no row is lost."""
    out = sim["work"] / "out-host"

    def kill_the_t4_host():
        handles = worker_handles(sim["controller"])
        for worker in ("t4-node-gpu0", "t4-node-gpu1"):
            ray.kill(handles[worker], no_restart=True)

    thread = after_parts(out, 3, kill_the_t4_host)
    summary = run_job(BatchJob("digits-t4-v100", str(sim["data"]), str(out), batch_size=250), sim["controller"])
    thread.join()
    check_exactly_once(out, sim["expected"])
    assert summary.retries >= 1 and summary.rows_per_worker["v100-node-gpu0"] > 0

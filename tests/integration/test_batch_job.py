"""Batch inference submitted with the real `ray job submit` CLI to a head with its dashboard on 127.0.0.1."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.integration.fleet_fixtures import checkout_env, digits_rows, free_port, read_parts, write_parquet_rows

pytestmark = pytest.mark.integration
ROWS = 20_000
FLEET = [sys.executable, "-m", "cluster.cli"]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("job")
    dashboard, ray_port = free_port(), free_port()
    config = work / "fleet.yaml"
    config.write_text(f"name: job-test\nrepository: {work / 'repo'}\nport: {free_port()}\nray_port: {ray_port}\n"
                      f"dashboard_port: {dashboard}\ncpu_budget: 2GiB\n")
    env = checkout_env(RAY_ADDRESS=f"127.0.0.1:{ray_port}")  # this fleet's Ray, whatever else runs here
    up = subprocess.run(FLEET + ["up", "--config", str(config), "--demo"], cwd=work, capture_output=True, text=True,
                        timeout=300, env=checkout_env())
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield work, config, f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run(FLEET + ["down"], cwd=work, capture_output=True, timeout=120, env=env)


def test_ray_job_submit_scores_rows_like_onnxruntime(fleet):
    work, _, dashboard, env = fleet
    X = digits_rows(ROWS)
    data = write_parquet_rows(work / "digits.parquet", X)
    out = work / "out"
    job = subprocess.run(
        [RAY, "job", "submit", "--address", dashboard, "--", sys.executable, "-m", "cluster.batch",
         "--model", "digits-mlp", "--input", str(data), "--output", str(out), "--batch-size", "4096"],
        cwd=work, capture_output=True, text=True, timeout=600, env=env,
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert f"rows: {ROWS}" in job.stdout + job.stderr  # the job's summary, streamed back
    # this fleet does not allow system shared memory: the job says so, and its parts take Ray's object store
    assert "shared memory unusable (system shared memory is off on this fleet" in job.stdout + job.stderr
    assert "timeline: first part sent" in job.stdout + job.stderr  # no regions were made: none were ready
    row_ids, labels = read_parts(out)
    order = np.argsort(row_ids)
    assert np.array_equal(row_ids[order], np.arange(ROWS))
    expected = ort.InferenceSession(str(work / "models" / "digits-mlp.onnx")).run(None, {"input": X})[0]
    np.testing.assert_array_equal(labels[order], expected)


def test_fleet_batch_and_jobs_wrap_the_ray_cli(fleet):
    work, config, _, env = fleet
    data = write_parquet_rows(work / "small.parquet", digits_rows(1000))
    result = subprocess.run(FLEET + ["batch", "--config", str(config), "--model", "digits-mlp", "--input", str(data),
                                     "--output", str(work / "small-out"), "--batch-size", "300", "--output-tensors", "bytes",
                                     "--shared-memory", "off", "--in-flight", "2", "--progress-every", "0.001"],
                            cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert len(list((work / "small-out").glob("part-*.parquet"))) == 4
    assert "--output-tensors bytes --shared-memory off --in-flight 2 --progress-every 0.001" in result.stdout + result.stderr
    assert re.search(r"  [\d,]+ of 1,000 rows \(\d+ %\) in \d+ s, [\d,]+ rows/s", result.stdout + result.stderr)  # progress
    assert "parts through Ray's object store, output tensors as bytes" in result.stdout + result.stderr
    jobs = subprocess.run(FLEET + ["jobs", "--config", str(config)], cwd=work, capture_output=True, text=True, timeout=60,
                          env=env)
    assert jobs.returncode == 0 and "SUCCEEDED" in jobs.stdout


def test_unknown_model_fails_the_job_early(fleet):
    work, config, _, env = fleet
    data = write_parquet_rows(work / "tiny.parquet", digits_rows(10))
    result = subprocess.run(FLEET + ["batch", "--config", str(config), "--model", "no-such-model", "--input", str(data),
                                     "--output", str(work / "none")],
                            cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "model 'no-such-model' is not in the repository" in result.stdout + result.stderr
    assert not (work / "none").exists()

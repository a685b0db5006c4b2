"""The repository on an S3 endpoint (moto's server, over HTTP, through pyarrow's real S3 client):
build -> serve -> batch on the simulated fleet, a corrupted object refused and reported, and the
endpoint stopped mid-run (what is loaded keeps serving; a new load is a clear 503)."""

import os
import subprocess
import sys
import time
import uuid

import numpy as np
import onnxruntime as ort
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import requests

from cluster.batch import BatchJob, run_job
from cluster.buildfarm import build_on_fleet
from cluster.client import FleetClient
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.repository import Repository
from tests.integration.fleet_fixtures import (
    checkout_env,
    digits_rows,
    distinct_model,
    running_fleet,
    simulated_cluster,
    worker_handles,
    write_parquet_rows,
)
from tests.moto_server import KEY, moto_s3
from workers.errors import ArtifactCorrupt, RepositoryUnavailable

pytestmark = pytest.mark.integration
BUCKET = "fleet-s3"
ROWS = 3000
X = np.zeros((1, 64), np.float32)


@pytest.fixture(scope="module")
def s3_env():
    """Credentials for what reads URIs without a config (Ray Data, the batch job): the usual variables,
    set before Ray starts so that every Ray process has them."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY, AWS_EC2_METADATA_DISABLED="true")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_models, s3_env):
    work = tmp_path_factory.mktemp("s3")
    with moto_s3(BUCKET) as s3:
        with simulated_cluster("configs/hetero-sim.yaml") as cluster:
            with running_fleet("configs/hetero-sim.yaml", f"s3://{BUCKET}/repo", cluster_address=cluster.address,
                               storage=s3.storage_config()) as (cfg, url):
                controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
                yield {"s3": s3, "url": url, "controller": controller, "work": work, "config": cfg,
                       "repo": Repository(cfg.store_spec())}


def bucket_files(s3, prefix: str) -> list[str]:
    infos = s3.fs().get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(f"{BUCKET}/") for i in infos if i.type == pafs.FileType.File)


def test_build_serve_batch_with_the_repository_on_s3(fleet, demo_models):
    s3, controller = fleet["s3"], fleet["controller"]
    # bytes of its own: an artifact no host has cached from another test, so the workers must fetch it
    source = distinct_model(demo_models["digits-mlp"], fleet["work"] / "digits-s3.onnx", f"s3 {uuid.uuid4()}")
    outcomes = build_on_fleet(controller, source, model="digits-s3", targets="T4,V100", max_batch=256)
    assert len(outcomes) == 2 and all(o.ok for o in outcomes), [o.error for o in outcomes]
    stored = bucket_files(s3, "repo/digits-s3")
    assert len([f for f in stored if f.endswith("/manifest.json")]) == 2
    assert len([f for f in stored if f.endswith("/model.onnx")]) == 2  # each under its sha256
    assert all(o.artifact.location.startswith(f"s3://{BUCKET}/repo/digits-s3/") for o in outcomes)

    X_rows = digits_rows(ROWS)
    expected = ort.InferenceSession(str(source)).run(None, {"input": X_rows})[0]
    with FleetClient(fleet["url"]) as client:
        np.testing.assert_array_equal(client.infer("digits-s3", {"input": X_rows[:8]})["label"], expected[:8])
    fetched = [ray.get(h.stats.remote())["artifact_cache"] for h in worker_handles(controller).values()]
    assert sum(c["fills"] for c in fetched) >= 1 and sum(c["fill_bytes"] for c in fetched) > 0

    # batch: input and output in the bucket, read and written through the same S3 client
    local = write_parquet_rows(fleet["work"] / "rows.parquet", X_rows)
    pafs.copy_files(str(local), f"{BUCKET}/in/rows.parquet", destination_filesystem=s3.fs())
    job = BatchJob("digits-s3", s3.uri(f"{BUCKET}/in/rows.parquet"), s3.uri(f"{BUCKET}/out"), batch_size=500)
    summary = run_job(job, controller)
    assert summary.rows_written == ROWS and summary.parts == 6
    parts = [p for p in bucket_files(s3, "out") if p.rsplit("/", 1)[-1].startswith("part-")]
    assert len(parts) == 6 and "out/_summary.json" in bucket_files(s3, "out")
    tables = [pq.read_table(f"{BUCKET}/{p}", filesystem=s3.fs()) for p in parts]
    row_ids = np.concatenate([t["row_id"].to_numpy() for t in tables])
    labels = np.concatenate([t["label"].to_numpy() for t in tables])
    assert np.array_equal(np.sort(row_ids), np.arange(ROWS))
    np.testing.assert_array_equal(labels[np.argsort(row_ids)], expected)
    again = run_job(job, controller)  # a rerun resumes: every part is there already
    assert again.parts_skipped == 6 and again.rows_written == 0


def test_a_corrupted_object_in_the_bucket_is_refused_and_reported(fleet, demo_models):
    s3 = fleet["s3"]
    source = distinct_model(demo_models["digits-mlp"], fleet["work"] / "fragile.onnx", f"fragile-s3 {uuid.uuid4()}")  # in no cache
    (outcome,) = build_on_fleet(fleet["controller"], source, model="fragile-s3", targets="V100")
    assert outcome.ok, outcome.error
    key = f"{BUCKET}/repo/{outcome.artifact.key}"
    fs = s3.fs()
    with fs.open_input_stream(key) as f:
        data = f.read()
    with fs.open_output_stream(key) as f:  # bit rot in the bucket: same size, other bytes
        f.write(data[:300] + b"\x00bitrot\x00" + data[308:])
    with FleetClient(fleet["url"]) as client:
        with pytest.raises(ArtifactCorrupt, match=rf"s3://{BUCKET}/repo/fragile-s3/.* is corrupt: sha256 .* \(fetched 2 "
                                                  r"times\); rebuild it with `fleet build`"):
            client.infer("fragile-s3", {"input": X})
        client.infer("digits-s3", {"input": X})  # the rest serves on
    events = requests.get(fleet["url"] + "/v2/fleet/status", timeout=30).json()["events"]
    assert any(e["event"] == "load-refused" and "fragile-s3" in e["reason"] and "corrupt" in e["reason"] for e in events)
    (problem,) = fleet["repo"].check("fragile-s3")
    assert "is corrupt" in problem and f"s3://{BUCKET}/repo/fragile-s3/" in problem


def test_fleet_up_names_an_unreachable_repository(tmp_path):
    t0 = time.monotonic()
    result = subprocess.run(  # --address of no Ray: were the check skipped, nothing would start anyway
        [sys.executable, "-m", "cluster.cli", "up", "--address", "127.0.0.1:9", "--repository",
         f"s3://{BUCKET}/r?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=checkout_env())
    assert result.returncode == 2, result.stderr
    assert "the repository cannot be used" in result.stderr and "127.0.0.1:9" in result.stderr
    assert "Could not connect" in result.stderr and "Ray's GCS" not in result.stderr  # checked before anything else
    assert time.monotonic() - t0 < 60


def test_endpoint_stopped_mid_run(fleet, demo_models):
    controller = fleet["controller"]
    later = distinct_model(demo_models["digits-mlp"], fleet["work"] / "later.onnx", "later-s3")
    (outcome,) = build_on_fleet(controller, later, model="later-s3", targets="T4")  # built, never loaded
    assert outcome.ok, outcome.error
    fleet["s3"].stop()
    with FleetClient(fleet["url"]) as client:
        for _ in range(10):  # what is loaded keeps serving
            client.infer("digits-s3", {"input": X})
        t0 = time.monotonic()
        with pytest.raises(RepositoryUnavailable, match=rf"later-s3.* could not be loaded: .*could not fetch the "
                                                        rf"artifact of later-s3 \(2 tries\).*s3://{BUCKET}/repo/later-s3"
                                                        r".*Could not connect") as info:
            client.infer("later-s3", {"input": X})
        assert info.value.http_status == 503 and time.monotonic() - t0 < 30
        client.infer("digits-s3", {"input": X})
    resp = requests.post(fleet["url"] + "/v2/models/later-s3/infer", timeout=60,
                         json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    assert resp.status_code == 503 and resp.headers["X-Fleet-Error"] == "RepositoryUnavailable"
    with pytest.raises(RepositoryUnavailable, match=rf"could not list s3://{BUCKET}/repo/newer.*Could not connect"):
        build_on_fleet(controller, demo_models["cnn-small"], model="newer", targets="T4")  # builds wait for it too
    assert requests.get(fleet["url"] + "/v2/fleet/status", timeout=30).status_code == 200

"""The batch job (``cluster.batch.run_job``, what ``ray job submit ... -m cluster.batch`` runs) on a fleet
that allows system shared memory: parts travel in regions of the job's process, tensors stored as bytes
come back as bytes, and nothing is left registered."""

import os

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from cluster.batch import BatchJob, run_job
from cluster.batch_io import InputRows
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.tensor_columns import bytes_column, bytes_field
from tests.integration.fleet_fixtures import digits_rows

pytestmark = pytest.mark.integration
ROWS = 5_000


@pytest.fixture(scope="module")
def fleet(shared_fleet):
    return shared_fleet


def test_parts_in_shared_memory_and_bytes_tensors_match_onnx_runtime(fleet, tmp_path):
    X = digits_rows(ROWS)
    data = tmp_path / "digits-bytes.parquet"
    pq.write_table(pa.Table.from_arrays([bytes_column(X)], schema=pa.schema([bytes_field("input", X)])), data,
                   row_group_size=1500)
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    summary = run_job(BatchJob("digits-mlp", str(data), str(tmp_path / "out"), batch_size=1000, shared_memory=True),
                      controller)
    assert summary.transport == "shared memory" and summary.rows_written == ROWS and summary.retries == 0
    # a region per part (5 parts, fewer than in flight), all made before the first part went out
    assert summary.regions["count"] == 5 and summary.timeline["regions ready"] <= summary.timeline["first sent"]
    # what the engines did meanwhile, from the fleet's statistics: every row, in runs of at most 256
    assert summary.workers["rows"] >= ROWS and summary.workers["runs"] >= ROWS / 256 and summary.workers["compute_s"] > 0

    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == 5
    schema = pq.read_schema(parts[0])
    assert schema.field("probabilities").type == pa.binary(40)  # 10 float32 a row, as bytes: the input's way
    assert schema.field("label").type == pa.int64()
    got = {name: [] for name in ("row_id", "label", "probabilities")}
    for part in parts:
        for _, _, batch in InputRows(str(part)).batches(1000, list(got)):
            for name in got:
                got[name].append(batch[name])
    got = {name: np.concatenate(arrays) for name, arrays in got.items()}
    order = np.argsort(got["row_id"])
    assert np.array_equal(got["row_id"][order], np.arange(ROWS))
    source = fleet["sources"]["digits-mlp"]
    label, probabilities = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(
        ["label", "probabilities"], {"input": X})
    np.testing.assert_array_equal(got["label"][order], label)
    np.testing.assert_allclose(got["probabilities"][order], probabilities, rtol=1e-5, atol=1e-6)

    regions = {r["name"] for r in ray.get(controller.shm_status.remote())}
    assert not {r for r in regions if r.startswith(f"ff_{os.getpid()}_")}, regions  # the job gave its regions back

"""The batch job's reader (cluster/batch_io.InputRows) on real files: parts cut across row groups and
files, every row once and in order, columns as contiguous arrays."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch_io import InputRows
from workers.errors import InvalidInput

X = np.arange(1000 * 6, dtype=np.float32).reshape(1000, 6)


def fixed(a: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def every_row(rows: InputRows, batch_size: int, column: str) -> np.ndarray:
    parts = list(rows.batches(batch_size, [column]))
    assert [i for i, _, _ in parts] == list(range(len(parts)))
    assert [s for _, s, _ in parts] == [i * batch_size for i in range(len(parts))]
    assert all(len(b[column]) == batch_size for _, _, b in parts[:-1])
    return np.concatenate([b[column] for _, _, b in parts])


def test_parquet_directory_cut_into_parts_across_row_groups_and_files(tmp_path):
    for i, chunk in enumerate((X[:450], X[450:])):
        pq.write_table(pa.table({"input": fixed(chunk), "label": np.arange(len(chunk))}), tmp_path / f"r{i}.parquet",
                       row_group_size=100)
    rows = InputRows(str(tmp_path))
    assert rows.columns == ["input", "label"] and rows.rows == 1000
    got = every_row(rows, 256, "input")
    assert got.dtype == np.float32 and got.shape == (1000, 6)
    np.testing.assert_array_equal(got, X)
    for _, _, batch in rows.batches(256, ["input"]):
        assert batch["input"].flags.c_contiguous


def test_parts_done_already_are_not_converted(tmp_path):
    pq.write_table(pa.table({"input": fixed(X)}), tmp_path / "r.parquet")
    parts = list(InputRows(str(tmp_path / "r.parquet")).batches(300, ["input"], wanted=lambda i: i != 1))
    assert [(i, s, b is None) for i, s, b in parts] == [(0, 0, False), (1, 300, True), (2, 600, False), (3, 900, False)]


def test_list_columns_of_equal_length_and_nested_fixed_lists(tmp_path):
    pq.write_table(pa.table({"x": pa.array([list(r) for r in X])}), tmp_path / "l.parquet")
    np.testing.assert_array_equal(every_row(InputRows(str(tmp_path / "l.parquet")), 400, "x"), X)
    nested = pa.FixedSizeListArray.from_arrays(fixed(X.reshape(-1, 3)), 2)
    pq.write_table(pa.table({"x": nested}), tmp_path / "n.parquet")
    np.testing.assert_array_equal(every_row(InputRows(str(tmp_path / "n.parquet")), 400, "x"), X.reshape(1000, 2, 3))


def test_ragged_rows_stay_rows_and_nulls_are_refused(tmp_path):
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    (_, _, batch), = InputRows(str(tmp_path / "ragged.parquet")).batches(10, ["x"])
    assert batch["x"].dtype == object and len(batch["x"]) == 2  # the job names the column and the input
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], None])}), tmp_path / "nulls.parquet")
    with pytest.raises(InvalidInput, match="column 'x' has 1 null rows"):
        list(InputRows(str(tmp_path / "nulls.parquet")).batches(10, ["x"]))


def test_npy_directory_and_npz(tmp_path):
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", X[:500])
    np.save(tmp_path / "npy" / "b.npy", X[500:])
    rows = InputRows(str(tmp_path / "npy"))
    assert rows.columns == ["data"] and rows.rows == 1000
    np.testing.assert_array_equal(every_row(rows, 300, "data"), X)
    np.savez(tmp_path / "z.npz", input=X, other=X[:, 0])
    rows = InputRows(str(tmp_path / "z.npz"))
    assert rows.columns == ["input", "other"] and rows.rows == 1000
    np.testing.assert_array_equal(every_row(rows, 300, "input"), X)


def test_a_reader_failure_reaches_the_job(tmp_path):
    np.savez(tmp_path / "z.npz", input=X)
    with pytest.raises(InvalidInput, match="has no array nope"):
        list(InputRows(str(tmp_path / "z.npz")).batches(300, ["nope"]))

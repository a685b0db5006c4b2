"""Tensors as Parquet bytes columns (cluster/tensor_columns.py) on real files: what the job reads back is
what was written, metadata or none, and a column that cannot be the model's input says why."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch_io import InputRows, PartsOutput
from cluster.tensor_columns import as_input, bytes_column, bytes_field, column_to_numpy, tensor_column
from workers.errors import InvalidInput
from workers.tensors import TensorSpec

X = np.arange(1000 * 6, dtype=np.float32).reshape(1000, 2, 3) / 7


def write_bytes(path, array, metadata=True, row_group=128):
    field = bytes_field("x", array) if metadata else pa.field("x", pa.binary(array[0].nbytes))
    pq.write_table(pa.Table.from_arrays([bytes_column(array)], schema=pa.schema([field])), path, row_group_size=row_group)
    return path


def every_part(path, batch_size=300):
    rows = InputRows(str(path))
    return rows, [batch["x"] for _, _, batch in rows.batches(batch_size, ["x"])]


def test_bytes_with_metadata_come_back_as_the_tensors_written_across_row_groups(tmp_path):
    rows, parts = every_part(write_bytes(tmp_path / "b.parquet", X))
    assert rows.bytes_columns == {"x"}
    got = np.concatenate(parts)
    assert got.dtype == np.float32 and got.shape == (1000, 2, 3)
    np.testing.assert_array_equal(got, X)
    assert all(p.flags.c_contiguous for p in parts)
    field = pq.read_schema(tmp_path / "b.parquet").field("x")
    assert field.metadata == {b"dtype": b"float32", b"shape": b"[2, 3]"} and not field.nullable


def test_bytes_without_metadata_take_the_inputs_dtype_and_shape(tmp_path):
    _, parts = every_part(write_bytes(tmp_path / "raw.parquet", X, metadata=False))
    raw = np.concatenate(parts)
    assert raw.dtype.kind == "V" and raw.dtype.itemsize == 24
    spec = TensorSpec("input", "FP32", (-1, 2, 3))
    np.testing.assert_array_equal(as_input(raw, spec, "x"), X)
    np.testing.assert_array_equal(as_input(raw, TensorSpec("input", "FP32", (-1, -1, 3)), "x"), X)  # one dynamic dim
    with pytest.raises(InvalidInput, match="24 bytes per row: not a FP32 row of shape \\[4, 3\\]"):
        as_input(raw, TensorSpec("input", "FP32", (-1, 4, 3)), "x")
    with pytest.raises(InvalidInput, match="24 bytes per row"):
        as_input(raw, TensorSpec("input", "FP32", (-1, -1, -1)), "x")


def test_bytes_metadata_is_checked_and_converted_like_lists(tmp_path):
    doubles = X.astype(np.float64)
    _, parts = every_part(write_bytes(tmp_path / "d.parquet", doubles))
    assert np.concatenate(parts).dtype == np.float64
    got = as_input(np.concatenate(parts), TensorSpec("input", "FP32", (-1, 2, 3)), "x")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, X)
    with pytest.raises(InvalidInput, match="holds float64, input 'input' needs INT64"):
        as_input(np.concatenate(parts), TensorSpec("input", "INT64", (-1, 2, 3)), "x")
    lying = pa.field("x", pa.binary(24), metadata={b"dtype": b"float32", b"shape": b"[4]"})
    with pytest.raises(InvalidInput, match="holds 24 bytes per row, not a float32 tensor of shape \\[4\\]"):
        column_to_numpy(bytes_column(X), "x", lying)


def test_a_slice_of_a_bytes_column_is_its_own_rows():
    column = bytes_column(X).slice(10, 5)
    np.testing.assert_array_equal(column_to_numpy(column, "x", bytes_field("x", X)), X[10:15])


def test_parts_written_as_bytes_read_back_with_the_reader(tmp_path):
    out = PartsOutput(str(tmp_path / "out"), tensors="bytes")
    out.prepare({"job": 1}, None)
    out.write_part(0, np.arange(100, dtype=np.int64), {"output": X[:100], "label": np.arange(100)})
    schema = pq.read_schema(tmp_path / "out" / "part-00000.parquet")
    assert schema.field("output").type == pa.binary(24) and schema.field("label").type == pa.int64()
    (_, _, batch), = InputRows(str(tmp_path / "out" / "part-00000.parquet")).batches(100, ["output", "label"])
    np.testing.assert_array_equal(batch["output"], X[:100])
    np.testing.assert_array_equal(batch["label"], np.arange(100))


def test_tensor_column_writes_either_encoding_and_reads_back_the_same_rows():
    for encoding, kind in (("bytes", pa.types.is_fixed_size_binary), ("lists", pa.types.is_fixed_size_list)):
        field, column = tensor_column("x", X, encoding)
        assert kind(field.type) and field.type == column.type
        np.testing.assert_array_equal(column_to_numpy(column, "x", field).reshape(X.shape), X)
    field, column = tensor_column("label", np.arange(5), "bytes")  # one value a row stays a plain column
    assert field.type == pa.int64() and column.to_pylist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="tensor encoding 'json': use one of lists, bytes"):
        tensor_column("x", X, "json")

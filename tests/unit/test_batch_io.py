"""The batch job's reader (cluster/batch_io.InputRows) on real files: parts cut across row groups and
files, every row once and in order, columns as contiguous arrays."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch_io import MAX_PART_ROWS, PART_BYTES, UNSIZED_PART_ROWS, InputRows, part_rows
from workers.errors import InvalidInput
from workers.tensors import TensorSpec

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


def write_groups(path, X, sizes) -> None:
    """One Parquet file whose row groups have the given sizes (a column of row ids next to the rows)."""
    assert sum(sizes) == len(X)
    schema = pa.schema([("input", pa.list_(pa.float32(), X.shape[1])), ("row", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        start = 0
        for n in sizes:
            writer.write_table(pa.table({"input": fixed(X[start:start + n]), "row": np.arange(start, start + n)}, schema=schema))
            start += n
    assert pq.ParquetFile(path).num_row_groups == len(sizes)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_row_groups_read_in_parallel_keep_file_order_and_resume(tmp_path, threads, monkeypatch):
    """Row groups smaller, larger and straddling the part size (256), read on several threads: every
    part holds its own rows; parts done already are skipped, and a row group under done parts only
    is not read at all."""
    sizes = [100, 300, 56, 3, 1, 140, 0, 300, 1, 1]
    sizes[-1] = 1000 - sum(sizes[:-1])
    write_groups(tmp_path / "g.parquet", X, sizes)
    write_groups(tmp_path / "h.parquet", X[:300], [300])  # a second file: row ids go on across files
    rows = InputRows(str(tmp_path))
    assert rows.rows == 1300
    read: list[int] = []

    class Recorded(pq.ParquetFile):
        def iter_batches(self, *args, row_groups=None, **kwargs):
            read.extend(row_groups)
            return super().iter_batches(*args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr("cluster.batch_io.pq.ParquetFile", Recorded)
    expected = np.concatenate([X, X[:300]])
    asked: list[int] = []

    def wanted(index: int) -> bool:
        asked.append(index)
        return index not in (1, 2, 3)  # rows 256..1023: done by an earlier run

    parts = list(rows.batches(256, ["input", "row"], wanted=wanted, threads=threads))
    assert asked == list(range(6))  # once each, in order
    assert [(i, s) for i, s, _ in parts] == [(i, 256 * i) for i in range(6)]
    assert [i for i, _, b in parts if b is None] == [1, 2, 3]
    assert sorted(read) == [0, 0, 1]  # g.parquet's groups 0 and 1 (rows 0..400), h.parquet's one; none of rows 400..1000
    for index, start, batch in parts:
        if batch is None:
            continue
        n = min(256, 1300 - start)
        np.testing.assert_array_equal(batch["input"], expected[start:start + n])
        assert batch["input"].flags.c_contiguous and batch["input"].shape == (n, 6)
        np.testing.assert_array_equal(batch["row"], np.arange(start, start + n) % 1000)


def test_a_reader_that_stops_early_releases_its_threads(tmp_path):
    import threading
    write_groups(tmp_path / "g.parquet", X, [100] * 10)
    before = set(threading.enumerate())  # (a thread of an earlier test may end meanwhile: compare who, not how many)
    parts = InputRows(str(tmp_path / "g.parquet")).batches(50, ["input"], threads=4, prefetch=1)
    _, _, first = next(parts)
    np.testing.assert_array_equal(first["input"], X[:50])
    started = [t for t in threading.enumerate() if t not in before]
    assert started  # the reader's threads, which close() must stop
    parts.close()
    import time
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in started if t.is_alive()]


def test_a_broken_row_group_fails_the_job_in_order(tmp_path):
    write_groups(tmp_path / "g.parquet", X, [400, 600])
    data = (tmp_path / "g.parquet").read_bytes()
    meta = pq.read_metadata(tmp_path / "g.parquet").row_group(1).column(0)
    at = meta.data_page_offset + 64
    (tmp_path / "g.parquet").write_bytes(data[:at] + bytes(4096) + data[at + 4096:])  # garbage in group 1's pages
    got = []
    with pytest.raises(Exception):
        for _, _, batch in InputRows(str(tmp_path / "g.parquet")).batches(200, ["input"], threads=3):
            got.append(batch["input"])
    assert len(got) >= 1  # the parts of row group 0 came first
    np.testing.assert_array_equal(np.concatenate(got)[:400], X[:400])


def test_a_part_is_plain_parquet_with_the_outputs_schema(tmp_path):
    from cluster.batch_io import PartsOutput
    out = PartsOutput(str(tmp_path / "out"))
    out.prepare({"job": 1}, None)
    out.write_part(3, np.arange(300, 400, dtype=np.int64), {"output": X[:100], "label": np.arange(100)})
    table = pq.read_table(tmp_path / "out" / "part-00003.parquet")
    assert table.schema == pa.schema([("row_id", pa.int64()), ("output", pa.list_(pa.float32(), 6)), ("label", pa.int64())])
    np.testing.assert_array_equal(table["row_id"].to_numpy(), np.arange(300, 400))
    np.testing.assert_array_equal(np.stack(table["output"].to_numpy(zero_copy_only=False)), X[:100])
    assert not list((tmp_path / "out").glob(".part-*"))


def test_the_parts_a_rerun_skips_are_those_there_when_it_began(tmp_path):
    from cluster.batch_io import PartsOutput
    first = PartsOutput(str(tmp_path / "out"))
    first.prepare({"job": 1}, None)
    first.write_part(0, np.arange(2), {"output": X[:2]})
    first.write_part(2, np.arange(4, 6), {"output": X[4:6]})
    (tmp_path / "out" / ".part-00001.123.tmp").write_bytes(b"half")  # a run killed mid-write
    rerun = PartsOutput(str(tmp_path / "out"))
    rerun.prepare({"job": 1}, rerun.recorded())
    assert [i for i in range(4) if rerun.has_part(i)] == [0, 2]
    rerun.write_part(1, np.arange(2, 4), {"output": X[2:4]})
    assert not rerun.has_part(1)  # written by this run: not one to skip (it is asked once, before)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_job.json", *(f"part-0000{i}.parquet" for i in range(3))]


def spec(name: str, shape: tuple[int, ...], datatype: str = "FP32") -> TensorSpec:
    return TensorSpec(name, datatype, shape)


def test_parts_are_sized_by_their_tensors_in_whole_batches_of_the_model():
    wide = [spec("x", (-1, 4096))]
    assert part_rows(wide, [spec("y", (-1, 4096))], max_batch=256) == 4096  # 32 KB a row, in and out: 128 MB
    assert part_rows(wide, [], max_batch=256) == 8192  # only the outputs the job writes count
    assert part_rows(wide, [spec("y", (-1, 4096))], max_batch=48) == 4080  # 4,096 rows, cut to whole runs of 48
    images = [spec("image", (-1, 3, 224, 224))]  # 602,112 bytes a row
    assert part_rows(images, [spec("logits", (-1, 1000))], max_batch=32) == 192  # 221 rows: six runs of 32
    assert part_rows(images, [], max_batch=256) == 256  # never less than one full run
    assert part_rows([spec("x", (-1, 64)), spec("mask", (-1, 64), "BOOL")], [spec("p", (-1, 10))], max_batch=64) == MAX_PART_ROWS
    assert part_rows(wide, [spec("y", (-1, 4096), "FP16")], max_batch=1) == PART_BYTES // (16384 + 8192)


def test_parts_of_rows_whose_size_only_the_data_knows_keep_the_old_default():
    assert part_rows([spec("text", (-1,), "BYTES")], [spec("y", (-1, 4))], max_batch=8) == UNSIZED_PART_ROWS
    assert part_rows([spec("tokens", (-1, -1), "INT64")], [], max_batch=8) == UNSIZED_PART_ROWS
    assert part_rows([spec("x", (8, 4))], [], max_batch=8) == UNSIZED_PART_ROWS  # no batch dimension
    assert part_rows([], [], max_batch=8) == UNSIZED_PART_ROWS
    # an output of unknown size (a dynamic dimension) is not in the region: it does not count
    assert part_rows([spec("x", (-1, 4096))], [spec("boxes", (-1, -1, 4))], max_batch=256) == 8192

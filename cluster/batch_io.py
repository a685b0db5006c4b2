"""A batch job's data: reading its input, writing its parts, on local paths or URIs.

Input and output may be a local path or any URI ``pyarrow.fs`` opens (``s3://bucket/in``,
with ``?endpoint_override=host:port&scheme=http&region=...`` for an S3-compatible
endpoint; credentials from the usual AWS environment variables): the input is read through
the same filesystem, and parts are written through it. A part appears whole or not at
all: in a directory it is written to a temporary name and renamed; on an object store it
is serialized first and sent as one object. A rerun finds the finished parts and skips them.
"""

from __future__ import annotations

import io
import json
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.errors import InvalidInput
from workers.storage import Store, StoreSpec

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
TMP_GLOB = ".part-*.tmp"


def open_location(where: str) -> Store:
    """A local path (made absolute) or a URI, as a ``Store`` rooted there."""
    return Store(StoreSpec(where if "://" in where else str(Path(where).resolve())))


def _input_files(store: Store, where: str) -> tuple[list[str], str]:
    """(paths inside the filesystem, the kind: .parquet, .npy or .npz) of a file or a directory of files."""
    with store.errors("read", ""):
        info = store.fs.get_file_info(store.path())
    if info.type == pafs.FileType.NotFound:
        raise InvalidInput(f"--input {where} does not exist")
    if info.type == pafs.FileType.File:
        paths = [store.path()]
    else:
        paths = [store.path(f.key) for f in store.list_files() if "/" not in f.key and not f.key.startswith((".", "_"))]
    kinds = {os.path.splitext(p)[1] for p in paths}
    if len(kinds) != 1 or not kinds <= {".parquet", ".npy", ".npz"}:
        raise InvalidInput(f"--input {where}: expected Parquet, .npy or .npz files (found {sorted(kinds) or 'nothing'})")
    return sorted(paths), kinds.pop()


class InputRows:
    """A job's input, read in the job's own process with pyarrow (Parquet) or numpy (.npy, .npz), in file order.

    Not Ray Data: every row passes through the job's process on its way to a worker anyway, and Ray
    Data's detour (read tasks -> object store -> the driver -> fixed-size lists as arrays of per-row
    arrays, stacked again) held a job over 16 KB rows near 3,000 rows/s on the CPU machine, where
    pyarrow alone reads them at ~25,000; its count() read every file once more."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.store = open_location(where)
        self.paths, self.kind = _input_files(self.store, where)
        with self.store.errors("read", ""):
            if self.kind == ".parquet":
                footers = [self._footer(p) for p in self.paths]
                schema = footers[0].schema.to_arrow_schema()
                if any(f.metadata and b"ARROW:extension:name" in f.metadata for f in schema):
                    import ray.data.extensions  # noqa: F401  (registers Ray Data's tensor columns, e.g. from write_parquet)
                self.columns = schema.names
                self.rows = sum(f.num_rows for f in footers)  # from the footers: no pass over the rows
            elif self.kind == ".npy":
                self.columns = ["data"]  # the name Ray Data gives it: --input-column data keeps working
                self.rows = sum(len(self._npy(p)) for p in self.paths)
            else:
                self.columns = list(self._npz(self.paths[0]))
                self.rows = sum(len(next(iter(self._npz(p).values()))) for p in self.paths)

    def _footer(self, path: str) -> pq.FileMetaData:
        with self.store.fs.open_input_file(path) as f:
            return pq.read_metadata(f)

    def _npy(self, path: str) -> np.ndarray:
        if self.store.spec.is_local:
            return np.load(path, mmap_mode="r")  # the header now, rows as they are sliced
        with self.store.fs.open_input_file(path) as f:
            return np.load(io.BytesIO(f.read()))

    def _npz(self, path: str) -> dict[str, np.ndarray]:
        with self.store.fs.open_input_file(path) as f, np.load(io.BytesIO(f.read())) as data:
            return {k: data[k] for k in data.files}

    def _chunks(self, columns: list[str], rows: int) -> Iterator[dict[str, np.ndarray]]:
        """The rows in file order, in chunks of at most ``rows`` (Parquet; .npy and .npz: whole files)."""
        for path in self.paths:
            with self.store.errors("read", ""):
                if self.kind == ".parquet":
                    for batch in pq.ParquetFile(self.store.fs.open_input_file(path)).iter_batches(batch_size=rows, columns=columns):
                        yield {name: column_to_numpy(batch.column(name), name) for name in columns}
                elif self.kind == ".npy":
                    yield {"data": self._npy(path)}
                else:
                    data = self._npz(path)
                    missing = [c for c in columns if c not in data]
                    if missing:
                        raise InvalidInput(f"--input {self.where}: {path} has no array {', '.join(missing)}")
                    yield {c: data[c] for c in columns}

    def batches(self, batch_size: int, columns: list[str], wanted: Callable[[int], bool] = lambda index: True,
                prefetch: int = 2) -> Generator[tuple[int, int, dict[str, np.ndarray] | None], None, None]:
        """(part index, its first row, column -> rows) for consecutive parts of ``batch_size`` rows (the
        last may be shorter); the arrays are None for a part not ``wanted`` (done already). Read on a
        thread, ``prefetch`` parts ahead: Parquet decoding releases the GIL, so it overlaps the dispatch."""
        def parts() -> Iterator[tuple[int, int, dict[str, np.ndarray] | None]]:
            pending: list[dict[str, np.ndarray]] = []
            have = index = start = 0
            chunks = self._chunks(columns, batch_size)
            while True:
                chunk = next(chunks, None)
                if chunk is not None:
                    n = len(chunk[columns[0]])
                    offset = 0
                    while offset < n:  # cut the chunk at part boundaries
                        take = min(batch_size - have, n - offset)
                        pending.append({c: a[offset:offset + take] for c, a in chunk.items()})
                        have, offset = have + take, offset + take
                        if have == batch_size:
                            yield index, start, _join(pending, columns) if wanted(index) else None
                            pending, have, index, start = [], 0, index + 1, start + batch_size
                elif have:
                    yield index, start, _join(pending, columns) if wanted(index) else None
                    return
                else:
                    return
        return _prefetched(parts(), prefetch)


def _join(pieces: list[dict[str, np.ndarray]], columns: list[str]) -> dict[str, np.ndarray]:
    """One contiguous array per column (a copy only when the part spans chunks, or is a memory-mapped slice)."""
    if len(pieces) == 1:
        return {c: np.ascontiguousarray(pieces[0][c]) for c in columns}
    return {c: np.concatenate([p[c] for p in pieces]) for c in columns}


def column_to_numpy(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """A Parquet column as numpy: fixed-size lists (any depth) and lists of equal length as one
    [rows, ...] array without a per-row step; lists of unequal length as an array of row arrays."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType):  # e.g. Ray Data's tensor columns
        return column.to_numpy(zero_copy_only=False)
    if column.null_count:
        raise InvalidInput(f"column '{name}' has {column.null_count} null rows")
    rows, shape, values = len(column), [], column
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
        else:
            lengths = np.diff(values.offsets.to_numpy())
            if len(lengths) and (lengths != lengths[0]).any():
                return column.to_numpy(zero_copy_only=False)  # ragged: the job names the column and the input
            width = int(lengths[0]) if len(lengths) else 0
        if values.null_count:
            raise InvalidInput(f"column '{name}' has null values")
        shape.append(width)
        values = values.flatten()
    if values.null_count:
        raise InvalidInput(f"column '{name}' has null values")
    return values.to_numpy(zero_copy_only=False).reshape([rows, *shape])


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Generator:
    """``items`` produced on a thread, up to ``depth`` ahead; its exception raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer)
            q.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


# No dictionary (model outputs rarely repeat) and lz4: a 64 MB part took ~1 s with Parquet's
# defaults, which made the writer, not the GPUs, a job's limit.
# Statistics (min/max per page) only for row_id, which readers filter on: over a model's outputs
# they were a pass over every value that no reader uses (14% of a part's write time, 4,096 x 4,096 floats).
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "lz4", "write_statistics": ["row_id"]}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def encode_part(row_ids: np.ndarray, outputs: dict[str, np.ndarray]) -> pa.Table:
    columns = {"row_id": pa.array(row_ids, type=pa.int64())}
    for name, array in outputs.items():
        if array.ndim == 1:
            columns[name] = pa.array(array)
        else:
            width = int(np.prod(array.shape[1:]))
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), width)
    return pa.table(columns)


class PartsOutput:
    """Where a job's parts go: a local directory or a URI."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.store = open_location(where)
        self.local = self.store.spec.is_local

    @property
    def directory(self) -> Path:
        return Path(self.store.path())

    def has_part(self, index: int) -> bool:
        return self.store.size(part_name(index)) is not None

    def write_part(self, index: int, row_ids: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Write one part atomically: it is there whole or not at all."""
        table = encode_part(row_ids, outputs)
        if not self.local:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, **PARQUET_OPTIONS)
            self.store.write_bytes(part_name(index), sink.getvalue().to_pybytes())  # one object, whole
            return
        tmp = self.directory / f".part-{index:05d}.{os.getpid()}.tmp"
        try:
            pq.write_table(table, tmp, **PARQUET_OPTIONS)
            os.replace(tmp, self.directory / part_name(index))
        finally:
            tmp.unlink(missing_ok=True)

    def prepare(self, record: dict) -> None:
        """Create the output, refuse one holding another job's parts, clear half-written parts."""
        if self.local:
            self.directory.mkdir(parents=True, exist_ok=True)
        try:
            previous = json.loads(self.store.read_bytes(JOB_FILE))
        except FileNotFoundError:
            self.store.write_bytes(JOB_FILE, json.dumps(record, indent=2).encode())
        else:
            if previous != record:
                raise InvalidInput(f"--output {self.where} holds parts of a different job ({previous}); "
                                   f"use another directory or remove it")
        if self.local:
            for stale in self.directory.glob(TMP_GLOB):  # half-written by a run that was killed: never a part
                stale.unlink(missing_ok=True)

    def write_summary(self, summary: dict) -> None:
        self.store.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())

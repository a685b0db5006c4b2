"""A batch job's data: reading its input, writing its parts, on local paths or URIs.

Input and output may be a local path or any URI ``pyarrow.fs`` opens (``s3://bucket/in``,
with ``?endpoint_override=host:port&scheme=http&region=...`` for an S3-compatible
endpoint; credentials from the usual AWS environment variables): the input is read through
the same filesystem, and parts are written through it. A part appears whole or not at
all: in a directory it is written to a temporary name and renamed; on an object store it
is serialized first and sent as one object. A rerun finds the finished parts and skips them.

Both directions scale with the cores the process may use (``io_threads``): Parquet row groups are
decoded on a pool of threads, several at once, and parts are encoded on as many (the job's writer
pool); pyarrow releases the GIL for both. On the CPU machine one thread decodes ~45,000 and encodes
~35,000 rows of 4,096 float32 a second, so a GPU host scoring 300,000 such rows/s needs about 8 of each.
"""

from __future__ import annotations

import io
import json
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.cpus import usable_cpus
from workers.errors import InvalidInput
from workers.storage import Store, StoreSpec
from workers.tensors import TensorSpec, batch_shape

from cluster.tensor_columns import column_to_numpy, tensor_column

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
TMP_GLOB = ".part-*.tmp"
# Rows per part where the job is not told (``part_rows``). A part's tensors, in and out, are its shared
# memory region, which a GPU worker page-locks as the job starts (about 0.3 ms a MB on an H200 host), so
# a large part holds the first part back; and each part costs the job's own threads a few ms (read,
# convert, send, write), so a small part caps the job's parts per second. On an H200, 2M rows of the big
# MLP (32 KB a row in and out, 8 in flight): parts of 32 MB ran 0.65x bare (the job waited on its own
# input), of 128 MB 0.92x (16 regions ready in 0.8 s), of 256 MB 0.82x (1.6 s); docs/gpu-results.md.
# Parts of 4,096 rows of 256 bytes (1 MB) ran at two thirds the rate of parts of 16,384 rows or more.
PART_BYTES = 128 << 20
MAX_PART_ROWS = 65_536
UNSIZED_PART_ROWS = 4096  # a row whose size is known only from the data (strings, dynamic dimensions)


def io_threads(cores: int | None = None) -> int:
    """Threads for one direction of a job's IO (decoding the input, encoding parts): half the usable
    cores each, at least 2, at most 16 (each thread holds a row group or a part in memory)."""
    return max(2, min(16, (cores or usable_cpus()) // 2))


def row_bytes(spec: TensorSpec) -> int | None:
    """Bytes of one row of a tensor whose first dimension is the batch; None where only the data can say."""
    one_row = batch_shape(spec.shape, 1) if spec.shape and spec.shape[0] == -1 and spec.datatype != "BYTES" else None
    return None if one_row is None else math.prod(one_row) * spec.numpy_dtype.itemsize


def part_rows(inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int) -> int:
    """Rows per part for a model's ``inputs`` and the ``outputs`` the job writes, where the job is not told:
    about ``PART_BYTES`` of tensors (the outputs whose size the metadata gives count too), in whole runs of
    the model's ``max_batch``, at most ``MAX_PART_ROWS``; ``UNSIZED_PART_ROWS`` where an input's row size
    is not known. The big MLP's rows of 4,096 floats in and out: 4,096 rows a part; digits-mlp's: 65,536."""
    sizes = [row_bytes(spec) for spec in inputs]
    if not sizes or None in sizes:
        return UNSIZED_PART_ROWS
    per_row = sum(sizes) + sum(s for s in map(row_bytes, outputs) if s)
    step = max(1, max_batch)
    rows = min(MAX_PART_ROWS, PART_BYTES // max(1, per_row))
    return max(step, rows // step * step)


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
    pyarrow alone reads them at ~25,000; its count() read every file once more.

    Parquet is read a row group per task on ``threads`` threads, each streaming its group in pieces
    of a part into a small queue of its own, and the pieces are taken back in file order: memory stays
    near ``threads`` x (``prefetch`` + 1) pieces however large the row groups, and a row group whose
    parts are all done already is not read at all. One row group is read by one thread only (pyarrow
    cannot start in the middle of one), so a file of a single huge row group reads on one core."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.store = open_location(where)
        self.paths, self.kind = _input_files(self.store, where)
        self.bytes_columns: set[str] = set()  # tensors stored as bytes, one value per row (cluster/tensor_columns.py)
        with self.store.errors("read", ""):
            if self.kind == ".parquet":
                footers = [self._footer(p) for p in self.paths]
                self.footers = dict(zip(self.paths, footers))
                schema = footers[0].schema.to_arrow_schema()
                if any(f.metadata and b"ARROW:extension:name" in f.metadata for f in schema):
                    import ray.data.extensions  # noqa: F401  (registers Ray Data's tensor columns, e.g. from write_parquet)
                self.columns = schema.names
                self.bytes_columns = {f.name for f in schema if pa.types.is_fixed_size_binary(f.type)}
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

    def _arrays(self, columns: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(rows, column -> rows) of each .npy or .npz file in order: whole files (.npy memory-mapped)."""
        for path in self.paths:
            with self.store.errors("read", ""):
                if self.kind == ".npy":
                    data = {"data": self._npy(path)}
                else:
                    data = self._npz(path)
                    missing = [c for c in columns if c not in data]
                    if missing:
                        raise InvalidInput(f"--input {self.where}: {path} has no array {', '.join(missing)}")
                    data = {c: data[c] for c in columns}
            yield len(data[columns[0]]), data

    def _row_groups(self, columns: list[str], piece_rows: int, needed: Callable[[int, int], bool], threads: int,
                    depth: int) -> Generator[tuple[int, dict[str, np.ndarray] | None], None, None]:
        """(rows, column -> rows) pieces of every Parquet row group in file order, each group read on
        the pool in pieces of at most ``piece_rows``; (rows, None) for a group ``needed(first row,
        rows)`` says no part wants. At most ``threads`` groups are read at once, ``depth`` pieces ahead each."""
        groups = deque((path, g, self.footers[path].row_group(g).num_rows)
                       for path in self.paths for g in range(self.footers[path].num_row_groups))
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batch-reader")
        remote = not self.store.spec.is_local

        def read(path: str, group: int, q: queue.Queue) -> None:
            try:
                # An object store: one coalesced read per column chunk (pre_buffer). A local file: memory-mapped,
                # the pages decoded where the page cache holds them (read into buffers first, a copy of
                # every byte: 1.5x the CPU per row of 16 KB bytes columns, and memory to fault in).
                with self.store.errors("read", ""), (self.store.fs.open_input_file(path) if remote else pa.memory_map(path)) as source:
                    parquet = pq.ParquetFile(source, metadata=self.footers[path], pre_buffer=remote)
                    for batch in parquet.iter_batches(batch_size=piece_rows, row_groups=[group], columns=columns, use_threads=False):
                        if not _put(q, (len(batch), {name: column_to_numpy(batch.column(name), name, batch.schema.field(name)) for name in columns}), stop):
                            return
                _put(q, (_DONE, None), stop)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer, in order)
                _put(q, (_DONE, exc), stop)

        active: deque[tuple[int, queue.Queue | None]] = deque()  # (rows, its pieces; None: not read)
        start = reading = 0
        try:
            while groups or active:
                while groups and reading < threads:  # keep `threads` groups reading
                    path, group, rows = groups.popleft()
                    if rows and needed(start, rows):
                        q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
                        pool.submit(read, path, group, q)
                        active.append((rows, q))
                        reading += 1
                    else:
                        active.append((rows, None))
                    start += rows
                rows, q = active.popleft()
                if q is None:
                    if rows:
                        yield rows, None
                    continue
                reading -= 1
                yield from _until_done(q)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def batches(self, batch_size: int, columns: list[str], wanted: Callable[[int], bool] = lambda index: True,
                prefetch: int = 2, threads: int | None = None) -> Generator[tuple[int, int, dict[str, np.ndarray] | None], None, None]:
        """(part index, its first row, column -> rows) for consecutive parts of ``batch_size`` rows (the
        last may be shorter), in file order; the arrays are None for a part not ``wanted`` (done already;
        asked once per part, in order). Parquet is decoded on ``threads`` threads (default: ``io_threads()``)
        and the parts cut on one more, ``prefetch`` parts ahead: pyarrow releases the GIL, so reading
        overlaps the dispatch. A part within one row group is a view of it; one across groups, one copy."""
        answers: dict[int, bool] = {}

        def want(index: int) -> bool:
            if index not in answers:
                answers[index] = wanted(index)
            return answers[index]

        def parts() -> Iterator[tuple[int, int, dict[str, np.ndarray] | None]]:
            if self.kind == ".parquet":
                pieces: Iterator[tuple[int, dict[str, np.ndarray] | None]] = self._row_groups(
                    columns, batch_size, lambda first, rows: any(want(i) for i in range(first // batch_size, (first + rows - 1) // batch_size + 1)),
                    threads or io_threads(), prefetch)
            else:
                pieces = self._arrays(columns)
            pending: list[dict[str, np.ndarray] | None] = []
            have = index = 0
            try:
                for n, piece in pieces:
                    offset = 0
                    while offset < n:  # cut the piece at part boundaries
                        take = min(batch_size - have, n - offset)
                        pending.append(None if piece is None else {c: a[offset:offset + take] for c, a in piece.items()})
                        have, offset = have + take, offset + take
                        if have == batch_size:
                            yield index, index * batch_size, _join(pending, columns) if want(index) else None
                            pending, have, index = [], 0, index + 1
                if have:
                    yield index, index * batch_size, _join(pending, columns) if want(index) else None
            finally:
                if hasattr(pieces, "close"):
                    pieces.close()  # the row-group readers stop
        return _prefetched(parts(), prefetch)


def _join(pieces: list[dict[str, np.ndarray] | None], columns: list[str]) -> dict[str, np.ndarray]:
    """One contiguous array per column (a copy only when the part spans chunks, or is a memory-mapped slice)."""
    assert all(p is not None for p in pieces), "a row group skipped under a part that is wanted"
    if len(pieces) == 1:
        return {c: np.ascontiguousarray(pieces[0][c]) for c in columns}
    return {c: np.concatenate([p[c] for p in pieces]) for c in columns}


_DONE = object()


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first (the consumer went away); whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _prefetched(items: Iterator, depth: int) -> Generator:
    """``items`` produced on a thread, up to ``depth`` ahead; its exception raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(q, (item, None), stop):
                    return
            q.put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer)
            q.put((_DONE, exc))
        finally:
            if hasattr(items, "close"):
                items.close()  # its own readers stop too

    thread = threading.Thread(target=produce, name="batch-parts", daemon=True)
    thread.start()
    try:
        for item, _ in _until_done(q):
            yield item
    finally:
        stop.set()


def _until_done(q: queue.Queue) -> Iterator[tuple]:
    """The pairs a producer thread put in ``q``, up to its ``(_DONE, error)``: the error is raised here."""
    while True:
        head, tail = q.get()
        if head is _DONE:
            if tail is not None:
                raise tail
            return
        yield head, tail


# No dictionary (model outputs rarely repeat): a 64 MB part took ~1 s with Parquet's defaults, which
# made the writer, not the GPUs, a job's limit. No compression: on random floats lz4 saved nothing and
# cost ~5% of a part's write; on ReLU-like outputs (half zeros) it halved the rows written per CPU second
# (~15,000 against ~30,000 on the CPU machine) to save a third of the bytes.
# Statistics (min/max per page) only for row_id, which readers filter on: over a model's outputs
# they were a pass over every value that no reader uses (14% of a part's write time, 4,096 x 4,096 floats).
# Left as is: the list levels (a definition and a repetition level per value) are about half of what remains;
# non-nullable items would halve them (~2x rows/s) but change the output's Arrow schema. Tensors written as
# bytes (the job's --output-tensors bytes, cluster/tensor_columns.py) have no levels: ~4x the rows/s of lists.
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "none", "write_statistics": ["row_id"]}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def encode_part(row_ids: np.ndarray, outputs: dict[str, np.ndarray], tensors: str = "lists") -> pa.Table:
    """A part's table: ``row_id`` and each output, tensors as lists or as bytes (``cluster/tensor_columns.py``)."""
    fields, columns = [pa.field("row_id", pa.int64())], [pa.array(row_ids, type=pa.int64())]
    for name, array in outputs.items():
        field, column = tensor_column(name, array, tensors)
        fields.append(field)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


class PartsOutput:
    """Where a job's parts go: a local directory or a URI."""

    def __init__(self, where: str, tensors: str = "lists") -> None:
        self.where = where
        self.store = open_location(where)
        self.local = self.store.spec.is_local
        self.tensors = tensors  # how output tensors are written: "lists" or "bytes"
        self._finished: set[str] | None = None  # the parts there when the job began (prepare): one listing

    @property
    def directory(self) -> Path:
        return Path(self.store.path())

    def has_part(self, index: int) -> bool:
        """Whether an earlier run wrote the part: from ``prepare``'s one listing (a look-up per part took
        0.1 ms in a directory here, and is a request to an object store)."""
        assert self._finished is not None, "PartsOutput.prepare lists the output first"
        return part_name(index) in self._finished

    def write_part(self, index: int, row_ids: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Write one part atomically: it is there whole or not at all."""
        table = encode_part(row_ids, outputs, self.tensors)
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

    def recorded(self) -> dict | None:
        """The record of the job whose parts the output holds (``prepare``), if any."""
        try:
            return json.loads(self.store.read_bytes(JOB_FILE))
        except FileNotFoundError:
            return None

    def prepare(self, record: dict, previous: dict | None) -> None:
        """Create the output, refuse one holding another job's parts (``previous``: what ``recorded``
        read), clear half-written parts."""
        if self.local:
            self.directory.mkdir(parents=True, exist_ok=True)
        if previous is None:
            self.store.write_bytes(JOB_FILE, json.dumps(record, indent=2).encode())
        elif previous != record:
            raise InvalidInput(f"--output {self.where} holds parts of a different job ({previous}); "
                               f"use another directory or remove it")
        if self.local:
            for stale in self.directory.glob(TMP_GLOB):  # half-written by a run that was killed: never a part
                stale.unlink(missing_ok=True)
        self._finished = {f.key for f in self.store.list_files() if f.key.startswith("part-")}

    def write_summary(self, summary: dict) -> None:
        self.store.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())

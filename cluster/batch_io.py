"""A batch job's data: reading its input, writing its parts, on local paths or URIs.

Input and output may be a local path or any URI ``pyarrow.fs`` opens (``s3://bucket/in``,
with ``?endpoint_override=host:port&scheme=http&region=...`` for an S3-compatible
endpoint; credentials from the usual AWS environment variables): Ray Data reads through
the same filesystem, and parts are written through it. A part appears whole or not at
all: in a directory it is written to a temporary name and renamed; on an object store it
is serialized first and sent as one object. A rerun finds the finished parts and skips them.
"""

from __future__ import annotations

import io
import json
import os
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


def read_dataset(where: str):
    """A Ray Dataset over Parquet, .npy, .npz, or a directory of one of them, in file order."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    store = open_location(where)
    paths, kind = _input_files(store, where)
    if kind == ".parquet":
        return ray.data.read_parquet(paths, filesystem=store.fs)
    if kind == ".npy":
        return ray.data.read_numpy(paths, filesystem=store.fs)
    tables = []
    for path in paths:
        with store.errors("read", ""), store.fs.open_input_file(path) as f, np.load(io.BytesIO(f.read())) as data:
            tables.append(pa.table({k: ArrowTensorArray.from_numpy(data[k]) for k in data.files}))
    return ray.data.from_arrow(tables)


# No dictionary (model outputs rarely repeat) and lz4: a 64 MB part took ~1 s with Parquet's
# defaults, which made the writer, not the GPUs, a job's limit.
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "lz4"}


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

"""The batch job's own IO alone, no Ray: rows/s of reading a Parquet file into parts (cluster/batch_io.InputRows)
and of writing parts (PartsOutput.write_part), per thread count, old way against new, alternately.

    python -m benchmarks.batch_io_micro --rows 32768 --width 4096 --row-group 16384 --threads 1,2 --rounds 3

Read "old": the job's reader before the pool (one thread: ParquetFile.iter_batches over the whole file, cut
into parts). Read "new": ``InputRows.batches(threads=N)``. Write: ``write_part`` of 4,096-row parts on N
threads, with each set of Parquet options in ``WRITE_OPTIONS``. Prints rows/s (wall) and rows per CPU second
(the process's CPU time: steadier than wall time on a shared machine). Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster import batch_io
from cluster.batch_io import InputRows, PartsOutput, _join, column_to_numpy

WRITE_OPTIONS = {
    "lz4 (before)": {"use_dictionary": False, "compression": "lz4", "write_statistics": ["row_id"]},
    "none (now)": {"use_dictionary": False, "compression": "none", "write_statistics": ["row_id"]},
}


def write_input(path: Path, rows: int, width: int, row_group: int) -> None:
    rng = np.random.default_rng(7)
    with pq.ParquetWriter(path, pa.schema([("input", pa.list_(pa.float32(), width))])) as writer:
        for start in range(0, rows, row_group):
            chunk = rng.standard_normal((min(row_group, rows - start), width), dtype=np.float32)
            writer.write_table(pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), width)}),
                               row_group_size=row_group)


def read_old(path: Path, part: int) -> int:
    """The reader before the pool, minus its prefetch thread: one thread decodes every batch."""
    rows, pending, have = 0, [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=part, columns=["input"]):
        a = column_to_numpy(batch.column("input"), "input")
        offset = 0
        while offset < len(a):
            take = min(part - have, len(a) - offset)
            pending.append({"input": a[offset:offset + take]})
            have, offset = have + take, offset + take
            if have == part:
                rows += len(_join(pending, ["input"])["input"])
                pending, have = [], 0
    return rows + (len(_join(pending, ["input"])["input"]) if have else 0)


def read_new(path: Path, part: int, threads: int) -> int:
    return sum(len(b["input"]) for _, _, b in InputRows(str(path)).batches(part, ["input"], threads=threads))


def write_parts(out: Path, parts: int, part: int, width: int, threads: int) -> int:
    rng = np.random.default_rng(1)
    outputs = {"output": rng.standard_normal((part, width), dtype=np.float32)}
    ids = np.arange(part, dtype=np.int64)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target = PartsOutput(str(out))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: target.write_part(i, ids, outputs), range(parts)))
    return parts * part


def timed(f) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    rows = f()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return rows / wall, rows / max(cpu, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--row-group", type=int, default=16384, help="rows per input row group (benchmarks/batch_wide.py: 16384)")
    p.add_argument("--part", type=int, default=4096, help="rows per part (the job's --batch-size)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write-parts", type=int, default=8)
    p.add_argument("--skip-read", action="store_true")
    p.add_argument("--skip-write", action="store_true")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    work = Path(tempfile.mkdtemp(prefix="batch-io-micro-"))
    results: dict[str, list] = {}
    try:
        data = work / "in.parquet"
        if not args.skip_read:
            write_input(data, args.rows, args.width, args.row_group)
        for _ in range(args.rounds):
            if not args.skip_read:
                results.setdefault("read old (1 thread)", []).append(timed(lambda: read_old(data, args.part)))
                for t in threads:
                    results.setdefault(f"read new x{t}", []).append(timed(lambda: read_new(data, args.part, t)))
            if not args.skip_write:
                for name, options in WRITE_OPTIONS.items():
                    batch_io.PARQUET_OPTIONS = options
                    for t in threads:
                        results.setdefault(f"write {name} x{t}", []).append(
                            timed(lambda: write_parts(work / "out", args.write_parts, args.part, args.width, t)))
        for name, runs in results.items():
            walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{name:28s} rows/s median {np.median(walls):9.0f} best {max(walls):9.0f}   "
                  f"rows/cpu-s median {np.median(cpus):9.0f}", flush=True)
        print(json.dumps({k: round(float(np.median([r[0] for r in v]))) for k, v in results.items()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Offline batch inference on the fleet, submitted with ``ray job submit``.

    ray job submit --address http://127.0.0.1:8265 -- python -m cluster.batch \\
        --model digits-mlp --input rows.parquet --output out/

Reads Parquet, .npy or .npz (a file or a directory of them) in this process, cuts the rows
into numbered parts of ``--batch-size`` rows (about 128 MB of tensors each unless told), sends each part to a fleet worker
that holds the model (every compatible worker takes parts as fast as it finishes
them, so faster GPUs serve more), and writes ``part-NNNNN.parquet`` with the input
row ids and the outputs. Each part is written once, atomically; a rerun into the
same ``--output`` skips finished parts; a worker lost mid-part costs a retry of
that part on another worker, never a row. Input and output may be local paths or
URIs (``s3://...``; ``cluster/batch_io.py``). Tensors may be stored as lists of numbers
or as bytes (``cluster/tensor_columns.py``); parts travel in shared memory where the
fleet allows it, else through Ray's object store (``cluster/batch_send.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace

from cluster.env import apply_ray_env

apply_ray_env()  # this module is a job's entry point: Ray reads RAY_AUTH_MODE when it is imported, just below

import numpy as np  # noqa: E402
import ray  # noqa: E402

from workers.errors import FleetError, InvalidInput, NotReady, SharedMemoryError  # noqa: E402
from workers.tensors import TensorSpec  # noqa: E402

from cluster.batch_io import TMP_GLOB, InputRows, PartsOutput, io_threads, part_rows  # noqa: E402,F401  (TMP_GLOB: for callers)
from cluster.batch_report import PROGRESS_EVERY_S, Progress, Summary, region_costs, worker_time  # noqa: E402
from cluster.batch_send import FleetWorkers, RayParts, ShmParts  # noqa: E402
from cluster.calls import Failure, classify, get  # noqa: E402
from cluster.names import CONTROLLER_NAME, NAMESPACE  # noqa: E402
from cluster.tensor_columns import ENCODINGS, as_input  # noqa: E402

MAX_RETRIES_PER_PART = 5
# Writing a part is CPU-bound Parquet encoding (~0.1 s per 64 MB on the CPU machine) that releases the
# GIL: one thread per two cores the job may use (its affinity, not the machine's), so a many-core GPU
# host writes as fast as it scores.
WRITER_THREADS = io_threads()
RETRY_BACKOFF_S = 0.2  # times the part's attempts: a busy fleet gets a moment to settle


@dataclass(frozen=True)
class BatchJob:
    model: str
    input: str
    output: str
    version: str | None = None
    batch_size: int | None = None  # rows per part; None: batch_io.part_rows (parts of about 128 MB of tensors)
    input_columns: dict[str, str] = field(default_factory=dict)  # model input -> dataset column
    output_columns: tuple[str, ...] = ()  # empty: every output
    in_flight_per_worker: int = 8  # a part is copied in, scored and copied out: 8 keep a GPU busy meanwhile
    output_tensors: str = "auto"  # "lists", "bytes" (cluster/tensor_columns.py); auto: as the inputs are stored
    shared_memory: bool | None = None  # parts in shared memory: None tries it and falls back to Ray's object store
    max_retries: int = MAX_RETRIES_PER_PART  # per part, after a worker died or lost the engine under it
    progress_every_s: float = PROGRESS_EVERY_S  # a progress line this often (0: none)


# ---- reading ---------------------------------------------------------------------
def column_map(job: BatchJob, spec_inputs: tuple[TensorSpec, ...], columns: list[str]) -> dict[str, str]:
    """Model input -> dataset column, failing early and by name."""
    mapping = dict(job.input_columns)
    for spec in spec_inputs:
        if spec.name in mapping:
            continue
        if spec.name in columns:
            mapping[spec.name] = spec.name
        elif len(spec_inputs) == 1 and len(columns) == 1:
            mapping[spec.name] = columns[0]  # e.g. the 'data' column of .npy files
        else:
            raise InvalidInput(
                f"input '{spec.name}' has no column in {job.input} (columns: {', '.join(columns)}); "
                f"pass --input-column {spec.name}=COLUMN"
            )
    for input_name, column in mapping.items():
        if column not in columns:
            raise InvalidInput(f"column '{column}' (for input '{input_name}') is not in {job.input}; columns: {', '.join(columns)}")
    return mapping


# ---- dispatching -------------------------------------------------------------------
@dataclass
class _Part:
    index: int
    row_ids: np.ndarray
    feeds: dict
    worker: str = ""
    attempts: int = 0
    sent: float = 0.0


class Dispatcher:
    """Keeps every worker that holds the model busy with parts; retries a part whose worker
    died or lost the engine, on whichever worker holds it then. Parts travel in shared memory
    where the fleet allows it and a worker of this host holds the model, else through Ray's
    object store (``cluster/batch_send.py``)."""

    def __init__(self, job: BatchJob, fleet: FleetWorkers, out: PartsOutput, wanted: list[str], summary: Summary,
                 say: Callable[[str], None], shm: ShmParts | None = None) -> None:
        self.job, self.fleet, self.out, self.wanted, self.summary, self.say = job, fleet, out, wanted, summary, say
        self.progress = Progress(summary, say, job.progress_every_s)
        self.ray = RayParts(fleet.model, wanted)
        self.shm = shm  # until it fails before its first answer (then the object store, for good)
        self.shm_sender = shm  # closed when the job ends
        self.shm_answered = False
        self.shm_prepared = False  # the job's regions, made before its first part (_prepare_regions)
        self.in_flight: dict[Future, _Part] = {}
        self.load: Counter = Counter()
        # Parts are written on threads (Parquet encoding releases the GIL) while the next parts go out.
        self.writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="part-writer")
        self.writes: list[Future] = []

    @property
    def transport(self) -> str:
        return (self.shm or self.ray).name

    def submit(self, part: _Part) -> None:
        if self.shm is not None and not self.shm_prepared:
            self._prepare_regions(part)
        if self.shm is not None:  # the client routes: bound the parts in flight over all workers
            while len(self.in_flight) >= self._shm_in_flight():
                self.collect(block=True)
            if self.shm is not None:
                part.worker, part.sent = "", time.monotonic()
                self.summary.mark("first sent")
                self.in_flight[self.shm.send(part.feeds, self.fleet.version)] = part
                return
        while True:
            free = [w for w in self.fleet.workers if self.load[w] < self.job.in_flight_per_worker]
            if free:
                break
            self.collect(block=True)
        worker = min(free, key=lambda w: (self.load[w], -self.summary.rows_per_worker[w]))
        handle, device = self.fleet.workers[worker]
        self.summary.devices[worker] = device
        part.worker, part.sent = worker, time.monotonic()
        self.summary.mark("first sent")
        self.in_flight[self.ray.send(handle, worker, self.fleet.version, part.feeds)] = part
        self.load[worker] += 1

    def _shm_in_flight(self) -> int:
        return self.job.in_flight_per_worker * max(1, len(self.fleet.workers))

    def _prepare_regions(self, part: _Part) -> None:
        """Before the first part goes out, a region for each part in flight and each being written:
        GPU workers page-lock them while their devices are idle (a region first registered while the
        job's parts run there served unpinned for a while: docs/gpu-results.md, 2026-12-05)."""
        self.shm_prepared = True
        assert self.shm is not None
        try:
            self.shm.prepare(part.feeds, min(self.summary.parts, self._shm_in_flight() + WRITER_THREADS), self.fleet.version)
        except (SharedMemoryError, NotReady) as exc:
            if not self._shm_unusable(exc):
                raise
            return  # the parts go through Ray's object store
        self.summary.mark("regions ready")

    def collect(self, block: bool) -> None:
        if not self.in_flight:
            return
        with self.summary.waiting("workers"):
            done, _ = wait(list(self.in_flight), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            part = self.in_flight.pop(future, None)
            if part is None:
                continue  # taken by the collect of a resubmission (below) already
            if part.worker:
                self.load[part.worker] -= 1
            try:
                outputs, worker, release = future.result()
            except Exception as exc:
                if not part.worker and self._shm_unusable(exc):
                    self.submit(part)
                else:
                    self._retry(part, exc)
                continue
            if not part.worker:
                self.shm_answered = True
                self.summary.devices.setdefault(worker, self.fleet.workers.get(worker, (None, ""))[1])
            self.summary.part_seconds += time.monotonic() - part.sent
            self.summary.mark("first answered")
            self.summary.mark("last answered", first_only=False)
            # Outputs waiting to be written stay bounded in memory; read in place, each holds its part's
            # region (a region more to register, and on a GPU worker to page-lock): no more than writers.
            with self.summary.waiting("writes"):
                while len(self.writes) >= (WRITER_THREADS if not part.worker else 2 * WRITER_THREADS):
                    self.writes.pop(0).result()
            self.writes.append(self.writer.submit(self._write, part.index, part.row_ids, outputs, release))
            self.summary.rows_per_worker[worker] += len(part.row_ids)
            self.summary.rows_written += len(part.row_ids)
        self._written(block=False)
        self.progress.tick()

    def _write(self, index: int, row_ids: np.ndarray, outputs: dict, release: Callable[[], None]) -> None:
        try:
            self.out.write_part(index, row_ids, outputs)
        finally:
            release()  # the part's region, where its outputs were read in place

    def _shm_unusable(self, exc: BaseException) -> bool:
        """Whether a part in shared memory failed because shared memory cannot work here (the fleet
        does not allow it, no worker of this host holds the model): the parts go through Ray from now on."""
        if self.shm_answered or self.job.shared_memory or not isinstance(exc, (SharedMemoryError, NotReady)):
            return False  # (--shared-memory on: the job fails, saying why)
        if self.shm is not None:  # the first such part says so; its regions go when the job ends
            self.say(f"  shared memory unusable ({exc}); parts go through {self.ray.name}")
            self.shm = None
            self.summary.transport = self.transport
        return True

    def _written(self, block: bool) -> None:
        """Raise a failed write at once; with ``block``, wait for every write."""
        pending = []
        for write in self.writes:
            if block or write.done():
                write.result()
            else:
                pending.append(write)
        self.writes = pending

    def _retry(self, part: _Part, exc: BaseException) -> None:
        failure, cause = classify(exc)
        if failure is Failure.FINAL:
            raise cause from None
        self.summary.retries += 1
        part.attempts += 1
        reason = "the worker process died" if failure is Failure.WORKER_LOST else str(cause)
        who = f"worker {part.worker}" if part.worker else "its worker"
        if part.attempts > self.job.max_retries:
            raise NotReady(f"part {part.index} failed {part.attempts} times, the last on {who}: "
                           f"{reason}; giving up (--max-retries {self.job.max_retries}); a rerun into the same "
                           f"--output resumes from the parts done") from None
        if failure is Failure.WORKER_LOST:
            self.fleet.workers.pop(part.worker, None)
            self.say(f"  {who} lost during part {part.index}; retrying it elsewhere")
        else:
            self.say(f"  {who} no longer holds the model (part {part.index}); retrying")
        if part.worker:
            try:
                get(self.fleet.controller.report_worker.remote(part.worker))  # the inventory sees it at once
            except Exception:
                pass
        time.sleep(RETRY_BACKOFF_S * part.attempts)
        if not self.fleet.workers:
            self.say(f"  no live worker holds {self.fleet.model}: waiting for one (a replacement is started; "
                     f"the fleet waits up to its worker_wait_s) ...")
        started = time.monotonic()
        self.fleet.refresh()  # waits (bounded, on the controller) while a replacement starts
        if time.monotonic() - started > 1:
            self.say(f"  {', '.join(sorted(self.fleet.workers))} took over after {time.monotonic() - started:.1f} s")
        self.submit(part)

    def drain(self) -> None:
        while self.in_flight:
            self.collect(block=True)
        with self.summary.waiting("writes"):
            self._written(block=True)
        self.writer.shutdown(wait=True)

    def close(self) -> None:
        """The writes in flight end (or remove their temporary file); shared memory is given back."""
        self.writer.shutdown(wait=True)
        if self.shm_sender is not None:
            self.summary.regions = region_costs(self.shm_sender.client.region_setups())
            try:
                self.shm_sender.close()
            except Exception as exc:  # noqa: BLE001  (cleanup: the job's own outcome is what the caller hears)
                self.say(f"  could not give the job's shared memory regions back cleanly: {exc}")


def _model_statistics(controller, model: str, version: str | None) -> dict | None:
    """The model's statistics now; None where the fleet cannot say."""
    try:
        return get(controller.model_statistics.remote(model, version), timeout=30)
    except Exception:  # noqa: BLE001  (a report: nothing depends on it)
        return None


@contextmanager
def engines_during(controller, model: str, version: str | None = None) -> Iterator[dict]:
    """What the model's engines did during the block (``batch_report.worker_time``: runs, rows, compute
    and queue time), filled in when it ends; left empty where the fleet could not say."""
    seen: dict = {}
    before = _model_statistics(controller, model, version)
    yield seen
    after = _model_statistics(controller, model, version) if before is not None else None
    if before is not None and after is not None:
        seen.update(worker_time(before, after))


def run_job(job: BatchJob, controller, progress=None) -> Summary:
    progress = progress or sys.stderr
    say = lambda msg: print(msg, file=progress, flush=True)  # noqa: E731
    t0 = time.monotonic()
    fleet = FleetWorkers(controller, job.model, job.version)
    fleet.refresh()  # unknown model / no compatible worker fail here, before reading any data
    manifest = fleet.manifest
    assert manifest is not None
    wanted = list(job.output_columns) or [o.name for o in manifest.outputs]
    unknown = [o for o in wanted if o not in {s.name for s in manifest.outputs}]
    if unknown:
        raise InvalidInput(f"--output-columns {', '.join(unknown)}: the model's outputs are {', '.join(s.name for s in manifest.outputs)}")
    data = InputRows(job.input)
    specs = {s.name: s for s in manifest.inputs}
    mapping = column_map(job, manifest.inputs, data.columns)
    rows = data.rows
    tensors = job.output_tensors
    if tensors == "auto":  # as the input holds them: bytes in, bytes out
        tensors = "bytes" if set(mapping.values()) <= data.bytes_columns else "lists"
    out = PartsOutput(job.output, tensors)
    # A rerun resumes in the parts it began with; a new job's parts are sized by the model's tensors.
    previous = out.recorded()
    job = replace(job, batch_size=job.batch_size or (previous or {}).get("batch_size") or part_rows(
        [specs[name] for name in mapping], [o for o in manifest.outputs if o.name in wanted], manifest.max_batch))
    out.prepare({"model": job.model, "version": job.version, "input": job.input, "batch_size": job.batch_size,
                 "rows": rows}, previous)
    summary = Summary(rows=rows, parts=-(-rows // job.batch_size), part_rows=job.batch_size, started=t0)
    shm = ShmParts(controller, job.model, wanted) if job.shared_memory is not False else None
    dispatcher = Dispatcher(job, fleet, out, wanted, summary, say, shm)
    summary.transport = dispatcher.transport
    say(f"batch: {job.model} v{fleet.version} over {rows} rows in {summary.parts} parts of {job.batch_size}, "
        f"on {len(fleet.workers)} worker(s): {', '.join(sorted(fleet.workers))}; parts through {summary.transport}, "
        f"output tensors as {tensors}")
    columns = sorted(set(mapping.values()))
    parts = data.batches(job.batch_size, columns, wanted=lambda i: not out.has_part(i))
    with engines_during(controller, job.model, fleet.version) as engines:
        try:
            while True:
                with summary.waiting("input"):
                    item = next(parts, None)
                if item is None:
                    break
                index, start, batch = item
                if batch is None:
                    summary.parts_skipped += 1
                    summary.rows_skipped += min(job.batch_size, rows - start)
                    continue
                summary.mark("first read")
                row_ids = np.arange(start, start + len(batch[columns[0]]), dtype=np.int64)
                dispatcher.submit(_Part(index, row_ids, {name: as_input(batch[col], specs[name], col) for name, col in mapping.items()}))
                dispatcher.collect(block=False)
            dispatcher.drain()
            summary.mark("all written")
        finally:
            parts.close()  # the reader thread stops
            # A job that fails leaves whole parts only: the writes in flight end (or remove their
            # temporary file) before the failure reaches the caller.
            dispatcher.close()
        summary.seconds = time.monotonic() - t0
    summary.workers = engines
    out.write_summary(summary.to_dict())
    say(summary.render())
    return summary


def parse_args(argv: list[str] | None = None) -> BatchJob:
    parser = argparse.ArgumentParser(prog="python -m cluster.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--version")
    parser.add_argument("--input", required=True, help="Parquet / .npy / .npz file or directory, or a URI pyarrow.fs opens (s3://...)")
    parser.add_argument("--output", required=True, help="output directory (or URI) for part-NNNNN.parquet")
    parser.add_argument("--batch-size", type=int, help="rows per part (default: parts of about 128 MB of tensors, in "
                        "and out, in whole batches of the model: 4,096 rows of 4,096 floats in and out; 4,096 rows "
                        "where a row's size shows only in the data; a rerun keeps its first run's)")
    parser.add_argument("--input-column", action="append", default=[], metavar="[INPUT=]COLUMN",
                        help="dataset column for a model input (repeat for several inputs)")
    parser.add_argument("--output-columns", default="", help="comma-separated outputs to write (default: all)")
    parser.add_argument("--max-retries", type=int, default=MAX_RETRIES_PER_PART,
                        help="tries per part after a worker died or lost the engine (default %(default)s)")
    parser.add_argument("--output-tensors", choices=("auto", *ENCODINGS), default="auto",
                        help="write output tensors as lists of numbers or as bytes, one value per row with their dtype "
                             "and shape in the column's metadata, ~4x faster to write (default auto: bytes when the "
                             "input's tensors are bytes)")
    parser.add_argument("--shared-memory", choices=("auto", "on", "off"), default="auto",
                        help="send parts in shared memory to a worker of this host (the fleet's allow_client_shm); "
                             "auto falls back to Ray's object store where it cannot (default %(default)s)")
    parser.add_argument("--in-flight", type=int, default=BatchJob.in_flight_per_worker,
                        help="parts in flight per worker (default %(default)s)")
    parser.add_argument("--progress-every", type=float, default=PROGRESS_EVERY_S, metavar="SECONDS",
                        help="a progress line this often, 0 for none (default %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.max_retries < 0:
        parser.error("--max-retries must be >= 0")
    if args.in_flight < 1:
        parser.error("--in-flight must be >= 1")
    columns: dict[str, str] = {}
    for item in args.input_column:
        name, _, column = item.rpartition("=")
        columns[name or "__single__"] = column
    return BatchJob(
        model=args.model, version=args.version, input=args.input, output=args.output, batch_size=args.batch_size,
        input_columns=columns, output_columns=tuple(c for c in args.output_columns.split(",") if c),
        max_retries=args.max_retries, in_flight_per_worker=args.in_flight, output_tensors=args.output_tensors,
        shared_memory={"auto": None, "on": True, "off": False}[args.shared_memory],
        progress_every_s=args.progress_every,
    )


def main(argv: list[str] | None = None) -> int:
    job = parse_args(argv)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=False)
    try:
        try:
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            raise NotReady("no fleet is running on this Ray cluster; start one with `fleet up`") from None
        if "__single__" in job.input_columns:
            fleet = FleetWorkers(controller, job.model, job.version)
            fleet.refresh()
            (only,) = fleet.manifest.inputs if len(fleet.manifest.inputs) == 1 else (None,)
            if only is None:
                raise InvalidInput("--input-column without INPUT= needs a single-input model")
            columns = dict(job.input_columns)
            columns[only.name] = columns.pop("__single__")
            job = BatchJob(**{**asdict(job), "input_columns": columns})
        run_job(job, controller)
        return 0
    except FleetError as exc:
        print(f"batch job failed: {exc.message}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

"""What a batch job says about itself: a line every few seconds while it runs, its summary at the end.

No Ray here: ``cluster/batch.py`` fills a ``Summary`` as parts come back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

PROGRESS_EVERY_S = 10.0


@dataclass
class Summary:
    rows: int = 0
    rows_written: int = 0
    parts: int = 0
    part_rows: int = 0  # rows per part (the last may have fewer)
    parts_skipped: int = 0
    rows_skipped: int = 0  # in parts an earlier run wrote
    retries: int = 0
    seconds: float = 0.0
    transport: str = ""
    rows_per_worker: Counter = field(default_factory=Counter)
    devices: dict[str, str] = field(default_factory=dict)
    # Where the job's own thread waited, in seconds: for the input (reading was the limit), for the
    # workers (all parts it may have in flight out), for the writes (writing was the limit).
    waited_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("input", "workers", "writes"), 0.0))
    part_seconds: float = 0.0  # sum over parts of the time from sent to answered (mean = this / parts)
    workers: dict = field(default_factory=dict)  # what the model's engines did meanwhile (worker_time)
    # Seconds from the job's start to its first part read, regions ready, first part sent, first answered,
    # last answered and all parts written: before the first sent and after the last answered is the job's
    # own start and end (opening, reading, regions, writes).
    timeline: dict[str, float] = field(default_factory=dict)
    # The shared memory regions the job created (region_costs): what they cost before they served.
    regions: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic, repr=False)

    def mark(self, event: str, first_only: bool = True) -> None:
        """When ``event`` (regions ready, first sent, first answered, last answered) happened, from the job's start."""
        if not (first_only and event in self.timeline):
            self.timeline[event] = round(time.monotonic() - self.started, 3)

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """The block's time counts as the job's thread waiting for ``what`` (input, workers, writes)."""
        started = time.monotonic()
        yield
        self.waited_s[what] += time.monotonic() - started

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows_per_worker"] = dict(self.rows_per_worker)
        d.pop("started")
        d["rows_per_s"] = self.rows_written / self.seconds if self.seconds else 0.0
        return d

    def render(self) -> str:
        lines = [
            f"rows: {self.rows} ({self.rows_written} this run, {self.parts_skipped} of {self.parts} parts already done)",
            f"time: {self.seconds:.1f} s, {self.to_dict()['rows_per_s']:.0f} rows/s, retries: {self.retries}",
            f"parts through {self.transport}, {1000 * self.part_seconds / max(1, self.parts - self.parts_skipped):.0f} ms "
            f"each from sent to answered; waited {self.waited_s['input']:.1f} s for input, "
            f"{self.waited_s['workers']:.1f} s for workers, {self.waited_s['writes']:.1f} s for writes",
            "share by device:",
        ]
        t = self.timeline
        if {"first sent", "first answered", "last answered"} <= set(t):
            written = f", all written at {t['all written']:.1f} s" if "all written" in t else ""
            ready = ""
            if "regions ready" in t:  # made for (and sized by) the first part read
                read = f"first part read at {t['first read']:.1f} s, " if "first read" in t else ""
                ready = f"{read}regions ready at {t['regions ready']:.1f} s, "
            lines.insert(3, f"timeline: {ready}first part sent at {t['first sent']:.1f} s, first answered at {t['first answered']:.1f} s, "
                            f"last answered at {t['last answered']:.1f} s{written}, done at {self.seconds:.1f} s")
        if self.regions.get("count"):
            r = self.regions
            lines.insert(3, f"shared memory: {r['count']} regions of {r['mb']:.0f} MB (one per part in flight or being "
                            f"written), each created and registered in {r['setup_ms'][0]:.0f} ms (median; at most "
                            f"{r['setup_ms'][1]:.0f}), its first inputs copied in {r['first_fill_ms'][0]:.0f} ms "
                            f"(at most {r['first_fill_ms'][1]:.0f})")
        if self.workers.get("runs"):
            run_ms, rows, queued_ms = per_run(self.workers)
            lines.insert(3, f"the model's engines meanwhile: {self.workers['runs']} runs of {rows:.0f} rows on average, "
                            f"{run_ms:.2f} ms each; a request queued {queued_ms:.2f} ms on average (all traffic to the model)")
        total = sum(self.rows_per_worker.values()) or 1
        for worker, rows in sorted(self.rows_per_worker.items()):
            lines.append(f"  {worker:<24} {self.devices.get(worker, ''):<28} {rows:>9} rows  {100 * rows / total:5.1f} %")
        return "\n".join(lines)


class Progress:
    """One line every ``every_s`` seconds (0: none) while the job runs: rows written of those this
    run has to do, the rate since it started and the time left at that rate."""

    def __init__(self, summary: Summary, say: Callable[[str], None], every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.summary, self.say, self.every_s, self.clock = summary, say, every_s, clock
        self.started = clock()
        self.next_at = self.started + every_s

    def tick(self) -> None:
        """Say where the job is, when a line is due."""
        if self.every_s <= 0:
            return
        now = self.clock()
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        s = self.summary
        todo = max(1, s.rows - s.rows_skipped)
        rate = s.rows_written / (now - self.started) if now > self.started else 0.0
        left = f", about {(todo - s.rows_written) / rate:.0f} s left" if rate else ""
        self.say(f"  {s.rows_written:,} of {todo:,} rows ({100 * s.rows_written / todo:.0f} %) in "
                 f"{now - self.started:.0f} s, {rate:,.0f} rows/s{left}")


def region_costs(setups: list) -> dict:
    """From ``RegionSetup``s (``cluster/shm_arena.py``): how many, their size and the ms each took to
    set up and to fill the first time, as [median, max]. Empty when there were none."""
    if not setups:
        return {}

    def median_max(seconds: list[float]) -> list[float]:
        ms = sorted(1000 * s for s in seconds) or [0.0]
        return [round(ms[len(ms) // 2], 1), round(ms[-1], 1)]

    return {"count": len(setups), "mb": max(s.byte_size for s in setups) / 2**20,
            "setup_ms": median_max([s.setup_s for s in setups]),
            "first_fill_ms": median_max([s.first_fill_s for s in setups if s.first_fill_s is not None])}


def per_run(engines: dict) -> tuple[float, float, float]:
    """From ``worker_time``'s numbers (with runs): ms a run took, rows per run, ms a request queued."""
    runs = engines["runs"]
    return 1000 * engines["compute_s"] / runs, engines["rows"] / runs, 1000 * engines["queue_s"] / max(1, engines["requests"])


def worker_time(before: dict, after: dict) -> dict:
    """What the model's engines did between two readings of its statistics (Triton's, as the fleet's
    ``model_statistics`` gives them): runs, rows, requests (a part counts once per max-batch chunk),
    the seconds they computed (summed over runs, which overlap on several slots) and queued."""
    def totals(reading: dict) -> dict:
        sums = dict.fromkeys(("runs", "rows", "requests", "compute_ns", "queue_ns"), 0)
        for version in reading.get("model_stats", []):
            stats = version["inference_stats"]
            sums["runs"] += version["execution_count"]
            sums["rows"] += version["inference_count"]
            sums["requests"] += stats["success"]["count"]
            sums["compute_ns"] += stats["compute_infer"]["ns"]
            sums["queue_ns"] += stats["queue"]["ns"]
        return sums

    a, b = totals(before), totals(after)
    d = {k: b[k] - a[k] for k in a}
    return {"runs": d["runs"], "rows": d["rows"], "requests": d["requests"], "compute_s": d["compute_ns"] / 1e9,
            "queue_s": d["queue_ns"] / 1e9}

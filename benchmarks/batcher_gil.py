"""The worker's dynamic batcher against a busy Python thread, per GIL switch interval. No GPU, no Ray.

    python -m benchmarks.batcher_gil                          # run 2.8 ms, busy 0/50/100 %, switch 5 and 0.5 ms
    python -m benchmarks.batcher_gil --run-ms 0.8 --out gil.json

Each "run" stands for a GPU run: it sleeps ``--run-ms`` without the GIL, as ONNX Runtime's run does.
Chunks of 256 rows are kept queued (128 in flight, as 8 parts of 4,096 rows are in the batch job) on a
``DynamicBatcher`` of ``--slots`` slots, while one more thread runs pure Python for a share of its time
(the worker's event loops, Ray's threads). A run that ends must get the GIL back before its slot takes
the next chunk; Python hands it over only when the holder lets go or after ``sys.setswitchinterval``
(5 ms by default). Prints runs/s, how many ran at once and the mean run as the batcher timed it (what
the fleet's statistics report), per setting. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait

import numpy as np

from workers.batcher import BatchingOptions, DynamicBatcher, EngineStats


def measure(run_s: float, busy: float, switch_s: float, slots: int, runs: int, in_flight: int = 128) -> dict:
    """Runs/s, runs at once and the mean timed run, with one other thread busy ``busy`` of its time."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    stop = threading.Event()

    def busy_thread() -> None:  # pure Python for busy x 2 ms, then asleep for the rest of each 2 ms
        while not stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < 0.002 * busy:
                pass
            if busy < 1:
                time.sleep(0.002 * (1 - busy))

    def run(feeds: dict, out: dict | None = None) -> dict:
        time.sleep(run_s)  # the GPU's time: the GIL released meanwhile
        return out if out is not None else feeds

    stats = EngineStats()
    batcher = DynamicBatcher(run, BatchingOptions(max_batch=256, max_queue_delay_us=500), slots, stats)
    other = threading.Thread(target=busy_thread, daemon=True)
    other.start()
    chunk = {"x": np.zeros((256, 16), np.float32)}
    pending: set = set()
    sent = 0
    started = time.perf_counter()
    try:
        while sent < runs or pending:
            while sent < runs and len(pending) < in_flight:
                pending.add(batcher.submit_nowait(chunk, {"y": np.empty((256, 16), np.float32)}))
                sent += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            pending -= done
        wall = time.perf_counter() - started
    finally:
        stop.set()
        batcher.close()
        other.join()
        sys.setswitchinterval(previous)
    return {"run_ms": run_s * 1e3, "busy": busy, "switch_ms": switch_s * 1e3, "slots": slots,
            "runs_per_s": round(runs / wall), "at_once": round(runs * run_s / wall, 2),
            "timed_run_ms": round(stats.compute_us / stats.exec_count / 1e3, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-ms", type=float, default=2.8, help="a run's GPU time (default %(default)s: the big MLP, "
                   "batch 256, 4 at once on an H200)")
    p.add_argument("--busy", default="0,0.5,1", help="shares of its time the other thread runs Python")
    p.add_argument("--switch-ms", default="5,0.5", help="GIL switch intervals to compare, ms")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--runs", type=int, default=1500)
    p.add_argument("--out", help="also write the results here (JSON)")
    args = p.parse_args()
    results = []
    for busy in (float(b) for b in args.busy.split(",")):
        for switch in (float(s) for s in args.switch_ms.split(",")):
            row = measure(args.run_ms / 1e3, busy, switch / 1e3, args.slots, args.runs)
            results.append(row)
            print(f"run {row['run_ms']:.1f} ms, other thread busy {busy:.0%}, switch {switch:g} ms: "
                  f"{row['runs_per_s']:,} runs/s, {row['at_once']:.2f} at once of {args.slots}, "
                  f"timed run {row['timed_run_ms']:.2f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"what": "benchmarks.batcher_gil", "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""What page-locking a client's shared memory region costs a GPU worker (``cudaHostRegister``).

    python3 -m benchmarks.gpu_pin [--regions 24] [--mb 128] [--out DIR]      (on a GPU host)

A batch job holds a region per part in flight and per part waiting to be written: 24 regions of
128 MB at 16 parts in flight on the big MLP. The worker page-locks each when it is registered
(``workers.devices.CudaHostPinner``, as ``workers/shm.py`` does). This measures how long that takes
for fresh POSIX shared memory objects: one after another, then from as many threads as regions (if
the driver serialises the calls, the threads take as long in total). Then how long a copy of 64 MB (at most the region) into
a region takes once it is pinned, against one into fresh pages of an object that is not. Then the big
MLP at batch 256 from 4 threads on one session, its rows/s before, during and after a disturbance on
another thread: 4, then 8 threads copying memory, as a batch job's process beside the worker does (do its
copies slow the GPU's DMA from host memory?), then as many threads as cores, at nice 0 and at nice 10
(does taking CPU time from the GPU's feeding threads slow it, and does a lower priority for the copies
undo that?). Last, pinning the same number of fresh regions while the runs go on (a worker pins in the
background while it serves: the fleet's ``client_shm_pinning``): how many pins end within 10 s, and how
long the rest take once the runs stop. Results: a table, and DIR/gpu-pin-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import mmap
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT
from benchmarks.gpu import cuda_gpus_or_say
from cluster.shm_arena import allocate_pages
from workers.shm import buffer_address


def _fresh(n: int, nbytes: int, allocated: bool = False) -> list[tuple[shared_memory.SharedMemory, mmap.mmap]]:
    """``n`` new objects, each mapped as a worker maps a region: pages not yet touched, or with
    ``allocated`` made first, as the Python client makes them (``cluster.shm_arena.allocate_pages``)."""
    made = []
    for _ in range(n):
        shm = shared_memory.SharedMemory(name=f"ffpin_{uuid.uuid4().hex[:10]}", create=True, size=nbytes)
        fd = os.open(f"/dev/shm/{shm.name}", os.O_RDWR)
        try:
            if allocated:
                allocate_pages(shm.name, nbytes)
            made.append((shm, mmap.mmap(fd, nbytes)))
        finally:
            os.close(fd)
    return made


def _timed_pin(pinner, mapped: mmap.mmap) -> float:
    """Seconds one pin took."""
    t0 = time.perf_counter()
    if not pinner.pin(buffer_address(mapped), len(mapped)):
        raise RuntimeError("cudaHostRegister refused a region")
    return time.perf_counter() - t0


def _pin_all(regions, pinner, threads: int) -> tuple[list[float], float]:
    """Seconds each pin took, and the wall time for all of them."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        each = list(pool.map(lambda mapped: _timed_pin(pinner, mapped), [m for _, m in regions]))
    return each, time.perf_counter() - t0


def _release(regions, pinner, pinned: bool) -> None:
    for shm, mapped in regions:
        if pinned:
            pinner.unpin(buffer_address(mapped))
        mapped.close()
        shm.close()
        shm.unlink()


def _copy_ms(mapped: mmap.mmap, nbytes: int) -> float:
    source = np.ones(nbytes // 4, np.float32)
    target = np.ndarray(source.shape, np.float32, buffer=mapped)
    t0 = time.perf_counter()
    np.copyto(target, source)
    elapsed = time.perf_counter() - t0
    del target
    return 1000 * elapsed


def pin_variants(n: int) -> list[tuple[str, int, bool]]:
    """(label, threads pinning, pages allocated before the pins): does the driver serialise pins, and how
    much of a pin is the kernel allocating and zeroing the object's pages?"""
    return [("one after another", 1, False), (f"{n} threads", n, False), ("allocated, one after another", 1, True),
            ("allocated, 4 threads", 4, True), (f"allocated, {n} threads", n, True)]


def measure(n: int, mb: int) -> dict:
    from workers.devices import CudaHostPinner

    pinner, nbytes, result = CudaHostPinner(), mb << 20, {}
    copied = min(nbytes, 64 << 20)  # what a part's input needs (4,096 x 4,096 floats), or the whole region
    result["copy_mb"] = copied >> 20
    for label, threads, allocated in pin_variants(n):
        t0 = time.perf_counter()
        regions = _fresh(n, nbytes, allocated)
        made_s = time.perf_counter() - t0
        each, wall = _pin_all(regions, pinner, threads)
        result[label] = {"pin_ms_each": [round(1000 * s, 1) for s in each], "wall_ms": round(1000 * wall, 1),
                         "made_ms": round(1000 * made_s, 1)}
        if label == "one after another":
            result["copy_into_pinned_ms"] = round(_copy_ms(regions[0][1], copied), 1)
        _release(regions, pinner, pinned=True)
    unpinned = _fresh(1, nbytes)
    result["copy_into_fresh_unpinned_ms"] = round(_copy_ms(unpinned[0][1], copied), 1)
    _release(unpinned, pinner, pinned=False)
    return result


def under_load(model_path: Path, disturb: Callable[[], dict], provider: str = "cuda", threads: int = 4,
               batch: int = 256, width: int = 4096, lead_s: float = 1.0, tail_s: float = 1.0) -> dict:
    """rows/s of ``threads`` threads running the model on one session before, while and after
    ``disturb()`` runs on another thread (what it returns is kept in the result)."""

    from workers.engines.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(model_path, provider=provider, device_id=0).activate()
    feeds = {"input": np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)}
    done: list[list[float]] = [[] for _ in range(threads)]  # when each run ended
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            engine.run(feeds)
            done[i].append(time.perf_counter())

    runners = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    try:
        engine.run(feeds)
        begin = time.perf_counter()
        for r in runners:
            r.start()
        time.sleep(lead_s)
        began = time.perf_counter()
        said = disturb()
        ended = time.perf_counter()
        time.sleep(tail_s)
    finally:
        stop.set()
        for r in runners:
            r.join()
        engine.deactivate()
    last = time.perf_counter()
    ends = sorted(t for runs in done for t in runs)

    def rate(a: float, b: float) -> float:
        return round(batch * sum(a <= t < b for t in ends) / max(b - a, 1e-9))

    warm = begin + min(0.3, lead_s / 2)  # the threads' first runs left out
    return {"threads": threads, "batch": batch, "disturbed_ms": round(1000 * (ended - began), 1), **said,
            "rows_per_s_before": rate(warm, began), "rows_per_s_during": rate(began, ended),
            "rows_per_s_after": rate(ended, last)}


class PinningUnderLoad:
    """The disturbance: pin ``n`` fresh regions one after another, as the worker's pinning thread does,
    waiting at most ``bound_s`` while the runs go on. CUDA's page-locking is an implicit synchronisation
    (it waits for the device's work in flight): on an H200, one pin of 32 MB had not returned after
    30 s of 4 threads running the big MLP back to back. Those left then end in ``finish()``, once the
    runs have stopped."""

    def __init__(self, pinner, n: int, mb: int, bound_s: float = 10.0) -> None:
        self.pinner, self.n, self.mb, self.bound_s = pinner, n, mb, bound_s
        self.each: list[float] = []
        self.regions: list = []
        self.thread: threading.Thread | None = None

    def _pin_in_turn(self) -> None:
        for _, mapped in self.regions:
            self.each.append(_timed_pin(self.pinner, mapped))

    def __call__(self) -> dict:
        self.regions = _fresh(self.n, self.mb << 20)
        self.thread = threading.Thread(target=self._pin_in_turn, name="pin-under-load")
        self.thread.start()
        self.thread.join(self.bound_s)
        return {"pins_ended_under_load": len(self.each), "pins": self.n, "bound_s": self.bound_s,
                "pin_ms_each": [round(1000 * s, 1) for s in self.each]}

    def finish(self) -> dict:
        """After the runs stopped: the pins left end; how long the last of them took then."""
        under_load = len(self.each)
        if self.thread is not None:
            self.thread.join()
        pinned = len(self.each)
        _release(self.regions[:pinned], self.pinner, pinned=True)
        _release(self.regions[pinned:], self.pinner, pinned=False)
        return {"pin_ms_each_after_the_runs": [round(1000 * s, 1) for s in self.each[under_load:]]}


def copying(threads: int, seconds: float, mb: int = 64, nice: int = 0) -> Callable[[], dict]:
    """``threads`` threads copying ``mb`` MB between their own buffers for ``seconds``: a batch job's
    process beside the worker (decoding its input, filling regions, writing parts) moves about as much.
    More threads than the host has cores free also takes CPU time from the threads that feed the GPU;
    ``nice``: the copying threads' niceness (a job's IO threads could lower theirs)."""
    def disturb() -> dict:
        def copy(_: int) -> int:
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            source, target = np.ones(mb << 18, np.float32), np.empty(mb << 18, np.float32)
            n, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                np.copyto(target, source)
                n += 1
            return n

        with ThreadPoolExecutor(threads) as pool:
            copies = sum(pool.map(copy, range(threads)))
        return {"copy_threads": threads, "nice": nice, "copied_gb_per_s": round(copies * mb / 1024 / seconds, 1)}

    return disturb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_pin", description=__doc__.split("\n\n")[0])
    p.add_argument("--regions", type=int, default=24)
    p.add_argument("--mb", type=int, default=128, help="MB per region (a part of 4,096 x 4,096 floats in and out: 128)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench-results"))
    p.add_argument("--idle-only", action="store_true", help="only the pins on an idle GPU (a few seconds)")
    args = p.parse_args(argv)
    names = cuda_gpus_or_say("gpu_pin")
    if names is None:
        return 2
    result = measure(args.regions, args.mb)
    _say_pins(result, args.regions, args.mb)
    if not args.idle_only:
        _under_load(result, args.regions, args.mb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-pin-{dt.datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}.json"
    path.write_text(json.dumps({"gpus": names, "regions": args.regions, "mb": args.mb, **result}, indent=2))
    print(f"results: {path}")
    return 0


def _say_pins(result: dict, n: int, mb: int) -> None:
    for label, _, _ in pin_variants(n):
        each = result[label]["pin_ms_each"]
        print(f"{label}: {n} x {mb} MB made in {result[label]['made_ms']:.0f} ms, pinned in "
              f"{result[label]['wall_ms']:.0f} ms (each {min(each):.0f}-{max(each):.0f} ms, "
              f"median {sorted(each)[len(each) // 2]:.0f})")
    print(f"{result['copy_mb']} MB copied into a pinned region: {result['copy_into_pinned_ms']} ms; into fresh "
          f"unpinned pages: {result['copy_into_fresh_unpinned_ms']} ms")


def _under_load(result: dict, n: int, mb: int) -> None:
    """The big MLP's runs while host memory is copied, then while regions are pinned (into ``result``)."""
    from cluster.demo import make_big_mlp
    from workers.devices import CudaHostPinner

    with tempfile.TemporaryDirectory(prefix="gpu-pin-") as tmp:
        model = make_big_mlp(Path(tmp) / "big-mlp.onnx", 4096, 4)
        cores = len(os.sched_getaffinity(0))  # 4 and 8: memory traffic; as many as the cores: CPU time too
        result["copies_under_load"] = [under_load(model, copying(threads, 1.5, nice=nice))
                                       for threads, nice in ((4, 0), (8, 0), (cores, 0), (cores, 10))]
        pins = PinningUnderLoad(CudaHostPinner(), n, mb)
        try:
            result["under_load"] = loaded = under_load(model, pins)
        finally:
            result["under_load_after"] = pins.finish()
    for c in result["copies_under_load"]:
        print(f"  ... {c['rows_per_s_before']:,} before, {c['rows_per_s_during']:,} while {c['copy_threads']} threads "
              f"(nice {c['nice']}) copied {c['copied_gb_per_s']} GB/s in host memory, {c['rows_per_s_after']:,} after")
    print(f"the big MLP, batch 256, {loaded['threads']} threads: {loaded['rows_per_s_before']:,} rows/s before, "
          f"{loaded['rows_per_s_during']:,} while pinning ({loaded['disturbed_ms']:.0f} ms: "
          f"{loaded['pins_ended_under_load']} of {n} pins of {mb} MB ended meanwhile), "
          f"{loaded['rows_per_s_after']:,} after; once the runs stopped, the rest took "
          f"{sum(result['under_load_after']['pin_ms_each_after_the_runs']):.0f} ms")


if __name__ == "__main__":
    raise SystemExit(main())

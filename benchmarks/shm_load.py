"""Closed-loop load from the Python client with system shared memory, from several processes.

What a user's own Python code on a fleet host reaches: ``FleetClient(shared_memory=True)``
puts the tensors in the client's shared memory region and sends only their descriptions
over HTTP (Triton's system shared memory extension). One Python process tops out long
before a GPU does, so the load comes from several (spawned: never fork a process that
runs Ray), each with threads.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from cluster.client import FleetClient


def shm_client_load(url: str, model: str, feeds: dict, concurrency: int, duration_s: float, processes: int) -> dict:
    """``concurrency`` clients in all, spread over ``processes`` processes.
    Returns {"latencies": [...], "elapsed": s} over all clients."""
    ctx = mp.get_context("spawn")
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    start, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(url, model, feeds, n, duration_s, start, results))
             for n in shares]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(timeout=120)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"shared memory client failed: {results.get(timeout=5).get('error')}") from None
        outs = [results.get(timeout=duration_s + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(f"shared memory client failed: {errors[0]}")
    return {"latencies": [x for o in outs for x in o["latencies"]], "elapsed": max(o["elapsed"] for o in outs)}


def _client_process(url: str, model: str, feeds: dict, threads: int, duration_s: float, start, results) -> None:
    clients = [FleetClient(url, shared_memory=True) for _ in range(threads)]
    try:
        for client in clients:
            for _ in range(5):
                client.infer(model, feeds)  # warm: metadata, region, connection
        start.wait()
        deadline = time.perf_counter() + duration_s
        latencies: list[list[float]] = [[] for _ in clients]

        def loop(client, out: list[float]) -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                client.infer(model, feeds)
                out.append(time.perf_counter() - t0)

        began = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(c, out)) for c, out in zip(clients, latencies)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results.put({"latencies": [x for out in latencies for x in out], "elapsed": time.perf_counter() - began})
    except BaseException as exc:  # the parent must hear of it, not wait forever
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        start.abort()
        raise
    finally:
        for client in clients:
            client.close()

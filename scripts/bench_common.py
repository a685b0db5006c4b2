"""Shared pieces of the benchmarks: the models, their payloads, the work directory, small stats.

Everything here runs in the project's environment (numpy, onnxruntime, cluster/).
The Triton phase runs in another environment and gets what it needs as files
(model paths, request bodies) written by ``prepare``.
"""

from __future__ import annotations

import io
import json
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench-results"
CONFIG = REPO_ROOT / "configs" / "local.yaml"


@dataclass(frozen=True)
class BenchModel:
    name: str
    max_batch: int  # what the artifact is built with (configs/local.yaml agrees)
    request_rows: int  # rows per request in the HTTP phases
    note: str


MODELS = {
    "digits-mlp": BenchModel("digits-mlp", 256, 1, "tiny MLP, one row per request: overhead-bound"),
    "cnn-small": BenchModel("cnn-small", 64, 64, "small CNN at its max batch (64 x 3x64x64): compute-bound"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize_ms(latencies_s: list[float]) -> dict:
    """p50 / p90 / p99 / mean in ms of latencies given in seconds."""
    from loadgen import percentile

    ms = [x * 1e3 for x in latencies_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": (sum(ms) / len(ms)) if ms else math.nan,
    }


# ---- inputs ----------------------------------------------------------------------------
def model_inputs(model: str, rows: int):
    """The feeds a benchmark sends: real digits rows, or fixed random images for the CNN."""
    import numpy as np

    if model == "digits-mlp":
        from cluster.demo import digits_split

        X = digits_split()[1]
        return {"input": np.tile(X, (-(-rows // len(X)), 1))[:rows].astype(np.float32)}
    if model == "cnn-small":
        rng = np.random.default_rng(0)
        return {"input": rng.standard_normal((rows, 3, 64, 64)).astype(np.float32)}
    raise ValueError(f"unknown benchmark model {model!r}")


# ---- the work directory ------------------------------------------------------------------
def prepare(workdir: Path, models: list[str]) -> dict:
    """Demo ONNX files, CPU artifacts in a repository, and the request bodies, under workdir.

    Idempotent (the build is cached by source sha256). Returns a manifest of paths
    that the phases (including the one in Triton's environment) read.
    """
    from cluster.buildfarm import build_locally, local_target
    from cluster.demo import make_demo_models
    from workers.protocol import encode_request
    from cluster.repository import Repository
    from workers.build import BuildRequest
    from workers.manifest import sha256_file

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sources = make_demo_models(workdir / "models")
    repo_root = workdir / "repository"
    repo = Repository(repo_root)
    payloads = workdir / "payloads"
    payloads.mkdir(exist_ok=True)
    out: dict = {"repository": str(repo_root), "models": {}}
    for name in models:
        spec = MODELS[name]
        source = sources[name]
        request = BuildRequest(str(source), name, local_target(), max_batch=spec.max_batch)
        outcome = build_locally(repo, request, sha256_file(source), progress=io.StringIO())
        if not outcome.ok:
            raise RuntimeError(f"building {name} for the CPU failed: {outcome.error}")
        feeds = model_inputs(name, spec.request_rows)
        entry: dict = {"onnx": str(source), "max_batch": spec.max_batch, "request_rows": spec.request_rows, "bodies": {}}
        for protocol, binary in (("binary", True), ("json", False)):
            body, headers = encode_request(feeds, binary=binary)
            path = payloads / f"{name}-{protocol}.bin"
            path.write_bytes(body)
            entry["bodies"][protocol] = {"path": str(path), "headers": headers, "bytes": len(body)}
        out["models"][name] = entry
    (workdir / "prepared.json").write_text(json.dumps(out, indent=2))
    return out


def reference_outputs(onnx_path: str, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def wait_http(url: str, timeout_s: float, *, method: str = "GET", body: bytes | None = None,
              headers: dict | None = None) -> float:
    """Poll until ``url`` answers 2xx; returns the seconds waited."""
    import requests

    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        try:
            r = requests.request(method, url, data=body, headers=headers or {}, timeout=10)
            if 200 <= r.status_code < 300:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)[:200]
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 2xx within {timeout_s:.0f} s ({last})")


# ---- the Python client with system shared memory, from several processes -------------
def _shm_client_process(url: str, model: str, feeds: dict, threads: int, duration_s: float, start, results) -> None:
    import threading

    sys_path_fix()
    from cluster.client import FleetClient

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


def sys_path_fix() -> None:
    """Child processes (spawned) import the project from the repository root."""
    import sys

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def shm_client_load(url: str, model: str, feeds: dict, concurrency: int, duration_s: float, processes: int) -> dict:
    """Closed-loop load from ``processes`` Python processes, each running FleetClient(shared_memory=True)
    in threads (``concurrency`` in all): what a user's own Python code on a fleet host reaches.
    Returns {"latencies": [...], "elapsed": s} over all clients."""
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("spawn")  # never fork a process that runs Ray
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    start, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_shm_client_process, args=(url, model, feeds, n, duration_s, start, results))
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

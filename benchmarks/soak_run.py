"""The soak itself (``benchmarks.soak`` is its command line): a simulated heterogeneous fleet
under mixed traffic for a bounded time while workers are killed.

Imports Ray: ``benchmarks.soak`` imports this module after it has set Ray's and Serve's
switches (``cluster.env.apply_ray_env``).
"""

from __future__ import annotations

import collections
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import requests

from cluster.buildfarm import build_on_fleet
from cluster.client import FleetClient
from cluster.config import load_config
from cluster.console import say
from cluster.demo import make_demo_models
from cluster.deploy import deploy, teardown
from cluster.names import NAMESPACE
from cluster.nodes import simulated_cluster
from workers.errors import FleetError

CLEAR_UNDER_FAULT = {"WorkerLost", "NotReady", "NoCompatibleWorker"}  # typed 503s, clearly reported
BAD = [  # (body, expected status)
    ({"inputs": [{"name": "nope", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 400),
    ({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}, 400),
    ({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 400),
    ({"inputs": []}, 400),
]
MODELS = [("digits-mlp", (64,)), ("digits-t4", (64,)), ("cnn-small", (3, 64, 64))]  # digits-t4: the T4s only


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.ok = 0
        self.bad_answered = 0
        self.errors: collections.Counter = collections.Counter()
        self.unclear: list[str] = []
        self.lost = 0
        self.latencies: list[float] = []


def soak(args) -> dict:
    """Set up the fleet, run traffic and the killer for ``args.minutes``, return the summary."""
    work = Path(tempfile.mkdtemp(prefix="fleet-soak-"))
    config = load_config(args.config, repository=str(work / "repo"), port=18555, grpc_port=18556)
    t_start = time.monotonic()
    with simulated_cluster(config) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            controller = deploy(config)
            models = make_demo_models(work / "models")
            build_on_fleet(controller, models["digits-mlp"], model="digits-mlp", max_batch=256)
            build_on_fleet(controller, models["cnn-small"], model="cnn-small", max_batch=64)
            build_on_fleet(controller, models["digits-mlp"], model="digits-t4", targets="T4", max_batch=256)
            url = f"http://127.0.0.1:{config.port}"
            setup_s = time.monotonic() - t_start
            return _traffic_under_kills(url, controller, args, setup_s)
        finally:
            teardown()
            ray.shutdown()


def _traffic_under_kills(url: str, controller, args, setup_s: float) -> dict:
    tally, stop, kills, memory = Tally(), threading.Event(), [], []
    threads = [threading.Thread(target=traffic, args=(url, stop, tally, args.seed + i)) for i in range(args.threads)]
    threads.append(threading.Thread(target=killer, args=(controller, stop, args.kill_every, kills, args.seed)))
    say(f"soaking for {args.minutes} min with {args.threads} clients ...")
    t0 = time.monotonic()
    for t in threads:
        t.start()
    deadline = t0 + args.minutes * 60
    while time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        memory.append(_sample(url, t0, tally))
    stop.set()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    lat = np.array(tally.latencies) * 1e3
    return {
        "minutes": args.minutes, "seconds": round(seconds, 1), "threads": args.threads,
        "requests": tally.requests, "good_ok": tally.ok, "bad_answered_4xx": tally.bad_answered,
        "errors_by_kind": dict(tally.errors), "lost": tally.lost, "unclear": tally.unclear[:20],
        "workers_killed": len(kills), "restarts": memory[-1]["restarts"] if memory else 0,
        "requests_per_s": round(tally.requests / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "memory": memory, "setup_s": round(setup_s, 1),
    }


def _sample(url: str, t0: float, tally: Tally) -> dict:
    """Worker memory and restarts from the status endpoint, with a progress line."""
    status = requests.get(url + "/v2/fleet/status", timeout=30).json()
    rss = {w["worker_id"]: w.get("rss_bytes") for n in status["nodes"] for w in n["workers"] if w["alive"]}
    sample = {"t_s": round(time.monotonic() - t0, 1), "rss_mib": {k: round((v or 0) / 2**20, 1) for k, v in rss.items()},
              "restarts": status["restarts"]}
    with tally.lock:
        say(f"  t={sample['t_s']:>6.1f}s requests={tally.requests} ok={tally.ok} errors={dict(tally.errors)} "
            f"lost={tally.lost} restarts={status['restarts']}")
    return sample


def traffic(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """One client: about one bad request in ten (each must get its 4xx), the rest good ones."""
    rng = random.Random(seed)
    client = FleetClient(url, timeout=60)
    session = requests.Session()
    while not stop.is_set():
        with tally.lock:
            tally.requests += 1
        if rng.random() < 0.1:
            _bad_request(url, session, rng, tally)
        else:
            _good_request(client, rng, tally)


def _bad_request(url: str, session: requests.Session, rng: random.Random, tally: Tally) -> None:
    body, status = rng.choice(BAD)
    try:
        resp = session.post(f"{url}/v2/models/digits-mlp/infer", json=body, timeout=60)
    except requests.RequestException:
        with tally.lock:
            tally.lost += 1
        return
    with tally.lock:
        if resp.status_code == status and "error" in resp.json():
            tally.bad_answered += 1
        else:
            tally.unclear.append(f"bad request answered {resp.status_code}: {resp.text[:200]}")


def _good_request(client: FleetClient, rng: random.Random, tally: Tally) -> None:
    model, shape = rng.choice(MODELS)
    rows = rng.choice([1, 1, 1, 4, 16, 64]) if model != "cnn-small" else rng.choice([1, 2, 8])
    x = np.random.default_rng(rng.randrange(1 << 30)).random((rows, *shape), dtype=np.float32)
    t0 = time.perf_counter()
    try:
        out = client.infer(model, {"input": x})
    except FleetError as exc:
        kind = type(exc).__name__
        with tally.lock:
            tally.errors[kind] += 1
            if kind not in CLEAR_UNDER_FAULT or exc.http_status != 503:
                tally.unclear.append(f"{model}: {kind}: {exc.message[:200]}")
        return
    except Exception as exc:  # no answer at all: a lost request
        with tally.lock:
            tally.lost += 1
            tally.unclear.append(f"{model}: lost: {exc}")
        return
    n = next(iter(out.values())).shape[0]
    with tally.lock:
        tally.latencies.append(time.perf_counter() - t0)
        if n == rows:
            tally.ok += 1
        else:
            tally.unclear.append(f"{model}: {rows} rows in, {n} out")


def killer(controller, stop: threading.Event, every: float, kills: list, seed: int) -> None:
    """Kill a random worker every ``every`` seconds, give or take half."""
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(every / 2, every * 1.5)):
        handles = ray.get(controller.inventory.remote()).handles
        victim = rng.choice(sorted(handles))
        ray.kill(handles[victim], no_restart=True)
        kills.append((time.monotonic(), victim))
        say(f"  killed {victim}")

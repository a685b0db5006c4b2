"""router: Router.choose alone, over a simulated fleet of 1,000 workers and 200 models (no Ray)."""

from __future__ import annotations

import random
import time

from cluster.inventory import Placement
from cluster.router import Router, WorkerState
from workers.devices import Device
from workers.manifest import Manifest
from workers.targets import Runtime, Target, WorkerCaps
from workers.tensors import TensorSpec

from benchmarks.common import progress
from benchmarks.loadgen import percentile

TARGET_MIX = (("7.5", "10.16.1", 0.4), ("6.1", "8.6.1", 0.3), ("7.0", "10.4.0", 0.3))  # T4, P4, V100-like


def run(spec: dict) -> dict:
    rows = router_microbench(spec.get("workers", 1000), spec.get("n_models", 200), spec.get("decisions", 20000))
    for r in rows:
        progress(f"router [{r['variant']}]: median {r['median_us']:.1f} us, p99 {r['p99_us']:.1f} us")
    return {"rows": rows}


def build_router_fleet(n_workers: int, n_models: int, engines_per_worker: int = 10, seed: int = 0):
    """A Router over n simulated workers (T4/P4/V100-like mix) and n models, each model
    built for every target, each worker holding ``engines_per_worker`` engines.
    Returns (router, model names, seconds that set_inventory took)."""
    rng = random.Random(seed)
    ort_rt = Runtime("onnxruntime", "1.23.2", "cpu")
    io_spec = (TensorSpec("input", "FP32", (-1, 4)),)
    manifests = {}
    for i in range(n_models):
        model = f"model-{i:03d}"
        for cc, trt, _ in TARGET_MIX:
            target = Target("tensorrt", trt, cc, provider="tensorrt", simulated=True)
            manifests[(model, cc)] = Manifest(model, "1", "float32", target, "model.plan", "0" * 64, "1" * 64,
                                              io_spec, io_spec, 10 << 20)
    workers = []
    for w in range(n_workers):
        cc, trt, _ = rng.choices(TARGET_MIX, weights=[t[2] for t in TARGET_MIX])[0]
        wid = f"w{w:04d}"
        device = Device(wid, f"SIM-{wid}", "gpu", cc, 16 << 30, simulated=True)
        caps = WorkerCaps(wid, device, (Runtime("tensorrt", trt, "tensorrt", simulated=True), ort_rt))
        models = rng.sample(range(n_models), min(engines_per_worker, n_models))
        loaded = {manifests[(f"model-{m:03d}", cc)].engine_key for m in models}
        state = WorkerState(caps, budget_bytes=15 << 30, used_bytes=len(loaded) * (10 << 20), loaded=loaded)
        state.outstanding = rng.randrange(4)
        workers.append(state)
    router = Router()
    t0 = time.perf_counter()
    router.set_inventory(workers, list(manifests.values()))
    inventory_s = time.perf_counter() - t0
    return router, [f"model-{i:03d}" for i in range(n_models)], inventory_s


def router_microbench(n_workers: int = 1000, n_models: int = 200, decisions: int = 20000, seed: int = 0) -> list[dict]:
    """Median / p99 of one Router.choose (plus begin/end bookkeeping) in microseconds."""
    router, models, inventory_s = build_router_fleet(n_workers, n_models, seed=seed)
    rng = random.Random(seed + 1)
    scenarios = [("spread: each model on ~50 workers", lambda: rng.choice(models), decisions)]
    hot = models[0]
    # one hot model loaded on every worker that can run it, as the controller would place it
    engines = {wid: m.engine_key for wid, m in router.compatible(hot, "1")}
    router.apply_placement(Placement(hot, "1", engines, epoch=0))
    scenarios.append(("hot: one model on all 1,000 workers", lambda: hot, max(200, decisions // 10)))  # slow case
    rows = []
    for label, pick, n in scenarios:
        samples, misses = _decisions(router, pick, n)
        rows.append({"system": "router", "variant": label, "workers": n_workers, "models": n_models,
                     "decisions": n, "misses": misses, "median_us": percentile(samples, 50),
                     "p99_us": percentile(samples, 99), "max_us": max(samples), "set_inventory_ms": inventory_s * 1e3})
    return rows


def _decisions(router: Router, pick, n: int) -> tuple[list[float], int]:
    """Microseconds of ``n`` decisions for the models ``pick()`` names (after a warm-up), and the misses."""
    perf = time.perf_counter_ns
    for _ in range(min(1000, n)):
        router.choose(pick(), "1")
    samples = []
    misses = 0
    for _ in range(n):
        model = pick()
        t0 = perf()
        choice = router.choose(model, "1")
        if choice is not None:
            router.begin(choice.worker_id)
            router.end(choice.worker_id)
        samples.append((perf() - t0) / 1e3)
        misses += choice is None
    return samples, misses

#!/usr/bin/env python3
"""GPU benchmark: bare ONNX Runtime CUDA vs the fleet on the same GPU(s).

For a host with NVIDIA GPUs, onnxruntime-gpu (forward-fleet[gpu]) and Ray:

    python scripts/gpu_bench.py [--quick] [--gpus N] [--out DIR]

On a compute-heavy model (an MLP of 4 x Gemm 4096x4096 + Relu, made with the onnx
helper API, ~268 MB of FP32 weights) it measures, at batch 1 and batch 256:

  bare          the fleet's own engine class (workers.engines.onnxruntime, CUDA provider,
                same session options) called in-process: the GPU's limit for this model
  fleet-client  the in-cluster Python path (no HTTP): the DataPlane (route + worker call, as
                the ingress and the batch job use it) from up to 4 client actors per GPU
  fleet-http-binary  KServe v2 binary over HTTP, closed-loop load from a separate process
  fleet-http-shm     the Python client, FleetClient(shared_memory=True), from several
                processes on the host: tensors in the client's shared memory region, only
                their descriptions over HTTP (Triton's system shared memory extension)

first with one GPU, then (when the host has more) with all of them, so the fleet's
scaling over GPUs shows. Results: DIR/gpu-<timestamp>.json (DIR: $OUT if set, else
bench-results/) and a table on stdout.

It stops at once with a clear message where there is no CUDA GPU or no CUDA
provider in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

REPO_ROOT = HERE.parent
MODEL = "big-mlp"
CLIENTS_PER_GPU = 4
SYSTEMS = ("fleet-client", "fleet-http-binary", "fleet-http-shm")


class NoGpu(RuntimeError):
    pass


def require_cuda() -> list[str]:
    """Names of the visible NVIDIA GPUs; raises NoGpu naming what is missing."""
    try:
        import pynvml
    except ImportError:
        raise NoGpu("nvidia-ml-py (pynvml) is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoGpu(f"NVML could not start ({exc}): no NVIDIA driver or GPU on this host") from None
    try:
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    if not names:
        raise NoGpu("NVML sees no GPU")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise NoGpu(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                    f"(providers: {', '.join(ort.get_available_providers())}); install forward-fleet[gpu] (onnxruntime-gpu)")
    return names


def feeds_for(batch: int, width: int):
    import numpy as np

    return {"input": np.random.default_rng(batch).standard_normal((batch, width)).astype(np.float32)}


def bench_bare(model_path: Path, batches: list[int], width: int, duration_s: float) -> list[dict]:
    from bench_common import summarize_ms
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    rows = []
    with OnnxRuntimeEngine(model_path, provider="cuda", device_id=0) as engine:
        for batch in batches:
            feeds = feeds_for(batch, width)
            for _ in range(10):
                engine.infer(feeds)
            latencies = []
            start = time.perf_counter()
            while time.perf_counter() - start < duration_s:
                t0 = time.perf_counter()
                engine.infer(feeds)
                latencies.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            calls = len(latencies) / elapsed
            rows.append({"system": "bare", "variant": "onnxruntime cuda, in-process", "gpus": 1, "batch": batch,
                         "concurrency": 1, "requests": len(latencies), "req_per_s": calls, "rows_per_s": calls * batch,
                         **summarize_ms(latencies)})
    return rows


def bench_fleet(model_path: Path, n_gpus: int, batches: list[int], width: int, duration_s: float, levels: dict,
                tool: str, work: Path, clients_per_gpu: int = CLIENTS_PER_GPU, systems: tuple[str, ...] = SYSTEMS,
                ray_address: str | None = None) -> list[dict]:
    from cluster.env import apply_ray_env

    apply_ray_env()
    import ray

    import loadgen
    from bench_common import free_port, shm_client_load
    from bench_phases import _client_actor_class
    from cluster import fleet
    from cluster.buildfarm import build_on_fleet
    from cluster.config import load_config
    from cluster.names import CONTROLLER_NAME, NAMESPACE
    from workers.protocol import encode_request
    from cluster.repository import Repository

    config = load_config(str(REPO_ROOT / "configs" / "local.yaml"), repository=str(work / "repository"),
                         port=free_port(), models={MODEL: {"max_batch": max(batches)}}, allow_client_shm=True)
    if ray_address:  # a running cluster (e.g. one Ray node per GPU); it decides how many GPUs there are
        ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    else:
        ray.init(address="local", namespace=NAMESPACE, num_gpus=n_gpus, num_cpus=os.cpu_count(), log_to_driver=False,
                 include_dashboard=False, logging_level=logging.ERROR)
    rows = []
    try:
        fleet.deploy(config)
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        outcomes = build_on_fleet(Repository(config.repository), controller, model_path, model=MODEL,
                                  max_batch=max(batches))
        if not outcomes or not all(o.ok for o in outcomes):
            raise RuntimeError(f"building {MODEL} on the fleet failed: {[o.error for o in outcomes]}")
        targets = sorted({o.target.describe() for o in outcomes})
        # Several client processes: one Python process serializing 4 MB requests and reading 4 MB
        # answers tops out near 500 requests/s, below what one GPU serves at batch 256.
        clients = [_client_actor_class().remote() for _ in range(clients_per_gpu * n_gpus)] \
            if "fleet-client" in systems else []
        base_url = f"http://127.0.0.1:{config.port}"
        url = f"{base_url}/v2/models/{MODEL}/infer"
        for batch in batches:
            feeds = feeds_for(batch, width)
            scale = [c * n_gpus for c in levels[batch]]
            first = len(rows)
            for c in scale if clients else ():
                used = clients[:min(c, len(clients))]
                shares = [c // len(used) + (1 if i < c % len(used) else 0) for i in range(len(used))]
                outs = ray.get([b.run.remote("dataplane", MODEL, feeds, n, duration_s) for b, n in zip(used, shares)])
                latencies = [x for o in outs for x in o["latencies"]]
                rows.append(_row("fleet-client", f"dataplane, {len(used)} client actor(s)", n_gpus, batch, c,
                                 latencies, max(o["elapsed"] for o in outs), targets))
            for c in scale if "fleet-http-shm" in systems else ():
                procs = min(c, clients_per_gpu * n_gpus)
                out = shm_client_load(base_url, MODEL, feeds, c, duration_s, procs)
                rows.append(_row("fleet-http-shm", f"FleetClient(shared_memory=True), {procs} process(es)", n_gpus,
                                 batch, c, out["latencies"], out["elapsed"], targets))
            if "fleet-http-binary" in systems:
                body, headers = encode_request(feeds, binary=True)
                loadgen.run(url, body, headers, concurrency=max(scale), duration_s=2, tool=tool)  # warm-up
                for c in scale:
                    r = loadgen.run(url, body, headers, concurrency=c, duration_s=duration_s, rows_per_request=batch, tool=tool)
                    rows.append({"system": "fleet-http-binary", "variant": r.tool, "gpus": n_gpus, "batch": batch,
                                 "targets": targets, **r.to_dict()})
            for row in rows[first:]:
                _say(f"{row['system']:<18} gpus={n_gpus} batch={batch:<4} c={row['concurrency']:<3} "
                     f"{row['rows_per_s']:>10,.0f} rows/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms")
    finally:
        fleet.teardown()
        ray.shutdown()
    return rows


def _row(system, variant, gpus, batch, c, latencies, elapsed, targets) -> dict:
    from bench_common import summarize_ms

    req_s = len(latencies) / elapsed
    return {"system": system, "variant": variant, "gpus": gpus, "batch": batch, "concurrency": c,
            "requests": len(latencies), "errors": 0, "req_per_s": req_s, "rows_per_s": req_s * batch,
            "targets": targets, **summarize_ms(latencies)}


def _say(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


def summary(rows: list[dict]) -> list[str]:
    lines = ["| system | gpus | batch | conc. | rows/s | p50 ms | p99 ms | vs bare (same batch) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    bare = {r["batch"]: r["rows_per_s"] for r in rows if r["system"] == "bare"}
    for r in rows:
        ratio = r["rows_per_s"] / bare[r["batch"]] if bare.get(r["batch"]) else float("nan")
        lines.append(f"| {r['system']} | {r['gpus']} | {r['batch']} | {r.get('concurrency', 1)} | {r['rows_per_s']:,.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s per level")
    p.add_argument("--gpus", type=int, help="how many GPUs for the multi-GPU run (default: all visible)")
    p.add_argument("--duration", type=float, help="seconds per level (default 5, quick 2)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--loadgen", default="auto", choices=("auto", "wrk", "python"))
    p.add_argument("--batches", default="1,256", help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--levels", default="", help="per-GPU concurrency levels for every batch, e.g. 8,16 "
                   "(default: 1,8,32 at batch 1; 1,4,8 at larger batches)")
    p.add_argument("--clients-per-gpu", type=int, default=CLIENTS_PER_GPU, help="client actors per GPU (fleet-client)")
    p.add_argument("--no-http", action="store_true", help="skip fleet-http-binary")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"which fleet paths to measure, comma-separated (default: {','.join(SYSTEMS)})")
    p.add_argument("--ray-address", help="run the fleet part on this running Ray cluster (all its GPUs) instead of "
                   "a local Ray per GPU count")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench-results"))
    args = p.parse_args(argv)
    systems = tuple(s for s in args.systems.split(",") if s and not (args.no_http and s == "fleet-http-binary"))
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown --systems {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    try:
        names = require_cuda()
    except NoGpu as exc:
        print(f"gpu_bench.py needs a CUDA GPU: {exc}", file=sys.stderr)
        return 2
    import loadgen

    duration = args.duration or (2.0 if args.quick else 5.0)
    n_all = min(args.gpus or len(names), len(names))
    batches = [int(b) for b in args.batches.split(",")]
    chosen = [int(c) for c in args.levels.split(",") if c]
    levels = {b: chosen or ([1, 8, 32] if b == 1 else [1, 4, 8]) for b in batches}
    tool = loadgen.pick_tool(args.loadgen)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    from cluster.demo import make_big_mlp

    model_path = make_big_mlp(work / f"{MODEL}.onnx", args.width, args.layers)
    doc: dict = {"schema": "forward-fleet-gpu-bench/1", "started": dt.datetime.now().isoformat(timespec="seconds"),
           "gpus": names, "model": f"{args.layers} x Gemm {args.width}x{args.width} + Relu (FP32)", "loadgen": tool,
           "duration_s": duration, "rows": []}
    _say(f"{len(names)} GPU(s): {', '.join(names)}; model {doc['model']}")
    doc["rows"] += bench_bare(model_path, batches, args.width, duration)
    for r in doc["rows"]:
        _say(f"bare batch={r['batch']}: {r['rows_per_s']:,.0f} rows/s, p50 {r['p50_ms']:.2f} ms")
    for n in [n_all] if args.ray_address else sorted({1, n_all}):
        doc["rows"] += bench_fleet(model_path, n, batches, args.width, duration, levels, tool, work / f"fleet-{n}",
                                   clients_per_gpu=args.clients_per_gpu, systems=systems,
                                   ray_address=args.ray_address)
    if n_all > 1:
        def best(system: str, n: int, b: int) -> float:
            return max((r["rows_per_s"] for r in doc["rows"] if r["system"] == system and r["gpus"] == n and r["batch"] == b),
                       default=0)

        doc["scaling"] = {f"{system} batch {b}": round(best(system, n_all, b) / best(system, 1, b), 2)
                          for system in systems for b in batches if best(system, 1, b)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{dt.datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print("\n".join(summary(doc["rows"])))
    if "scaling" in doc:
        print(f"\nthroughput with {n_all} GPUs vs 1 (best level each): {doc['scaling']}")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

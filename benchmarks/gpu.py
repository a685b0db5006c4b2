"""GPU benchmark: bare ONNX Runtime CUDA vs the fleet on the same GPU(s).

For a host with NVIDIA GPUs, onnxruntime-gpu (forward-fleet[gpu]) and Ray:

    python3 scripts/gpu_bench.py [--quick] [--gpus N] [--out DIR]     (the project on PYTHONPATH)

On a compute-heavy model (an MLP of 4 x Gemm 4096x4096 + Relu, made with the onnx
helper API, ~268 MB of FP32 weights) it measures, at batch 1 and batch 256:

  bare          the fleet's own engine class (workers.engines.onnxruntime, CUDA provider,
                same session options) called in-process: the GPU's limit for this model
  fleet-client  the in-cluster Python path (no HTTP): the DataPlane (route + worker call, as
                the ingress uses it, and the batch job without shared memory) from up to 4 client actors per GPU
  fleet-client-shm  the in-cluster client (cluster.incluster.InClusterClient) from the same actors,
                its tensors in shared memory of the client's process instead of Ray's object store
                (what the batch job uses where the fleet allows shared memory)
  fleet-http-binary  KServe v2 binary over HTTP, closed-loop load from a separate process
  fleet-http-shm     the Python client, FleetClient(shared_memory=True), from several
                processes on the host: tensors in the client's shared memory region, only
                their descriptions over HTTP (Triton's system shared memory extension)

first with one GPU, then (when the host has more) with all of them, so the fleet's
scaling over GPUs shows. With ``--triton-python PYTHON [--triton-pythonpath DIRS]``, then:

  triton-http-binary  Triton via PyTriton, ONNX Runtime CUDA inside, on the same GPU, driven like
                fleet-http-binary; ``vs_triton`` compares the two per batch and level
                (``benchmarks/gpu_triton.py`` has the GPU host's command line)
 Results: DIR/gpu-<timestamp>.json (DIR: $OUT if set, else
bench-results/) and a table on stdout.

It stops at once with a clear message where there is no CUDA GPU or no CUDA
provider in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cluster.console import say
from cluster.demo import make_big_mlp
from cluster.env import apply_ray_env

from benchmarks import gpu_triton, loadgen
from benchmarks.common import REPO_ROOT, closed_loop_row, progress
from benchmarks.gpu_observe import observe

MODEL = "big-mlp"
CLIENTS_PER_GPU = 4
SYSTEMS = ("fleet-client", "fleet-client-shm", "fleet-http-binary", "fleet-http-shm")


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


def cuda_gpus_or_say(tool: str) -> list[str] | None:
    """``require_cuda()``, or None after saying why ``tool`` cannot run here."""
    try:
        return require_cuda()
    except NoGpu as exc:
        say(f"{tool} needs a CUDA GPU: {exc}")
        return None


def feeds_for(batch: int, width: int):
    import numpy as np

    return {"input": np.random.default_rng(batch).standard_normal((batch, width)).astype(np.float32)}


BARE_THREADS = (1, 2, 4, 8, 16)
BARE_SESSIONS = (2, 4)  # one session per thread, as another way to reach the GPU's limit
# Dense FP32 peak (no tensor cores), TFLOP/s, by the name NVML gives: the share of it the MLP reaches.
FP32_PEAK_TFLOPS = {"H200": 66.9, "H100 80GB HBM3": 66.9, "H100 PCIe": 51.2, "A100": 19.5, "A10": 31.2,
                    "V100": 15.7, "T4": 8.1, "P4": 5.5}


def fp32_peak(gpu_name: str) -> float | None:
    return next((peak for key, peak in FP32_PEAK_TFLOPS.items() if key in gpu_name), None)


def threads_loop(call_for: Callable[[int], Callable[[], object]], threads: int,
                 duration_s: float) -> tuple[list[float], float]:
    """``threads`` threads, thread ``i`` calling ``call_for(i)`` in a closed loop; all latencies."""
    import threading

    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def loop(i: int) -> None:
        call = call_for(i)
        start.wait()
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            call()
            latencies[i].append(time.perf_counter() - t0)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return [x for lat in latencies for x in lat], time.perf_counter() - t0


def _runs(engines: list, feeds: dict) -> Callable[[int], Callable[[], object]]:
    """Thread i runs ``feeds`` on ``engines[i % len(engines)]``."""
    return lambda i: functools.partial(engines[i % len(engines)].run, feeds)


def bench_bare(model_path: Path, batches: list[int], width: int, duration_s: float,
               threads_list: tuple[int, ...] = BARE_THREADS, sessions_list: tuple[int, ...] = BARE_SESSIONS) -> list[dict]:
    """The fleet's own engine class (CUDA provider, same session options) in-process, at its best:
    one session shared by 1-16 threads, and one session per thread. The fleet's ratios are taken
    against the best of these, not against one caller (which leaves the GPU idle between runs)."""
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    rows = []
    engines = [OnnxRuntimeEngine(model_path, provider="cuda", device_id=0).activate()
               for _ in range(max((*sessions_list, 1)))]
    try:
        for batch in batches:
            feeds = feeds_for(batch, width)
            for engine in engines:
                for _ in range(5):
                    engine.run(feeds)
            for threads in threads_list:
                with observe(False, duration_s) as observed:
                    latencies, elapsed = threads_loop(_runs(engines[:1], feeds), threads, duration_s)
                rows.append(closed_loop_row("bare", f"one session, {threads} thread(s)", batch, threads, latencies,
                                            elapsed, gpus=1, sessions=1, observed=observed))
            for sessions in sessions_list:
                with observe(False, duration_s) as observed:
                    latencies, elapsed = threads_loop(_runs(engines[:sessions], feeds), sessions, duration_s)
                rows.append(closed_loop_row("bare", f"{sessions} sessions, one thread each", batch, sessions,
                                            latencies, elapsed, gpus=1, sessions=sessions, observed=observed))
    finally:
        for engine in engines:
            engine.deactivate()
    return rows


def bare_best(rows: list[dict]) -> dict[int, dict]:
    """Per batch size, the best bare row (the GPU's limit the fleet is measured against)."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["system"] == "bare" and r["rows_per_s"] > best.get(r["batch"], {}).get("rows_per_s", 0):
            best[r["batch"]] = r
    return best


def add_compute(rows: list[dict], width: int, layers: int, peak: float | None) -> None:
    """TFLOP/s of the MLP (2 x width^2 multiply-adds per layer and row) and its share of the peak."""
    flops_per_row = 2 * width * width * layers
    for r in rows:
        r["tflops"] = r["rows_per_s"] * flops_per_row / 1e12
        if peak:
            r["share_of_fp32_peak"] = r["tflops"] / peak


def summary(rows: list[dict]) -> list[str]:
    lines = ["| system | variant | gpus | batch | conc. | rows/s | TFLOP/s | p50 ms | p99 ms | vs bare best (same batch) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best = bare_best(rows)
    for r in rows:
        ref = best.get(r["batch"], {}).get("rows_per_s")
        ratio = r["rows_per_s"] / ref if ref else float("nan")
        lines.append(f"| {r['system']} | {r.get('variant', '')} | {r['gpus']} | {r['batch']} | {r.get('concurrency', 1)} | "
                     f"{r['rows_per_s']:,.0f} | {r.get('tflops', float('nan')):.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {ratio:.2f}x |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s per level")
    p.add_argument("--gpus", type=int, help="how many GPUs for the multi-GPU run (default: all visible)")
    p.add_argument("--duration", type=float, help="seconds per level (default 5, quick 2)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--loadgen", default="auto", choices=("auto", "wrk", "python"))
    p.add_argument("--batches", default="1,256", help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--levels", default="", help="per-GPU concurrency levels for every batch, e.g. 8,16, or per batch, "
                   "e.g. 256:8,16,32/1:64 (default: 1,8,32 at batch 1; 1,4,8 at larger batches)")
    p.add_argument("--clients-per-gpu", type=int, default=CLIENTS_PER_GPU, help="client actors per GPU (fleet-client)")
    p.add_argument("--no-http", action="store_true", help="skip fleet-http-binary")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"which fleet paths to measure, comma-separated (default: {','.join(SYSTEMS)})")
    p.add_argument("--ray-address", help="run the fleet part on this running Ray cluster (all its GPUs) instead of "
                   "a local Ray per GPU count")
    p.add_argument("--batch-job-rows", type=int, default=0,
                   help="also score a Parquet file of this many rows with the batch job (0: skip; 200000 is 3.3 GB)")
    p.add_argument("--batch-job-in-flight", default="", help="parts in flight per worker for the batch job, "
                   "comma-separated: one job run each (default: the job's own default)")
    p.add_argument("--batch-job-part-rows", default="auto",
                   help="rows per part for the batch job (its --batch-size; auto: the job's own default, 4,096 rows "
                        "on the big MLP), comma-separated: one job run each, and each in-flight setting (a part's "
                        "region, 32 KB a row on the big MLP, is page-locked as the job starts: a smaller part is "
                        "pinned sooner, a larger one costs the job's threads less a row)")
    p.add_argument("--batch-job-repeat", type=int, default=0,
                   help="the batch job's input repeats this many distinct rows in each row group of 16,384, "
                        "dictionary-encoded (2,000,000 rows of 16 KB fit the lent disk; 0: every row distinct)")
    p.add_argument("--bare-threads", default=",".join(map(str, BARE_THREADS)),
                   help="threads sharing bare's one session, comma-separated (default %(default)s, and one session per "
                        "thread too; fewer, for a quicker look, measures bare only so)")
    p.add_argument("--slots", type=int, default=0, help="the fleet's slots, concurrent runs per engine (default: the "
                   "fleet config's)")
    p.add_argument("--worker-http-loops", type=int, default=1,
                   help="event loops of the worker's own HTTP endpoint (the fleet config's worker_http_loops)")
    p.add_argument("--gil-switch-ms", type=float, default=None,
                   help="the workers' GIL switch interval (the fleet config's gil_switch_interval_ms; default "
                        "Python's 5 ms; benchmarks.batcher_gil says why it may matter)")
    p.add_argument("--shm-pinning", choices=("background", "registration", "off"), default="background",
                   help="when the GPU worker page-locks a client's region (the fleet config's client_shm_pinning)")
    p.add_argument("--shm-pin-threads", type=int, default=None,
                   help="threads that page-lock regions in the background (the fleet config's client_shm_pin_threads)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the GPU worker during every fleet row (GPU utilization and CPU per process are always "
                        "recorded, under each row's 'observed')")
    gpu_triton.add_arguments(p)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench-results"))
    args = p.parse_args(argv)
    args.systems = tuple(s for s in args.systems.split(",") if s and not (args.no_http and s == "fleet-http-binary"))
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown --systems {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.bare_threads = tuple(int(t) for t in args.bare_threads.split(","))
    args.batch_job_in_flight = [int(n) for n in args.batch_job_in_flight.split(",") if n]
    args.batch_job_part_rows = [None if n == "auto" else int(n) for n in args.batch_job_part_rows.split(",") if n]
    args.levels = parse_levels(args.levels, args.batches)
    return args


def parse_levels(text: str, batches: list[int]) -> dict[int, list[int]]:
    """'8,16' (every batch) or '256:8,16,32/1:64' (per batch) -> {batch: levels}, with the defaults."""
    default = {b: [1, 8, 32] if b == 1 else [1, 4, 8] for b in batches}
    if not text:
        return default
    if ":" not in text:
        return {b: [int(c) for c in text.split(",")] for b in batches}
    for part in text.split("/"):
        batch, _, levels = part.partition(":")
        default[int(batch)] = [int(c) for c in levels.split(",")]
    return default


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = cuda_gpus_or_say("gpu_bench")
    if names is None:
        return 2
    apply_ray_env()  # before anything imports Ray: Ray and Serve read their switches then
    from benchmarks.gpu_fleet import bench_fleet

    n_all = min(args.gpus or len(names), len(names))
    tool = loadgen.pick_tool(args.loadgen)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    model_path = make_big_mlp(work / f"{MODEL}.onnx", args.width, args.layers)
    doc: dict = {"schema": "forward-fleet-gpu-bench/1", "started": dt.datetime.now().isoformat(timespec="seconds"),
                 "gpus": names, "model": f"{args.layers} x Gemm {args.width}x{args.width} + Relu (FP32)", "loadgen": tool,
                 "duration_s": args.duration, "rows": [],
                 "fleet_settings": {k: getattr(args, k) for k in ("slots", "worker_http_loops", "gil_switch_ms", "shm_pinning",
                                                                        "shm_pin_threads")}}
    progress(f"{len(names)} GPU(s): {', '.join(names)}; model {doc['model']}")
    doc["rows"] += bench_bare(model_path, args.batches, args.width, args.duration, args.bare_threads,
                              BARE_SESSIONS if args.bare_threads == BARE_THREADS else ())
    for r in doc["rows"]:
        progress(f"bare batch={r['batch']} {r['variant']}: {r['rows_per_s']:,.0f} rows/s, p50 {r['p50_ms']:.2f} ms, "
                 f"GPU busy {r['observed'].get('gpu_util_mean_pct', '?')} %")
    doc["bare_best"] = {b: {"rows_per_s": r["rows_per_s"], "variant": r["variant"]} for b, r in bare_best(doc["rows"]).items()}
    for n in [n_all] if args.ray_address else sorted({1, n_all}):
        doc["rows"] += bench_fleet(model_path, n, args, tool, work / f"fleet-{n}", lambda b: feeds_for(b, args.width))
    if args.triton_python:  # after the fleet part: its fleet is torn down, the GPU is Triton's
        doc["triton"] = _triton_part(model_path, args, tool, work)
        doc["rows"] += doc["triton"].pop("rows", [])
    if n_all > 1:
        doc["scaling"] = scaling(doc["rows"], args.systems, args.batches, n_all)
    doc["fp32_peak_tflops"] = fp32_peak(names[0])
    add_compute(doc["rows"], args.width, args.layers, doc["fp32_peak_tflops"])
    doc["vs_bare_best"] = vs_bare_best(doc["rows"])
    if args.triton_python:
        doc["vs_triton"] = gpu_triton.vs_triton(doc["rows"])
        doc["vs_triton_target_met"] = gpu_triton.target_met(doc["vs_triton"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{dt.datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print("\n".join(summary(doc["rows"])))
    if "scaling" in doc:
        print(f"\nthroughput with {n_all} GPUs vs 1 (best level each): {doc['scaling']}")
    if "triton" in doc:
        print("\n" + "\n".join(gpu_triton.table(doc.get("vs_triton", []))))
        for what in ("error", "wrong_answers"):
            if doc["triton"].get(what):
                print(f"\ntriton {what.replace('_', ' ')}: {doc['triton'][what]}")
    print(f"\nresults: {path}")
    return 1 if doc.get("triton", {}).get("error") or doc.get("triton", {}).get("wrong_answers") else 0


def _triton_part(model_path: Path, args, tool: str, work: Path) -> dict:
    """Triton's rows and what it said; a failure is recorded (and makes the exit status 1), not raised."""
    try:
        return gpu_triton.bench_triton(model_path, args, tool, work, lambda b: feeds_for(b, args.width))
    except Exception as exc:  # noqa: BLE001 (keep the fleet's results; say what broke)
        progress(f"triton part failed: {type(exc).__name__}: {exc}")
        return {"rows": [], "error": f"{type(exc).__name__}: {exc}"}


def vs_bare_best(rows: list[dict]) -> dict[str, float]:
    """Each fleet path's best rows/s (any level, one GPU) over bare at its best, per batch."""
    best = bare_best(rows)
    out = {}
    for r in rows:
        if r["system"] == "bare" or r["gpus"] != 1 or r["batch"] not in best:
            continue
        key = f"{r['system']} batch {r['batch']}"
        out[key] = max(out.get(key, 0.0), round(r["rows_per_s"] / best[r["batch"]]["rows_per_s"], 3))
    return out


def scaling(rows: list[dict], systems: tuple[str, ...], batches: list[int], n_all: int) -> dict[str, float]:
    """Best rows/s with all GPUs over best rows/s with one, per system and batch."""
    def best(system: str, n: int, b: int) -> float:
        return max((r["rows_per_s"] for r in rows if r["system"] == system and r["gpus"] == n and r["batch"] == b),
                   default=0)

    return {f"{system} batch {b}": round(best(system, n_all, b) / best(system, 1, b), 2)
            for system in systems for b in batches if best(system, 1, b)}


if __name__ == "__main__":
    sys.exit(main())

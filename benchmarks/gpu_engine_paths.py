"""Three ways to run the big MLP on ONNX Runtime's CUDA provider, from 1-8 threads sharing one session.

    python3 -m benchmarks.gpu_engine_paths [--duration S] [--threads 1,4,8] [--out DIR]   (on a GPU host)

- ``session.run``: what bare does (gpu_bench's reference): inputs copied to the GPU inside
  ``Run``, outputs allocated by ONNX Runtime.
- ``IOBinding``: what the engine did for shared memory and chunks until 2026-12-05:
  ``bind_cpu_input`` plus each output bound to the caller's array. ONNX Runtime copies the
  input to the GPU when it is bound, with the GIL held, by ``cudaMemcpy`` on CUDA's legacy
  default stream, which waits for the other threads' runs on ONNX Runtime's blocking streams.
- ``engine.run(out=...)``: the engine now (``OnnxRuntimeEngine._infer_into``): CPU values over
  the caller's arrays, copied inside ``Run`` with the GIL released, outputs written in place.

Every thread has its own input and output arrays, page-locked as a GPU worker page-locks a
client's shared memory region. Results: a table, and DIR/gpu-engine-paths-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cluster.demo import make_big_mlp

from benchmarks.common import REPO_ROOT, closed_loop_row, progress
from benchmarks.gpu import cuda_gpus_or_say, feeds_for, threads_loop


def _page_locked(array: np.ndarray, pinner) -> np.ndarray:
    if not pinner.pin(array.ctypes.data, array.nbytes):
        raise RuntimeError("cudaHostRegister refused the benchmark's buffers")
    return array


def _iobinding_call(engine, feeds: dict, out: dict) -> Callable[[], object]:
    session = engine._session

    def call() -> None:
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, target in out.items():
            binding.bind_output(name, "cpu", 0, target.dtype.type, list(target.shape), target.ctypes.data)
        session.run_with_iobinding(binding)

    return call


def measure(model_path: Path, batch: int, width: int, threads_list: tuple[int, ...], duration_s: float) -> list[dict]:
    from workers.devices import CudaHostPinner
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    pinner = CudaHostPinner()
    engine = OnnxRuntimeEngine(model_path, provider="cuda", device_id=0).activate()
    try:
        feeds = [{k: _page_locked(v.copy(), pinner) for k, v in feeds_for(batch, width).items()}
                 for _ in range(max(threads_list))]
        outs = [{"output": _page_locked(np.empty((batch, width), np.float32), pinner)} for _ in feeds]
        expected = engine.run(feeds[0])["output"]
        paths: dict[str, Callable[[int], Callable[[], object]]] = {
            "session.run": lambda i: lambda: engine.run(feeds[i]),
            "IOBinding (until 2026-12-05)": lambda i: _iobinding_call(engine, feeds[i], outs[i]),
            "engine.run(out=...)": lambda i: lambda: engine.run(feeds[i], outs[i]),
        }
        rows = []
        for name, call_for in paths.items():
            for _ in range(3):
                call_for(0)()
            if name != "session.run":
                np.testing.assert_allclose(outs[0]["output"], expected, rtol=1e-5, atol=1e-5)
            for threads in threads_list:
                latencies, elapsed = threads_loop(call_for, threads, duration_s)
                row = closed_loop_row("engine path", name, batch, threads, latencies, elapsed, gpus=1)
                rows.append(row)
                progress(f"{name}, {threads} thread(s): {row['rows_per_s']:,.0f} rows/s, p50 {row['p50_ms']:.2f} ms")
    finally:
        engine.deactivate()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_engine_paths", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per path and thread count")
    p.add_argument("--threads", default="1,4,8")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench-results"))
    args = p.parse_args(argv)
    names = cuda_gpus_or_say("gpu_engine_paths")
    if names is None:
        return 2
    model = make_big_mlp(Path(tempfile.mkdtemp(prefix="engine-paths-")) / "big-mlp.onnx", args.width, 4)
    rows = measure(model, args.batch, args.width, tuple(int(t) for t in args.threads.split(",")), args.duration)
    print("| path | threads | rows/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['concurrency']} | {r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-engine-paths-{dt.datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}.json"
    path.write_text(json.dumps({"gpus": names, "batch": args.batch, "width": args.width, "rows": rows}, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

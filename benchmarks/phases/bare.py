"""bare: ONNX Runtime in-process at batch 1 and max batch, the machine's limit for each model.

One session with as many intra-op threads as this process has cores (its affinity mask:
``scripts/bench.py --pin`` puts it on the fleet's cores), set explicitly: ONNX Runtime's own
default may count the machine's cores instead."""

from __future__ import annotations

import time

import onnxruntime as ort

from workers.cpus import usable_cpus

from benchmarks.common import closed_loop_row, model_inputs, progress

WINDOWS = 5


def run(spec: dict) -> dict:
    rows = []
    threads = usable_cpus()
    for model in spec["models"]:
        info = spec["prepared"]["models"][model]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # as workers/engines/onnxruntime.py
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(info["onnx"], sess_options=options, providers=["CPUExecutionProvider"])
        for batch in sorted({1, info["max_batch"]}):
            row = dict(_measure(session, model, batch, spec["duration_s"]), intra_op_threads=threads)
            progress(f"bare {model} batch {batch}: {row['rows_per_s']:.0f} rows/s, "
                     f"{row['p50_ms'] * 1e3:.0f} us/call p50, {threads} thread(s)")
            rows.append(row)
    return {"rows": rows}


def _measure(session, model: str, batch: int, duration_s: float) -> dict:
    """Calls in ``WINDOWS`` windows; the best window is the machine's limit (other tenants of a
    shared machine only ever slow a window down), the whole run is reported beside it."""
    names = [o.name for o in session.get_outputs()]
    feeds = model_inputs(model, batch)
    for _ in range(20):
        session.run(names, feeds)
    latencies: list[float] = []
    window_rates = []
    t_start = time.perf_counter()
    for _ in range(WINDOWS):
        w_start = time.perf_counter()
        w_end = w_start + duration_s / WINDOWS
        n = 0
        while True:
            t0 = time.perf_counter()
            session.run(names, feeds)
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            n += 1
            if t1 >= w_end:
                break
        window_rates.append(n / (t1 - w_start))
    elapsed = time.perf_counter() - t_start
    calls = max(window_rates)
    row = closed_loop_row("bare", f"onnxruntime {ort.__version__} cpu", batch, 1, latencies, elapsed, model=model)
    return dict(row, req_per_s=calls, rows_per_s=calls * batch, rows_per_s_whole_run=len(latencies) / elapsed * batch,
                rows_per_s_windows=[round(r * batch, 1) for r in window_rates])

"""The fleet part of the GPU benchmark (``benchmarks.gpu``): a fleet on N GPUs, measured three ways.

Imports Ray: ``benchmarks.gpu`` imports this module after it has set Ray's and Serve's
switches (``cluster.env.apply_ray_env``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import ray

from cluster.batch_report import per_run
from cluster.buildfarm import build_on_fleet
from cluster.config import load_config
from cluster.deploy import deploy, teardown
from cluster.names import NAMESPACE
from cluster.net import free_port
from workers.kserve.client_codec import encode_request

from benchmarks import loadgen
from benchmarks.common import CONFIG, closed_loop_row, progress, write_tensor_rows
from benchmarks.gpu_observe import observe
from benchmarks.phases.fleet_client import client_bench_class
from benchmarks.shm_load import shm_client_load

def bench_fleet(model_path: Path, n_gpus: int, args, tool: str, work: Path, feeds_for) -> list[dict]:
    """Rows for every (system, batch, level) of ``args`` (benchmarks.gpu's options; ``args.levels[batch]``
    are per-GPU concurrencies) on a fleet of ``n_gpus`` serving the model at ``model_path`` (named by its stem)."""
    model = model_path.stem
    config = load_config(str(CONFIG), repository=str(work / "repository"), port=free_port(), grpc_port=free_port(),
                         models={model: {"max_batch": max(args.batches)}}, allow_client_shm=True,
                         worker_http_loops=args.worker_http_loops, gil_switch_interval_ms=args.gil_switch_ms,
                         client_shm_pinning=args.shm_pinning,
                         **({"slots": args.slots} if args.slots else {}),
                         **({"client_shm_pin_threads": args.shm_pin_threads} if args.shm_pin_threads else {}))
    if args.ray_address:  # a running cluster (e.g. one Ray node per GPU); it decides how many GPUs there are
        ray.init(address=args.ray_address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    else:
        ray.init(address="local", namespace=NAMESPACE, num_gpus=n_gpus, num_cpus=os.cpu_count(), log_to_driver=False,
                 include_dashboard=False, logging_level=logging.ERROR)
    rows: list[dict] = []
    try:
        controller = deploy(config)
        outcomes = build_on_fleet(controller, model_path, model=model,
                                  max_batch=max(args.batches))
        if not outcomes or not all(o.ok for o in outcomes):
            raise RuntimeError(f"building {model} on the fleet failed: {[o.error for o in outcomes]}")
        run = _Measure(model, n_gpus, args.duration, sorted({o.target.describe() for o in outcomes}),
                       f"http://127.0.0.1:{config.port}", args.clients_per_gpu * n_gpus, tool, args.profile, controller)
        # Several client actors: one Python process serializing 4 MB requests and reading 4 MB
        # answers tops out near 500 requests/s, below what one GPU serves at batch 256.
        in_cluster = {"fleet-client", "fleet-client-shm"} & set(args.systems)
        clients = [client_bench_class().remote() for _ in range(run.clients)] if in_cluster else []
        ray.get([c.__ray_ready__.remote() for c in clients])  # started before anything is observed
        for batch in args.batches:
            first = len(rows)
            feeds = feeds_for(batch)
            scale = [c * n_gpus for c in args.levels[batch]]
            rows += [run.client(clients, batch, c, feeds) for c in (scale if "fleet-client" in args.systems else ())]
            rows += [run.client(clients, batch, c, feeds, "shm") for c in (scale if "fleet-client-shm" in args.systems else ())]
            rows += [run.shm(batch, c, feeds) for c in (scale if "fleet-http-shm" in args.systems else ())]
            if "fleet-http-binary" in args.systems:
                rows += run.http_binary(batch, scale, feeds)
            for row in rows[first:]:
                progress(f"{row['system']:<18} gpus={n_gpus} batch={batch:<4} c={row['concurrency']:<3} "
                         f"{row['rows_per_s']:>10,.0f} rows/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                         f"{_engines_text(row.get('engines'))}GPU busy {row['observed'].get('gpu_util_mean_pct', '?')} %  CPU % {row['observed']['cpu_pct_by_role']}")
        if args.batch_job_rows:
            for job in batch_job_rows(controller, model, args.batch_job_rows, n_gpus, work, feeds_for(1)["input"].shape[1],
                                      args.profile, args.batch_job_in_flight, args.batch_job_repeat,
                                      args.batch_job_part_rows):
                rows.append(job)
                progress(f"batch-job          gpus={n_gpus} {job['rows_per_s']:>10,.0f} rows/s ({job['variant']})  "
                         f"{_engines_text(job.get('engines'))}GPU busy "
                         f"{job['observed'].get('gpu_util_p50_pct', '?')} % (median)  CPU % {job['observed']['cpu_pct_by_role']}")
    finally:
        teardown()
        ray.shutdown()
    return rows


def batch_job_rows(controller, model: str, n_rows: int, n_gpus: int, work: Path, width: int, profile: bool,
                   in_flight: list[int], repeat: int = 0, part_rows: list[int | None] | None = None) -> Iterator[dict]:
    """The batch job (what `ray job submit ... python -m cluster.batch` runs, here in this driver) over a
    Parquet file of ``n_rows`` random rows, tensors stored as bytes (``cluster/tensor_columns.py``), so
    the outputs are written as bytes too, once per part size (``--batch-size``; None: the job's default) and
    parts-in-flight setting (none: the job's default): rows/s from the job's start to the last part
    written. ``repeat``: each row group repeats that many distinct rows, dictionary-encoded, so that
    2 million rows of 16 KB (32 GB) fit the lent machine beside their outputs; the job still reads,
    sends and scores every row."""
    import shutil

    import numpy as np

    from cluster.batch import BatchJob, run_job

    data = work / "batch-input.parquet"
    distinct = np.random.default_rng(7).standard_normal((repeat or 16384, width), dtype=np.float32)  # their values do not matter
    chunk = np.tile(distinct, (max(1, 16384 // len(distinct)), 1))
    write_tensor_rows(data, (chunk[:min(len(chunk), n_rows - start)] for start in range(0, n_rows, len(chunk))), "bytes",
                      dictionary=bool(repeat))
    stored = f"input {data.stat().st_size / 1e9:.1f} GB" + (f", {repeat} distinct rows a row group, dictionary-encoded" if repeat else "")
    for rows, n in [(rows, n) for rows in part_rows or [None] for n in in_flight or [BatchJob.in_flight_per_worker]]:
        out = work / f"batch-output-{rows or 'auto'}-{n}"
        with observe(profile, min(10.0, max(2.0, n_rows / 100_000)), this_process="batch job (the bench's driver)") as observed:
            summary = run_job(BatchJob(model, str(data), str(out), batch_size=rows, in_flight_per_worker=n), controller)
        shutil.rmtree(out, ignore_errors=True)  # 16 KB a row: the next run's room
        seconds = max(summary.seconds, 1e-9)
        yield {"system": "batch-job", "variant": f"cluster.batch, {n_rows:,} rows in parts of {summary.part_rows:,}"
               f"{'' if rows else ' (its default)'}, {n} in flight, "
               f"tensors as bytes ({stored}), parts through {summary.transport}", "gpus": n_gpus,
               "batch": 256, "concurrency": n, "requests": summary.parts, "errors": 0, "duration_s": seconds,
               "req_per_s": summary.parts / seconds, "rows_per_s": summary.rows_written / seconds, "p50_ms": 0.0,
               "p99_ms": 0.0, "retries": summary.retries, "waited_s": summary.waited_s,
               "part_ms": 1000 * summary.part_seconds / max(1, summary.parts), "engines": summary.workers,
               "timeline_s": dict(summary.timeline, done=round(summary.seconds, 3)), "regions": summary.regions,
               "observed": observed}


class _Measure:
    """One system at one (batch, concurrency) on the deployed fleet."""

    def __init__(self, model: str, n_gpus: int, duration_s: float, targets: list[str], base_url: str, clients: int,
                 tool: str, profile: bool, controller) -> None:
        self.model, self.n_gpus, self.duration_s, self.targets = model, n_gpus, duration_s, targets
        self.base_url, self.clients, self.tool, self.profile = base_url, clients, tool, profile
        self.controller = controller

    def engines(self) -> AbstractContextManager[dict]:
        """What the model's engines did during the block: runs, rows, the ms a run took on its slot, the
        time queued (``cluster.batch.engines_during``, as the batch job's summary has them)."""
        from cluster.batch import engines_during

        return engines_during(self.controller, self.model)

    def _row(self, system: str, variant: str, batch: int, c: int, latencies: list[float], elapsed: float,
             observed: dict, engines: dict) -> dict:
        return {**closed_loop_row(system, variant, batch, c, latencies, elapsed, gpus=self.n_gpus, targets=self.targets,
                                  observed=observed), "engines": engines}

    def client(self, clients: list, batch: int, c: int, feeds: dict, how: str = "dataplane") -> dict:
        """The DataPlane from client actors (``c`` concurrent calls spread over them); ``how="shm"``: the
        in-cluster client with its tensors in shared memory (system "fleet-client-shm")."""
        used = clients[:min(c, len(clients))]
        shares = [c // len(used) + (1 if i < c % len(used) else 0) for i in range(len(used))]
        with observe(self.profile, self.duration_s) as observed, self.engines() as engines:
            outs = ray.get([b.run.remote(how, self.model, feeds, n, self.duration_s) for b, n in zip(used, shares)])
        system, variant = ("fleet-client-shm", "InClusterClient(shared_memory=True)") if how == "shm" else \
            ("fleet-client", "dataplane")
        return self._row(system, f"{variant}, {len(used)} client actor(s)", batch, c,
                         [x for o in outs for x in o["latencies"]], max(o["elapsed"] for o in outs), observed, engines)

    def shm(self, batch: int, c: int, feeds: dict) -> dict:
        procs = min(c, self.clients)
        with observe(self.profile, self.duration_s) as observed, self.engines() as engines:
            out = shm_client_load(self.base_url, self.model, feeds, c, self.duration_s, procs)
        return self._row("fleet-http-shm", f"FleetClient(shared_memory=True), {procs} process(es)", batch, c,
                         out["latencies"], out["elapsed"], observed, engines)

    def http_binary(self, batch: int, scale: list[int], feeds: dict) -> list[dict]:
        """KServe v2 binary over HTTP from the load generator (a separate process), every level."""
        url = f"{self.base_url}/v2/models/{self.model}/infer"
        body, headers = encode_request(feeds, binary=True)
        loadgen.run(url, body, headers, concurrency=max(scale), duration_s=2, tool=self.tool)  # warm-up
        rows = []
        for c in scale:
            with observe(self.profile, self.duration_s) as observed, self.engines() as engines:
                r = loadgen.run(url, body, headers, concurrency=c, duration_s=self.duration_s, rows_per_request=batch,
                                tool=self.tool)
            rows.append({"system": "fleet-http-binary", "variant": r.tool, "gpus": self.n_gpus, "batch": batch,
                         "targets": self.targets, **r.to_dict(), "observed": observed, "engines": engines})
        return rows


def _engines_text(engines: dict | None) -> str:
    """"runs 1.23 ms, queued 0.45 ms  " for a progress line (nothing without statistics)."""
    if not engines or not engines.get("runs"):
        return ""
    run_ms, rows, queued_ms = per_run(engines)
    return f"runs {run_ms:.2f} ms of {rows:.0f} rows, queued {queued_ms:.2f} ms  "

"""The batch job against bare ONNX Runtime on rows that are wide and cheap to compute, so that moving
the data (reading the input, the object store, the worker, the output Parquet) is what is measured.

    python -m benchmarks.batch_wide --rows 50000 --width 4096      # a Mul over [N, 4096] float32
    python -m benchmarks.batch_wide --digits --rows 200000         # the digits-mlp demo model

Bare: read the same Parquet file with pyarrow (one contiguous array per row group) and run the
same ONNX model through an ORT session on the CPU in parts of ``--batch-size``, writing nothing.
The fleet: a local fleet (configs/local.yaml) with the model built for the CPU, then ``run_job``
as ``python -m cluster.batch`` runs it (rows/s from its own Summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from cluster.env import apply_ray_env

apply_ray_env()

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from workers.cpus import usable_cpus  # noqa: E402

from benchmarks.common import write_tensor_rows  # noqa: E402
from cluster.tensor_columns import column_to_numpy  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


def make_wide_mul(path: Path, width: int) -> Path:
    """input [N, width] float32 -> output = input * 2: as wide as the big MLP, next to no compute."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "two"], ["output"])], "wide-mul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(np.array([2.0], np.float32), "two")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def write_rows(path: Path, rows: int, width: int, digits: bool, row_group: int = 16384, tensors: str = "lists") -> Path:
    """As benchmarks/gpu_fleet.py writes its batch input: one tensor column, row groups of 16,384
    (4 parts of the default 4,096 rows: the job reads up to io_threads() row groups at once, one per thread)."""
    rng = np.random.default_rng(7)
    if digits:
        from cluster.demo import digits_split
        X = digits_split()[1].astype(np.float32)

    def chunks():
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            yield X[rng.integers(0, len(X), n)] if digits else rng.standard_normal((n, width), dtype=np.float32)

    return write_tensor_rows(path, chunks(), tensors)


def bare(model: Path, data: Path, batch_size: int) -> float:
    """rows/s of pyarrow read + ORT on the CPU, in parts of batch_size."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    rows = 0
    parquet = pq.ParquetFile(data)
    for batch in parquet.iter_batches(batch_size=batch_size):
        X = column_to_numpy(batch.column(0), "input", batch.schema.field(0))
        session.run(None, {"input": X})
        rows += len(batch)
    return rows / (time.perf_counter() - started)


def fleet(model: Path, name: str, data: Path, out: Path, batch_size: int | None, max_batch: int, shared_memory: bool) -> dict:
    import ray

    from cluster.batch import BatchJob, run_job
    from cluster.buildfarm import build_on_fleet
    from cluster.config import load_config
    from cluster.deploy import deploy, teardown
    from cluster.names import NAMESPACE
    from cluster.net import free_port

    config = load_config(str(CONFIG), repository=str(out.parent / "repository"), port=free_port(), grpc_port=free_port(),
                         models={name: {"max_batch": max_batch}}, allow_client_shm=shared_memory)
    ray.init(address="local", namespace=NAMESPACE, num_cpus=usable_cpus(), log_to_driver=False,
             include_dashboard=False, logging_level=logging.ERROR)
    try:
        controller = deploy(config)
        outcomes = build_on_fleet(controller, model, model=name, max_batch=max_batch)
        assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes]
        if os.environ.get("BATCH_WIDE_PAUSE"):  # time to attach py-spy to the worker
            print(f"driver pid {os.getpid()}; pausing {os.environ['BATCH_WIDE_PAUSE']} s", flush=True)
            time.sleep(float(os.environ["BATCH_WIDE_PAUSE"]))
        cpu0 = time.process_time()  # the job's own process (reading, copies, Parquet writes): this one
        summary = run_job(BatchJob(name, str(data), str(out), batch_size=batch_size, shared_memory=None if shared_memory else False),
                          controller)
        return {**summary.to_dict(), "job_cpu_s": time.process_time() - cpu0}
    finally:
        teardown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch-size", type=int, help="rows per part (default: the job's own; bare reads 4,096 at a time)")
    p.add_argument("--row-group", type=int, default=16384, help="rows per row group of the input file (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=256, help="the wide model's max batch (the GPU run's big MLP: 256)")
    p.add_argument("--digits", action="store_true", help="the digits-mlp demo model (width 64) instead of a wide Mul")
    p.add_argument("--tensors", choices=("lists", "bytes"), default="lists",
                   help="the input's tensors as lists of numbers or as bytes (the job writes its outputs alike)")
    p.add_argument("--no-shm", action="store_true", help="parts through Ray's object store, not shared memory")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-fleet", action="store_true")
    p.add_argument("--work", default="", help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="batch-wide-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.digits:
            from cluster.demo import make_digits_mlp
            name, width, max_batch = "digits-mlp", 64, 256
            model = work / "digits-mlp.onnx"
            if not model.exists():
                make_digits_mlp(model)
        else:
            name, width, max_batch = "wide-mul", args.width, args.max_batch
            model = make_wide_mul(work / "wide-mul.onnx", width)
        data = work / f"rows-{name}-{args.rows}-{width}-rg{args.row_group}-{args.tensors}.parquet"
        if not data.exists():
            write_rows(data, args.rows, width, args.digits, args.row_group, args.tensors)
        result = {"model": name, "rows": args.rows, "width": width, "batch_size": args.batch_size, "row_group": args.row_group,
                  "tensors": args.tensors, "shared_memory": not args.no_shm,
                  "input_mb": round(data.stat().st_size / 1e6, 1)}
        if not args.skip_bare:
            result["bare_rows_per_s"] = round(bare(model, data, args.batch_size or 4096))
        if not args.skip_fleet:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            summary = fleet(model, name, data, out, args.batch_size, max_batch, not args.no_shm)
            result["batch_size"] = summary["part_rows"]
            result["job_rows_per_s"] = round(summary["rows_per_s"])
            result["job_seconds"] = round(summary["seconds"], 2)
            result["transport"] = summary["transport"]
            result["job_cpu_s"] = round(summary["job_cpu_s"], 2)  # the job's process: CPU seconds per run
            result["job_cpu_s_per_gb"] = round(summary["job_cpu_s"] / (result["input_mb"] / 1e3), 2)
            if "bare_rows_per_s" in result:
                result["vs_bare"] = round(result["job_rows_per_s"] / result["bare_rows_per_s"], 3)
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

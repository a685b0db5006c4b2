"""What each precision buys on a GPU: rows/s, device memory and accuracy against float32.

    python3 -m benchmarks.gpu_precision [--quick] [--out DIR]      (the project on PYTHONPATH)

For a compute-heavy MLP (4 x Gemm 4096 + Relu) and a convolutional network (3 convs to
256 channels on 128 x 128 images, global pooling, 1,000 classes), each built by the
fleet's own build (``workers.build.build_artifact``) for ONNX Runtime's CUDA provider at
float32, float16 and int8 (calibrated on rows of the model's input distribution, judged
on rows kept out of the calibration), then loaded into the fleet's own runner on the GPU:

- rows/s through the runner (the worker's inference path: batcher, slots) at its best
  over 1, 4 and 8 concurrent callers, at the largest batch;
- the ledger's footprint (measured by NVML while the engine loads and warms up) and NVML's
  own reading after the load;
- accuracy against float32 on the held-out rows: top-1 agreement and relative L2 error.

float32 with TF32 allowed (ONNX Runtime's ``use_tf32``) is a separate line: the same
artifact, the engine opened with ``allow_tf32``. Results: DIR/gpu-precision-<time>.json
and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cluster.console import say
from cluster.demo import make_big_mlp

from benchmarks.common import REPO_ROOT

CALLERS = (1, 4, 8)


def make_cnn_wide(path: Path, classes: int = 1000, seed: int = 0) -> Path:
    """Conv(3->64)-Relu-Pool-Conv(64->128)-Relu-Pool-Conv(128->256)-Relu-GlobalAvgPool-Gemm(->classes), [N,3,128,128]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "input"
    for i, (cin, cout) in enumerate(((3, 64), (64, 128), (128, 256))):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
        if i < 2:
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"p{i}"
    fc = (rng.standard_normal((classes, 256)) / 16).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "cnn-wide", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 128, 128])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def model_rows(name: str, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "big-mlp":
        return rng.standard_normal((rows, 4096)).astype(np.float32)
    return rng.random((rows, 3, 128, 128), dtype=np.float32)


def build(source: Path, name: str, precision: str, batch: int, out: Path, calibration, heldout: np.ndarray):
    import onnxruntime as ort

    from workers.build import BuildRequest, EvalData, build_artifact
    from workers.targets import Target

    target = Target("onnxruntime", ort.__version__, provider="cuda", precision=precision)
    request = BuildRequest(str(source), name, target, max_batch=batch, accept_accuracy_loss=True)
    evaluation = EvalData({"input": heldout}, judged_on=f"{len(heldout)} held-out rows")
    return build_artifact(request, out, calibration=calibration if precision == "int8" else None, evaluation=evaluation)


def callers_best(call, feeds: dict, duration_s: float) -> tuple[float, int]:
    """Best rows/s over 1, 4 and 8 concurrent callers of ``call(feeds)``, and at how many."""
    rows = len(feeds["input"])
    best = (0.0, 0)
    for callers in CALLERS:
        count = [0] * callers
        start = threading.Barrier(callers + 1)

        def loop(i: int) -> None:
            start.wait()
            end = time.perf_counter() + duration_s
            while time.perf_counter() < end:
                call(feeds)
                count[i] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        best = max(best, (sum(count) * rows / (time.perf_counter() - t0), callers))
    return best


def measure_loaded(manifest, directory: Path, feeds: dict, duration_s: float) -> dict:
    """Load into the fleet's runner on GPU 0 (NVML measures the load), then drive it."""
    import onnxruntime as ort

    from workers.devices import discover_devices, nvml_used_bytes
    from workers.engines.onnxruntime import limit_cublas_workspace
    from workers.kserve.codec import InferRequest
    from workers.runner import EngineRunner
    from workers.targets import Runtime, WorkerCaps

    limit_cublas_workspace()  # as a worker does, before its first CUDA session
    device = discover_devices()[0]
    caps = WorkerCaps("bench", device, (Runtime("onnxruntime", ort.__version__, "cuda"),))
    baseline = nvml_used_bytes(device.uuid)
    runner = EngineRunner(caps, int(device.total_memory_bytes * 0.9), slots=4,
                          memory_probe=lambda: nvml_used_bytes(device.uuid))
    try:
        entry = runner.load(manifest, directory / manifest.artifact_file)
        nvml_delta = nvml_used_bytes(device.uuid) - baseline
        rows_per_s, callers = callers_best(lambda f: runner.infer(InferRequest(f), manifest.model), feeds, duration_s)
    finally:
        runner.close()
    return {"rows_per_s": rows_per_s, "callers": callers, "ledger_footprint_bytes": entry["footprint_bytes"],
            "nvml_delta_bytes": nvml_delta}


def measure_tf32(directory: Path, heldout: np.ndarray, reference: dict, feeds: dict, duration_s: float) -> dict:
    """The float32 artifact with TF32 allowed: accuracy on the held-out rows, then its speed."""
    from workers.engines.onnxruntime import OnnxRuntimeEngine
    from workers.precision import compare_outputs

    with OnnxRuntimeEngine(directory / "model.onnx", provider="cuda", allow_tf32=True) as engine:
        metrics = compare_outputs(reference, engine.run({"input": heldout}))
        rows_per_s, callers = callers_best(engine.run, feeds, duration_s)
    return {"rows_per_s": rows_per_s, "callers": callers, "rel_l2_error": metrics.get("rel_l2_error"),
            "top1_agreement": metrics.get("top1_agreement")}


def run_model_set(name: str, source: Path, batch: int, sizes: tuple[int, int], work: Path, duration_s: float) -> list[dict]:
    from workers import precision

    calib_rows, heldout_rows = sizes
    data = model_rows(name, calib_rows + heldout_rows, seed=1)
    calib, heldout = data[:calib_rows], data[calib_rows:]
    say(f"{name}: calibrating on {calib_rows} rows (minmax) ...")
    calibration = precision.calibrate(source, [{"input": calib[i:i + 64]} for i in range(0, calib_rows, 64)], "minmax")
    feeds = {"input": model_rows(name, batch, seed=2)}
    rows = []
    for mode in ("float32", "float16", "int8"):
        say(f"{name}: building {mode} for ONNX Runtime CUDA ...")
        out = work / f"{name}-{mode}"
        manifest = build(source, name, mode, batch, out, calibration, heldout)
        measured = measure_loaded(manifest, out, feeds, duration_s)
        acc = manifest.accuracy
        rows.append({"model": name, "precision": mode, "batch": batch, **measured,
                     "rel_l2_error": acc.get("rel_l2_error"), "top1_agreement": acc.get("top1_agreement"),
                     "judged_on": acc.get("eval_data")})
        say(f"  {mode}: {measured['rows_per_s']:,.0f} rows/s ({measured['callers']} callers), "
            f"ledger {measured['ledger_footprint_bytes'] / 2**20:,.0f} MiB, NVML {measured['nvml_delta_bytes'] / 2**20:,.0f} MiB, "
            f"rel_l2 {acc.get('rel_l2_error')}, top1 {acc.get('top1_agreement')}")
        if mode == "float32":
            tf32 = measure_tf32(out, heldout, precision.run_model(source, {"input": heldout}), feeds, duration_s)
            rows.append({"model": name, "precision": "float32 (TF32 allowed)", "batch": batch, **tf32,
                         "judged_on": f"{len(heldout)} held-out rows"})
            say(f"  float32 + TF32: {tf32['rows_per_s']:,.0f} rows/s, rel_l2 {tf32['rel_l2_error']}")
    return rows


def _num(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | precision | batch | rows/s (callers) | vs float32 | ledger MiB | NVML MiB | ledger vs float32 | "
             "top-1 agreement | rel L2 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["model"]: r for r in rows if r["precision"] == "float32"}
    for r in rows:
        b = base[r["model"]]
        ledger, nvml = r.get("ledger_footprint_bytes"), r.get("nvml_delta_bytes")
        memory = (f"{ledger / 2**20:,.0f} | {nvml / 2**20:,.0f} | {ledger / b['ledger_footprint_bytes']:.2f}x"
                  if ledger else "(the float32 engine) | | ")
        lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['rows_per_s']:,.0f} ({r['callers']}) | "
                     f"{r['rows_per_s'] / b['rows_per_s']:.2f}x | {memory} | {_num(r.get('top1_agreement'), '.4f')} | "
                     f"{_num(r.get('rel_l2_error'), '.2e')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s per level instead of 5")
    p.add_argument("--models", default="big-mlp,cnn-wide")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench-results"))
    args = p.parse_args(argv)
    from benchmarks.gpu import cuda_gpus_or_say

    names = cuda_gpus_or_say("gpu_precision")
    if names is None:
        return 2
    duration = 2.0 if args.quick else 5.0
    work = Path(tempfile.mkdtemp(prefix="gpu-precision-"))
    # model -> (maker, batch, (calibration rows, held-out rows)); the CNN's CPU reference runs are slow
    makers = {"big-mlp": (make_big_mlp, 256, (512, 256)), "cnn-wide": (make_cnn_wide, 64, (128, 64))}
    rows: list[dict] = []
    for name in args.models.split(","):
        maker, batch, sizes = makers[name]
        rows += run_model_set(name, maker(work / f"{name}.onnx"), batch, sizes, work, duration)
    doc = {"schema": "forward-fleet-gpu-precision/1", "gpu": names[0], "started": dt.datetime.now().isoformat(timespec="seconds"),
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-precision-{dt.datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print("\n".join(table(rows)))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

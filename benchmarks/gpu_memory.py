"""Where an engine's device memory goes: the first engine of a kind in a process against the next ones.

    python3 -m benchmarks.gpu_memory [--out DIR]      (the project on PYTHONPATH, a GPU)

For the big MLP (4 x Gemm 4096 + Relu) at float32 and float16, each built by the fleet's own
build for ONNX Runtime CUDA, this loads engines one after another into one fresh process per
order (float32 first, float16 first) and records NVML's used memory after each load and warm-up
at batch 256: the first engine of a process pays for what every later one shares (the CUDA
libraries' handles, workspaces and kernels), the next ones only for themselves. Results:
DIR/gpu-memory-<time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT

MiB = 2**20


def _child(order: list[str], dirs: dict[str, str]) -> list[dict]:
    """In a fresh process: load ``order``'s engines one by one, NVML after each (never closing any)."""
    from workers.devices import discover_devices, nvml_used_bytes
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    device = discover_devices()[0]
    feeds = {"input": np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)}
    before = nvml_used_bytes(device.uuid)
    engines, rows = [], []
    for mode in order:
        engine = OnnxRuntimeEngine(Path(dirs[mode]) / "model.onnx", provider="cuda")
        engine.activate()
        engine.run(feeds)
        engines.append(engine)
        after = nvml_used_bytes(device.uuid)
        rows.append({"precision": mode, "delta_mib": round((after - before) / MiB, 1)})
        before = after
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench-results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_child(spec["order"], spec["dirs"])))
        return 0
    import onnxruntime as ort

    from cluster.demo import make_big_mlp
    from workers.build import BuildRequest, build_artifact
    from workers.targets import Target

    work = Path(tempfile.mkdtemp(prefix="gpu-memory-"))
    source = make_big_mlp(work / "big-mlp.onnx")
    dirs = {}
    for mode in ("float32", "float16"):
        target = Target("onnxruntime", ort.__version__, provider="cuda", precision=mode)
        build_artifact(BuildRequest(str(source), "big-mlp", target, max_batch=256, accept_accuracy_loss=True),
                       work / mode)
        dirs[mode] = str(work / mode)
    results = {}
    for name, order in (("float32 first", ["float32", "float32", "float32", "float16", "float16", "float16"]),
                        ("float16 first", ["float16", "float16", "float16", "float32", "float32", "float32"])):
        spec = json.dumps({"order": order, "dirs": dirs})
        out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_memory", "--child", spec], capture_output=True,
                             text=True, cwd=REPO_ROOT, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: " + ", ".join(f"{r['precision']} +{r['delta_mib']:.0f} MiB" for r in results[name]), flush=True)
    doc = {"schema": "forward-fleet-gpu-memory/1", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "onnxruntime": ort.__version__, "model": "big-mlp 4 x Gemm 4096 + Relu, batch 256", "orders": results}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-memory-{doc['time'][:19].replace(':', '-')}.json"
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

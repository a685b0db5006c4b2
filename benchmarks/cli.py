"""forward-fleet benchmarks: the serving path against what users would pick instead.

Runs, one after another in one invocation, on the same models and machine (each
phase in its own process, fully torn down before the next):

  bare          ONNX Runtime in-process at batch 1 and max batch (the machine's limit)
  fleet-http    the fleet's KServe v2 endpoint, binary and JSON, driven by a separate
                closed-loop load generator (wrk, else benchmarks/loadgen.py) at fixed concurrency
  fleet-levers  the same fleet without its front door (HTTP through Ray Serve's ingress),
                under each of Serve's modes: classic proxy, direct ingress, throughput-optimized + HAProxy
  fleet-client  from inside the cluster, no HTTP: through the DataPlane (route + worker
                call, what the ingress does) and straight at the worker (as the batch job)
  naive-serve   a plain ten-minute Ray Serve deployment (one replica, ONNX Runtime, JSON),
                in Serve's default mode and its throughput-optimized + HAProxy mode
  triton        the same models behind Triton via PyTriton (in its own environment)
  router        Router.choose alone, 1,000 simulated workers x 200 models
  cold-start    `fleet up --demo` to the first good inference
  profile       CPU per process and py-spy of the ingress during a digits-mlp run

Writes bench-results/<timestamp>.json and .png, prints the table and the issue 7
targets. ``--quick`` shortens every run (smoke test, ~3 minutes).

    fleet bench -- [--quick] [--phases bare,router,...] [--triton-python PATH] [--pin 0-7:8-15]
    .venv/bin/python scripts/bench.py [same options]

``--pin FLEET_CPUS:LOADGEN_CPUS`` (taskset's list syntax) runs this process and all it starts
(phases, Ray, the fleet, HAProxy, bare ONNX Runtime) on FLEET_CPUS, and the load generator on
LOADGEN_CPUS; thread and slot counts follow the cores each has. On a GPU host, the CPU
bench with the fleet on the CPU only (no GPU worker):

    CUDA_VISIBLE_DEVICES= python3 scripts/bench.py --phases bare,fleet-http --models cnn-small \
        --pin 0-7:8-15 --loadgen wrk
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from workers.cpus import usable_cpus

from benchmarks import loadgen, report
from benchmarks.loadgen import format_cpu_list, parse_cpu_list
from benchmarks.ceiling import ceiling
from benchmarks.common import DEFAULT_OUT, MODELS, REPO_ROOT, prepare, progress
from benchmarks.phases import PHASES
from benchmarks.plans import Context
from benchmarks.runner import run_phase
from benchmarks.serve_modes import shipped_mode

ALL_PHASES = PHASES
QUICK_DEFAULT_PHASES = ("bare", "fleet-http", "fleet-client", "naive-serve", "triton", "router", "cold-start")
HTTP_PHASES = {"fleet-http", "fleet-levers", "naive-serve", "triton", "profile"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="short runs and fewer levels (smoke test)")
    p.add_argument("--phases", default="", help=f"comma-separated subset of: {', '.join(ALL_PHASES)} (default: all; "
                   f"with --quick: {', '.join(QUICK_DEFAULT_PHASES)})")
    p.add_argument("--models", default="digits-mlp,cnn-small", help="comma-separated (default %(default)s)")
    p.add_argument("--duration", type=float, help="seconds per load level (default 4, quick 2)")
    p.add_argument("--loadgen", default="auto", choices=("auto", "wrk", "python"),
                   help="load generator: wrk (apt-get install wrk) or the asyncio one in benchmarks/loadgen.py")
    p.add_argument("--triton-python", default=os.environ.get("FLEET_BENCH_TRITON_PYTHON"),
                   help="python of an environment with nvidia-pytriton (default: $FLEET_BENCH_TRITON_PYTHON, "
                        "else this python if it has pytriton)")
    p.add_argument("--pin", metavar="FLEET_CPUS:LOADGEN_CPUS",
                   help="run the bench, Ray, the fleet and bare on FLEET_CPUS and the load generator on LOADGEN_CPUS "
                        "(taskset list syntax, e.g. 0-7:8-15); default: no pinning")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default bench-results/)")
    p.add_argument("--retries", type=int, default=1, help="times a failed phase is run again (default %(default)s)")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--slots", type=int, default=0,
                   help="the fleet's slots, concurrent runs per engine (default: the fleet config's)")
    args = p.parse_args(argv)
    chosen = [x.strip() for x in args.phases.split(",") if x.strip()] or list(QUICK_DEFAULT_PHASES if args.quick else ALL_PHASES)
    unknown = [x for x in chosen if x not in ALL_PHASES]
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(ALL_PHASES)}")
    args.phase_list = [x for x in ALL_PHASES if x in chosen]
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    if args.duration is None:
        args.duration = 2.0 if args.quick else 4.0
    try:
        args.pin = parse_pin(args.pin) if args.pin else None
    except ValueError as exc:
        p.error(str(exc))
    return args


def parse_pin(text: str, available: frozenset[int] | None = None) -> tuple[frozenset[int], frozenset[int]]:
    """"0-7:8-15" -> (fleet cores, load generator cores): two non-empty, disjoint sets of the cores
    this process may use (``available``, default its affinity mask); ValueError saying what is wrong."""
    fleet_text, colon, loadgen_text = text.partition(":")
    if not colon or not fleet_text.strip() or not loadgen_text.strip():
        raise ValueError(f"--pin {text!r}: expected FLEET_CPUS:LOADGEN_CPUS, e.g. 0-7:8-15")
    fleet, gen = parse_cpu_list(fleet_text), parse_cpu_list(loadgen_text)
    if fleet & gen:
        raise ValueError(f"--pin {text!r}: the fleet and the load generator share core(s) {format_cpu_list(fleet & gen)}")
    available = frozenset(os.sched_getaffinity(0)) if available is None else available
    missing = (fleet | gen) - available
    if missing:
        raise ValueError(f"--pin {text!r}: core(s) {format_cpu_list(missing)} are not available to this process "
                         f"(it may use {format_cpu_list(available)})")
    return fleet, gen


def apply_pin(pin: tuple[frozenset[int], frozenset[int]] | None) -> dict | None:
    """Move this process onto the fleet's cores (what it starts inherits them) and name the load
    generator's in the environment the phases inherit (``benchmarks.loadgen`` pins its child)."""
    if pin is None:
        os.environ.pop(loadgen.CPUS_ENV, None)
        return None
    fleet, gen = pin
    os.sched_setaffinity(0, fleet)
    os.environ[loadgen.CPUS_ENV] = format_cpu_list(gen)
    return {"fleet_cpus": format_cpu_list(fleet), "loadgen_cpus": format_cpu_list(gen), "fleet_cores": len(fleet),
            "loadgen_cores": len(gen)}


def git_info() -> dict:
    """The commit measured, and the files that differed from it (others may edit while it runs)."""
    def git(*args):
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no") or ""
    return {"commit": (git("rev-parse", "--short", "HEAD") or "").strip() or None,
            "subject": (git("log", "-1", "--format=%s") or "").strip() or None,
            "modified": [ln[3:] for ln in status.splitlines() if len(ln) > 3]}


def host_info() -> dict:
    import numpy
    import onnxruntime
    import ray  # only its version: this process never starts Ray

    return {"cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "platform": platform.platform(), "python": platform.python_version(),
            "ray": ray.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``argv`` as on the command line, without the program name).

    Returns 0 when every phase ran (ok, partial or skipped), 1 otherwise. ``fleet bench``
    calls this, as does scripts/bench.py.
    """
    args = parse_args(argv)
    pin = apply_pin(args.pin)  # first: everything below, and all it starts, runs on the fleet's cores
    out_dir = Path(args.out).resolve()
    workdir = out_dir / "work"
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    t0 = time.monotonic()
    doc: dict = {"schema": report.SCHEMA, "started": stamp, "quick": args.quick, "host": host_info(),
                 "git": git_info(),
                 "args": {"phases": args.phase_list, "models": args.model_list, "duration_s": args.duration,
                          "loadgen": args.loadgen, "slots": args.slots or None}, "pin": pin, "phases": {}}
    if pin:
        progress(f"pinned: the bench, Ray, the fleet and bare on cores {pin['fleet_cpus']}, "
                 f"the load generator on {pin['loadgen_cpus']}")
    progress(f"preparing models, artifacts and request bodies in {workdir} ...")
    ctx = Context(args.quick, args.model_list, args.duration, loadgen.pick_tool(args.loadgen),
                  prepare(workdir, args.model_list), workdir, args.triton_python, args.slots)
    doc["loadgen"] = {"tool": ctx.tool}
    doc["fleet_serve_mode"] = shipped_mode()
    if HTTP_PHASES & set(args.phase_list):
        doc["loadgen"]["ceiling"] = _ceiling(ctx)
    for name in args.phase_list:
        doc["phases"][name] = _run_with_retry(name, ctx, args.retries)
    doc["seconds"] = time.monotonic() - t0
    doc["git_at_end"] = git_info()
    doc["finished"] = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    doc["targets"] = report.evaluate_targets(doc)
    for problem in report.validate(doc):
        progress(f"result document: {problem}")
    _write(doc, out_dir, stamp, chart=not args.no_chart)
    progress(f"done in {doc['seconds']:.0f} s")
    return 0 if all(p["status"] in ("ok", "partial", "skipped") for p in doc["phases"].values()) else 1


def _ceiling(ctx: Context) -> dict:
    progress(f"measuring the load generator's own ceiling ({ctx.tool}) ...")
    try:
        result = ceiling(ctx.tool, concurrency=32, duration_s=2 if ctx.quick else 3)
    except Exception as exc:  # noqa: BLE001 (the benchmark goes on without it)
        return {"error": str(exc)}
    progress(f"load generator ceiling: {result.get('req_per_s', 0):,.0f} req/s")
    return result


def _run_with_retry(name: str, ctx: Context, retries: int) -> dict:
    progress(f"=== {name} ===")
    result = run_phase(name, ctx, retries)
    if result["status"] == "error" and retries > 0:
        # A shared host can take a phase's Ray away under it (another user's `ray stop`,
        # an overloaded GCS at start-up): try once more and keep the first error.
        progress(f"=== {name}: retrying once after: {result.get('error')} ===")
        first = result
        result = run_phase(name, ctx, retries)
        result["first_attempt"] = {"error": first.get("error"), "seconds": first["seconds"]}
    progress(f"=== {name}: {result['status']} in {result['seconds']:.0f} s ===")
    return result


def _write(doc: dict, out_dir: Path, stamp: str, chart: bool) -> None:
    """The JSON document and the chart in ``out_dir``; the tables on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    if doc.get("pin"):
        pin = doc["pin"]
        print(f"pinned: bench, Ray, fleet, HAProxy and bare on cores {pin['fleet_cpus']} ({pin['fleet_cores']}); "
              f"load generator on {pin['loadgen_cpus']} ({pin['loadgen_cores']}) of {doc['host']['cpus']}\n")
    print(report.markdown_table(doc))
    print()
    print(report.targets_table(doc["targets"]))
    print()
    print(report.phase_summary(doc))
    print(f"\nresults: {json_path}")
    if chart:
        try:
            print(f"chart:   {report.write_chart(doc, out_dir / f'{stamp}.png')}")
        except ImportError:
            print("chart:   skipped (matplotlib is not installed)")


if __name__ == "__main__":
    sys.exit(main())

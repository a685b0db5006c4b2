#!/usr/bin/env python3
"""forward-fleet benchmarks: the serving path against what users would pick instead.

Runs, one after another in one invocation, on the same models and machine (each
phase in its own process, fully torn down before the next):

  bare          ONNX Runtime in-process at batch 1 and max batch (the machine's limit)
  fleet-http    the fleet's KServe v2 endpoint, binary and JSON, driven by a separate
                closed-loop load generator (wrk, else scripts/loadgen.py) at fixed concurrency
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

    .venv/bin/python scripts/bench.py [--quick] [--phases bare,router,...] [--triton-python PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_report  # noqa: E402
import loadgen  # noqa: E402
from bench_common import DEFAULT_OUT, MODELS, REPO_ROOT, prepare  # noqa: E402

ALL_PHASES = ("bare", "fleet-http", "fleet-levers", "fleet-client", "naive-serve", "triton", "router", "cold-start",
              "profile")
QUICK_DEFAULT_PHASES = ("bare", "fleet-http", "fleet-client", "naive-serve", "triton", "router", "cold-start")

# Ray Serve 2.60's switches (ray/serve/_private/constants.py). They are read at import
# time in every Serve process, so each mode runs in a fresh Ray. Every mode names all
# three, so cluster.env's defaults (setdefault) cannot change what a mode means.
SERVE_SWITCHES = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS")
SERVE_MODES = {
    "classic-proxy": dict.fromkeys(SERVE_SWITCHES, "0"),
    "direct-ingress": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0",
                       "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "throughput-optimized+haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                                     "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
}
# Direct-ingress replicas otherwise drain for 30 s + 5 s on delete; a benchmark has no
# clients to protect at teardown. (Shutdown only: no effect on the measured path.)
TEARDOWN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
PHASE_TIMEOUT_S = 420


def mode_of(env: dict) -> str:
    """Which SERVE_MODES entry an environment amounts to (as bench_phases.serve_mode reads it)."""
    on = lambda k: env.get(k) == "1"  # noqa: E731
    if on("RAY_SERVE_ENABLE_HA_PROXY"):
        return "throughput-optimized+haproxy" if on("RAY_SERVE_THROUGHPUT_OPTIMIZED") else "haproxy"
    if on("RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        return "throughput-optimized"
    return "direct-ingress" if on("RAY_SERVE_ENABLE_DIRECT_INGRESS") else "classic-proxy"


def shipped_mode() -> str:
    """The Serve mode the fleet runs in by default: what cluster.env.ray_env() sets when the
    caller's shell sets none of the switches."""
    from cluster.env import ray_env

    saved = {k: os.environ.pop(k) for k in SERVE_SWITCHES if k in os.environ}
    try:
        return mode_of(ray_env())
    finally:
        os.environ.update(saved)


def serve_env(mode: str | None, base: dict, scratch: Path) -> dict:
    """The environment of a phase process running Ray Serve in ``mode``.

    HAProxy mode keeps its config, admin socket and state under /tmp/haproxy-serve by
    default, shared by every Serve on the host: give each run its own directory so a
    benchmark never rewrites another Ray's HAProxy (or the other way round). Serve adds
    a 56-character subdirectory and HAProxy takes socket paths of at most 97 characters,
    so the directory must be short (``scratch`` is /tmp/ffb-XXXXXXXX).
    """
    env = dict(base, **(SERVE_MODES[mode] if mode else {}), **TEARDOWN_ENV)
    if "haproxy" in (mode or shipped_mode()):
        hap = scratch
        from bench_common import free_port

        env.update(
            # fixed ports by default (8404, 9101) on all interfaces: one HAProxy per host
            RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(hap / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(hap / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(hap),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(hap / "server-state"),
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=str(hap / "metrics.sock"),
        )
    return env


def levels_for(phase: str, quick: bool) -> dict:
    """Concurrency levels per model (and per model/protocol) for each HTTP phase.

    cnn-small as JSON is a 15 MB body (about a second a request): full runs only.
    """
    digits = [1, 32] if quick else [1, 8, 32]
    cnn = [8] if quick else [1, 8]
    cnn_json = [] if quick else [2]
    if phase == "fleet-http":
        return {"digits-mlp": digits, "cnn-small/binary": cnn, "cnn-small/json": cnn_json}
    if phase == "fleet-levers":
        return {"digits-mlp/binary": digits, "digits-mlp/json": [], "cnn-small/binary": [8], "cnn-small/json": []}
    if phase == "fleet-client":
        return {"digits-mlp": digits, "cnn-small": [8]}
    if phase == "naive-serve":  # JSON only
        return {"digits-mlp": digits, "cnn-small": cnn_json}
    if phase == "triton":
        return {"digits-mlp/binary": digits, "digits-mlp/json": [32] if quick else digits, "cnn-small/binary": cnn,
                "cnn-small/json": cnn_json}
    return {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="short runs and fewer levels (smoke test)")
    p.add_argument("--phases", default="", help=f"comma-separated subset of: {', '.join(ALL_PHASES)} (default: all; "
                   f"with --quick: {', '.join(QUICK_DEFAULT_PHASES)})")
    p.add_argument("--models", default="digits-mlp,cnn-small", help="comma-separated (default %(default)s)")
    p.add_argument("--duration", type=float, help="seconds per load level (default 4, quick 2)")
    p.add_argument("--loadgen", default="auto", choices=("auto", "wrk", "python"),
                   help="load generator: wrk (apt-get install wrk) or the asyncio one in scripts/loadgen.py")
    p.add_argument("--triton-python", default=os.environ.get("FLEET_BENCH_TRITON_PYTHON"),
                   help="python of an environment with nvidia-pytriton (default: $FLEET_BENCH_TRITON_PYTHON, "
                        "else this python if it has pytriton)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default bench-results/)")
    p.add_argument("--retries", type=int, default=1, help="times a failed phase is run again (default %(default)s)")
    p.add_argument("--no-chart", action="store_true")
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
    return args


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _run_phase_process(cmd: list[str], spec: dict, env: dict, timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-spec-", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        proc = subprocess.Popen([*cmd, spec_path], stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                                cwd=REPO_ROOT, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the phase process and what it started (its own session)
            proc.communicate()
            raise RuntimeError(f"timed out after {timeout_s:.0f} s") from None
        line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"exited {proc.returncode} without a result")
        return json.loads(line[len("BENCH_RESULT "):])
    finally:
        os.unlink(spec_path)


def _triton_python(args) -> tuple[str | None, str]:
    if args.triton_python:
        return args.triton_python, ""
    probe = subprocess.run([sys.executable, "-c", "import pytriton"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable, ""
    return None, ("nvidia-pytriton is not installed here; it pins numpy<2, so install it in its own venv "
                  "(python -m venv V && V/bin/pip install nvidia-pytriton==0.7.0 onnxruntime) and pass "
                  "--triton-python V/bin/python")


def run_phase(name: str, args, prepared: dict, workdir: Path) -> dict:
    base = {"prepared": prepared, "models": args.model_list, "duration_s": args.duration,
            "warmup_s": 1 if args.quick else 2, "loadgen": args.tool, "quick": args.quick}
    env = dict(os.environ)
    for k in SERVE_SWITCHES:  # never inherit a mode from the caller's shell
        env.pop(k, None)
    phases_py = [sys.executable, str(HERE / "bench_phases.py")]
    scratch = Path(tempfile.mkdtemp(prefix="ffb-", dir="/tmp"))  # short: HAProxy's unix sockets live here
    t0 = time.monotonic()
    out: dict = {"rows": [], "runs": []}
    try:
        if name == "bare":
            out.update(_run_phase_process([*phases_py, "bare"], dict(base, duration_s=1.0 if args.quick else 3.0), env, 120))
        elif name == "router":
            spec = dict(base, workers=1000, n_models=200, decisions=5000 if args.quick else 20000)
            out.update(_run_phase_process([*phases_py, "router"], spec, env, 300))
        elif name == "cold-start":
            spec = dict(base, prepared=prepare(workdir, ["digits-mlp"]) if "digits-mlp" not in prepared["models"] else prepared)
            out.update(_run_phase_process([*phases_py, "cold-start"], spec, serve_env(None, env, scratch), 300))
        elif name == "profile":
            spec = dict(base, duration_s=min(6.0, max(3.0, args.duration)), profile_dir=str(workdir / "profile"))
            out["profiles"] = {}
            # the fleet as shipped (front door), and without it in the Serve mode it shipped before
            for label, mode, front in (("front door", None, "1"),
                                       ("no front door, throughput-optimized+haproxy", "throughput-optimized+haproxy", "0")):
                res = _run_phase_process([*phases_py, "profile"], spec,
                                         dict(serve_env(mode, env, scratch), FLEET_BENCH_FRONT_DOOR=front), 300)
                out["profiles"][label] = res.get("info", {})
        elif name == "fleet-client":
            out.update(_run_phase_process([*phases_py, "fleet-client"], dict(base, levels=levels_for(name, args.quick)),
                                          serve_env(None, env, scratch), PHASE_TIMEOUT_S))
        elif name == "triton":
            python, reason = _triton_python(args)
            if python is None:
                shutil.rmtree(scratch, ignore_errors=True)
                return {"status": "skipped", "reason": reason, "seconds": 0.0, "rows": []}
            spec = dict(base, levels=levels_for(name, args.quick), answers_dir=str(workdir / "answers"))
            res = _run_phase_process([python, str(HERE / "bench_triton.py")], spec, env, PHASE_TIMEOUT_S)
            from bench_phases import check_answer

            wrong = {}
            for key, ans in res.get("answers", {}).items():
                model = key.split("/")[0]
                problem = check_answer(model, Path(ans["path"]).read_bytes(), ans["headers"], prepared)
                if problem:
                    wrong[key] = problem
            res["verified"] = not wrong
            if wrong:
                res["wrong_answers"] = wrong
            if not res.get("incidents"):
                res.pop("incidents", None)
            out.update(res)
        else:  # HTTP phases under Serve modes (None: the fleet as shipped, cluster.env decides)
            shipped = shipped_mode()
            table: dict[str, list[str | None]] = {
                "fleet-http": [None],
                "fleet-levers": list(SERVE_MODES),
                "naive-serve": ["classic-proxy", "throughput-optimized+haproxy"]}
            modes = table[name]
            kind = "naive-serve" if name == "naive-serve" else "fleet-http"
            for mode in modes:
                mode_env = serve_env(mode, env, scratch)
                spec = dict(base, levels=levels_for(name, args.quick), shipped=mode is None)
                if name == "fleet-levers":
                    mode_env["FLEET_BENCH_FRONT_DOOR"] = "0"
                    spec["protocols"] = ["binary"]
                try:
                    try:
                        res = _run_phase_process([*phases_py, kind], spec, mode_env, PHASE_TIMEOUT_S)
                    except RuntimeError as exc:
                        if args.retries < 1:
                            raise
                        say(f"{name} [{mode or 'as shipped'}] failed ({exc}); retrying once")
                        res = _run_phase_process([*phases_py, kind], spec, mode_env, PHASE_TIMEOUT_S)
                        res.setdefault("info", {})["first_attempt_error"] = str(exc)
                    out["rows"] += res.get("rows", [])
                    out["runs"].append({"mode": mode or f"as shipped ({shipped})", "status": "ok", **res.get("info", {})})
                except Exception as exc:  # one mode failing must not hide the others
                    say(f"{name} [{mode or 'as shipped'}] failed: {exc}")
                    out["runs"].append({"mode": mode or f"as shipped ({shipped})", "status": "error", "error": str(exc)})
            if not out["rows"]:
                raise RuntimeError("; ".join(r.get("error", "") for r in out["runs"]) or "no results")
        status = "ok"
        if out.get("incidents") or any(r.get("status") == "error" for r in out.get("runs", [])):
            status = "partial"
        if name == "triton" and not out.get("verified", True):
            status = "wrong answers"
        out.update(status=status)
    except Exception as exc:  # noqa: BLE001 (report and go on with the next phase)
        say(f"phase {name} failed: {exc}")
        out.update(status="error", error=str(exc))
    shutil.rmtree(scratch, ignore_errors=True)
    out["seconds"] = time.monotonic() - t0
    if not out["runs"]:
        out.pop("runs")
    return out


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
    import ray

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "ray": ray.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``argv`` as on the command line, without the program name).

    Returns 0 when every phase ran (ok, partial or skipped), 1 otherwise. For
    ``fleet bench``: load this file (importlib, or scripts/ on sys.path) and call main.
    """
    args = parse_args(argv)
    out_dir = Path(args.out).resolve()
    workdir = out_dir / "work"
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    t0 = time.monotonic()
    doc: dict = {"schema": bench_report.SCHEMA, "started": stamp, "quick": args.quick, "host": host_info(),
                 "git": git_info(),
                 "args": {"phases": args.phase_list, "models": args.model_list, "duration_s": args.duration,
                          "loadgen": args.loadgen}, "phases": {}}
    say(f"preparing models, artifacts and request bodies in {workdir} ...")
    prepared = prepare(workdir, args.model_list)
    args.tool = loadgen.pick_tool(args.loadgen)
    http_phases = {"fleet-http", "fleet-levers", "naive-serve", "triton", "profile"} & set(args.phase_list)
    doc["loadgen"] = {"tool": args.tool}
    doc["fleet_serve_mode"] = shipped_mode()
    if http_phases:
        say(f"measuring the load generator's own ceiling ({args.tool}) ...")
        try:
            doc["loadgen"]["ceiling"] = loadgen.ceiling(args.tool, concurrency=32, duration_s=2 if args.quick else 3)
            say(f"load generator ceiling: {doc['loadgen']['ceiling'].get('req_per_s', 0):,.0f} req/s")
        except Exception as exc:  # noqa: BLE001
            doc["loadgen"]["ceiling"] = {"error": str(exc)}
    for name in args.phase_list:
        say(f"=== {name} ===")
        doc["phases"][name] = run_phase(name, args, prepared, workdir)
        if doc["phases"][name]["status"] == "error" and args.retries > 0:
            # A shared host can take a phase's Ray away under it (another user's `ray stop`,
            # an overloaded GCS at start-up): try once more and keep the first error.
            first = doc["phases"][name]
            say(f"=== {name}: retrying once after: {first.get('error')} ===")
            doc["phases"][name] = run_phase(name, args, prepared, workdir)
            doc["phases"][name]["first_attempt"] = {"error": first.get("error"), "seconds": first["seconds"]}
        say(f"=== {name}: {doc['phases'][name]['status']} in {doc['phases'][name]['seconds']:.0f} s ===")
    doc["seconds"] = time.monotonic() - t0
    doc["git_at_end"] = git_info()
    doc["finished"] = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    doc["targets"] = bench_report.evaluate_targets(doc)
    for problem in bench_report.validate(doc):
        say(f"result document: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    print(bench_report.markdown_table(doc))
    print()
    print(bench_report.targets_table(doc["targets"]))
    print()
    print(bench_report.phase_summary(doc))
    print(f"\nresults: {json_path}")
    if not args.no_chart:
        try:
            print(f"chart:   {bench_report.write_chart(doc, out_dir / f'{stamp}.png')}")
        except ImportError:
            print("chart:   skipped (matplotlib is not installed)")
    say(f"done in {doc['seconds']:.0f} s")
    return 0 if all(p["status"] in ("ok", "partial", "skipped") for p in doc["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

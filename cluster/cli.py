"""``fleet``: start, inspect and use a forward-fleet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from workers.errors import FleetError
from workers.ledger import format_bytes
from workers.manifest import sha256_file

from cluster.cli_hosts import add_host_commands
from cluster.client import FleetClient
from cluster.client_tls import ClientTls
from cluster.console import say
from cluster.custom_ops_view import print_custom_ops
from cluster.env import apply_ray_env, fleet_token
from cluster.fleet_commands import add_commands as add_fleet_commands, print_rollout, print_runtime_problems
from cluster.triton.commands import add_commands as add_triton_commands

DEMO_MODEL_DIR = Path("models")
ACCURACY_COLUMNS = ("test_accuracy", "reference_accuracy", "top1_agreement", "rel_l2_error", "max_abs_error")
# First row of the digits test split (a 2; pixel values 0-16 scaled to [0, 1] like the training data).
_SAMPLE_PIXELS = [0, 0, 7, 16, 14, 3, 0, 0, 0, 0, 9, 14, 11, 15, 0, 0, 0, 0, 1, 5, 0, 15, 5, 0, 0, 0, 0, 0, 0, 16, 5, 0, 0, 0, 0, 0, 3, 16, 4, 0, 0, 0, 0, 1, 12, 14, 1, 0, 0, 0, 5, 12, 16, 16, 14, 1, 0, 0, 8, 16, 14, 10, 13, 3]
SAMPLE_DIGIT = [round(v / 16, 4) for v in _SAMPLE_PIXELS]


# ---- up / down ---------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from cluster import deploy, nodes
    from cluster.config import load_config
    from cluster.frontdoor.tls import read_tls

    config = load_config(args.config, port=args.port, grpc_port=args.grpc_port, repository=args.repository,
                         triton_repository=args.triton_repository)
    deploy.check_repository(config)  # before Ray starts: a wrong URI or missing credentials fail here, clearly
    read_tls(config.tls)  # the same for the TLS files
    if args.demo and not config.simulated:
        _build_demo(config)
    address = args.address
    started_nodes = False
    if address is None:
        address = nodes.start_nodes(config)
        started_nodes = True
    try:
        nodes.connect(address)
        say(f"deploying fleet '{config.name}' (repository {config.store_spec().describe()}) ...")
        controller = deploy.deploy(config)
        if args.demo and config.simulated:  # build the demo for the declared GPUs' targets
            _build_demo_on_fleet(config, controller)
    except BaseException:
        if started_nodes:
            nodes.disconnect()
            nodes.stop_nodes()
        raise
    _print_ready(config.url, config)
    if not args.foreground:
        return 0
    return deploy.serve_in_foreground(controller, address, started_nodes, config.gcs_fault_tolerance.enabled)


def _build_demo(config) -> None:
    from cluster.buildfarm import build_locally, local_target
    from cluster.demo import DEMO_MODELS, make_demo_models
    from cluster.repository import Repository
    from workers.build import BuildRequest

    say(f"building demo models into {DEMO_MODEL_DIR}/ ...")
    paths = make_demo_models(DEMO_MODEL_DIR)
    repo = Repository(config.store_spec())  # before the fleet (and its controller, the writer) starts
    for name, path in paths.items():
        max_batch = config.models[name].max_batch if name in config.models else DEMO_MODELS[name][1]
        request = BuildRequest(str(path), name, local_target(), max_batch=max_batch)
        outcome = build_locally(repo, request, sha256_file(path))
        if not outcome.ok:
            raise FleetError(f"demo model {name} failed to build: {outcome.error}")


def _build_demo_on_fleet(config, controller) -> None:
    from cluster.buildfarm import build_on_fleet
    from cluster.demo import DEMO_MODELS, make_demo_models

    paths = make_demo_models(DEMO_MODEL_DIR)
    for name, path in paths.items():
        max_batch = config.models[name].max_batch if name in config.models else DEMO_MODELS[name][1]
        outcomes = build_on_fleet(controller, path, model=name, max_batch=max_batch)
        if not any(o.ok for o in outcomes):
            raise FleetError(f"demo model {name} failed to build on every target")


def _print_ready(url: str, config) -> None:
    tls = config.tls
    grpc = f" and gRPC{' over TLS' if tls.enabled else ''} on {config.host}:{config.grpc_port}" \
        if config.grpc_port and config.front_door else ""
    print(f"\nforward-fleet '{config.name}' is serving on {url}{grpc}\n")
    curl = "curl -s"
    if tls.enabled:  # a client's own CA bundle (and certificate) stand in for these
        curl += f" --cacert {tls.cert}" + (" --cert CLIENT.pem --key CLIENT.key" if tls.client_ca else "")
        print("With TLS on, clients trust the server's certificate (FLEET_TLS_CA for the fleet CLI)"
              + (" and present their own (FLEET_TLS_CERT, FLEET_TLS_KEY)." if tls.client_ca else "."))
    print("Try:")
    print(f"  {curl} {url}/v2/health/ready")
    print(f"  {curl} {url}/v2/models/digits-mlp")
    print(
        f"  {curl} -X POST {url}/v2/models/digits-mlp/infer -H 'Content-Type: application/json' \\\n"
        f"       -d '{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,64],\"datatype\":\"FP32\",\"data\":{json.dumps(SAMPLE_DIGIT)}}}]}}'"
    )
    if grpc:
        print(f"  .venv/perf-analyzer/bin/perf_analyzer -m digits-mlp -u {config.host}:{config.grpc_port} -i grpc"
              f"   (after: python scripts/install_perf_analyzer.py)")
    print("  fleet status")
    print("  fleet infer digits-mlp --input rows.npy\n", flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    from cluster import deploy, nodes

    try:
        nodes.connect(args.address or "auto")
        deploy.teardown()
    except FleetError as exc:
        say(f"no running fleet to tear down ({exc.message.splitlines()[0]})")
    nodes.disconnect()
    nodes.stop_nodes()
    say("fleet is down; Ray stopped")
    return 0


# ---- status / models -----------------------------------------------------------
def _client(args) -> FleetClient:
    from cluster.running import url_of

    return FleetClient(url_of(args), token=fleet_token(), tls=ClientTls.from_env())


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"fleet {status['fleet']}{' (simulated)' if status['simulated'] else ''}")
    header = f"{'NODE':<14} {'WORKER':<22} {'DEVICE':<26} {'CC':<5} {'BUDGET USED/TOTAL':<22} {'SIM':<4} LOADED"
    print(header)
    for node in status["nodes"]:
        for w in node["workers"]:
            dev = w["device"]
            used = f"{format_bytes(w['used_bytes'])}/{format_bytes(w['budget_bytes'])}"
            loaded = ", ".join(e["key"].split(":")[0] + ":" + e["key"].split(":")[2] for e in w["ledger"]) or "-"
            alive = "" if w["alive"] else f" ({w.get('state', 'down').upper()})"
            print(
                f"{node['node']:<14} {w['worker_id'] + alive:<22} {dev['name'][:26]:<26} "
                f"{dev['compute_capability'] or 'cpu':<5} {used:<22} {'yes' if w['simulated'] else 'no':<4} {loaded}"
            )
    hosts = status.get("hosts") or []
    if len(hosts) > 1 or any(h["state"] != "alive" for h in hosts):
        print(f"\n{'HOST':<16} {'ADDRESS':<16} {'STATE':<11} WORKERS")
        for h in hosts:
            workers = ", ".join(f"{w} ({s})" for w, s in h["workers"].items())
            joined = " (joined)" if h.get("joined") else ""
            print(f"{h['name']:<16} {h['address'] or '-':<16} {h['state'] + joined:<11} {workers}")
    for model, reason in status.get("fallbacks", {}).items():
        print(f"\n{model}: served by ONNX Runtime (fallback), TensorRT refused it: {reason.splitlines()[0]}")
    for node in status["nodes"]:
        for w in node["workers"]:
            if w.get("out_of_service"):
                print(f"\n{w['worker_id']}: out of service: {w['out_of_service']}")
    print_runtime_problems(status)
    print_rollout(status.get("rollout", []))
    idle = [(w["worker_id"], w["runnable_not_loaded"]) for n in status["nodes"] for w in n["workers"] if w["runnable_not_loaded"]]
    if idle:
        print("\ncould also run (built, not loaded):")
        for worker_id, models in idle:
            print(f"  {worker_id:<22} {', '.join(models)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cluster.running import repository_of

    repo, fleet = repository_of(args)  # the running fleet's, unless --config/--repository say otherwise
    arts = repo.artifacts()
    if args.json:
        print(json.dumps([a.manifest.to_dict() for a in arts], indent=2))
        return 0
    if not arts:
        print(f"no models in {repo.describe()}; build one with `fleet build MODEL.onnx --name NAME`")
        return 0
    print(f"{'MODEL':<20} {'VER':<4} {'PRECISION':<10} {'TARGET':<40} {'FOOTPRINT':<10} ACCURACY (JUDGED ON)")
    for a in arts:
        m = a.manifest
        acc = ", ".join(f"{k}={m.accuracy[k]:.4g}" for k in ACCURACY_COLUMNS if k in m.accuracy) or "-"
        if m.accuracy.get("eval_data"):
            acc += f" ({m.accuracy['eval_data']}{', weak' if m.accuracy.get('check', {}).get('note') else ''})"
        target = m.target.describe() + (" (fallback from TensorRT)" if m.build_options.get("fallback_from") else "")
        print(f"{m.model:<20} {m.version:<4} {m.precision:<10} {target:<40} {format_bytes(m.footprint_bytes):<10} {acc}")
    print_custom_ops(arts, fleet, getattr(args, "config", None))
    return 0


# ---- build / infer -------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from cluster.buildfarm import build_locally, build_on_fleet, local_target, prepare_build
    from cluster.config import load_config, parse_bytes
    from cluster.running import repository_of, require_fleet_for_targets
    from workers.build import BuildRequest

    source = Path(args.source)
    if not source.is_file():
        raise FleetError(f"source model {source} does not exist")
    model_config = load_config(args.config).model_config_for(args.name)
    max_batch = args.max_batch or model_config.max_batch
    options = {"footprint_bytes": parse_bytes(args.footprint)} if args.footprint else {}
    repo, fleet = repository_of(args)  # with a fleet running: its repository, written by its controller
    require_fleet_for_targets(args.targets, fleet, bool(args.repository))
    controller = fleet.controller if fleet is not None and not args.local else None
    if fleet is not None:
        say(f"fleet '{fleet.info['fleet']}' is running: its repository is {fleet.info['repository']}")
    custom_ops = tuple(args.custom_ops or model_config.custom_ops)  # a missing one: prepare_build says so
    if custom_ops:
        say(f"custom ops: {', '.join(custom_ops)} (loaded here for the build; workers serve the model only with "
            f"each library's sha256 in models.{args.name}.trusted_sha256 in the fleet config)")
    prepared = prepare_build(repo, source, args.precision, calib_data=args.calib_data, calib_method=args.calib_method,
                             eval_data=args.eval_data, custom_ops=custom_ops)
    if controller is None:
        request = BuildRequest(str(source), args.name, local_target(prepared.precision), version=args.version,
                               max_batch=max_batch, options={**options, **prepared.options},
                               accept_accuracy_loss=args.accept_accuracy_loss, fallback=model_config.fallback,
                               custom_ops=custom_ops)
        say(f"building {args.name} v{args.version} ({prepared.precision}) from {source} on this machine for 1 target:")
        return 0 if build_locally(repo, request, sha256_file(source), prepared=prepared).ok else 1
    outcomes = build_on_fleet(controller, source, model=args.name, version=args.version, targets=args.targets or "auto",
                              max_batch=max_batch, options=options, prepared=prepared,
                              accept_accuracy_loss=args.accept_accuracy_loss, fallback=model_config.fallback,
                              custom_ops=custom_ops)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def _load_inputs(path: Path, input_name: str | None) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".npy":
        return {input_name or "input": np.load(path)}
    raise FleetError(f"--input must be a .npy or .npz file, got {path}")


def cmd_infer(args: argparse.Namespace) -> int:
    feeds = _load_inputs(Path(args.input), args.input_name)
    client = _client(args)
    outputs = client.infer(args.model, feeds, version=args.version)
    if args.output:
        np.savez(args.output, **outputs)
        say(f"wrote {', '.join(outputs)} to {args.output}")
    served = client.last_parameters
    say(f"served by {served.get('fleet_worker')} on {served.get('fleet_device')}" + (" (simulated)" if served.get("simulated") else ""))
    for name, array in outputs.items():
        print(f"{name} {array.dtype} {list(array.shape)}:")
        print(np.array2string(array, threshold=200, precision=5))
    return 0


# ---- batch jobs ----------------------------------------------------------------
def _dashboard(args) -> str:
    from cluster.running import dashboard_of

    return dashboard_of(args)


def cmd_batch(args: argparse.Namespace) -> int:
    """`ray job submit` of cluster.batch against the running fleet, streaming its logs."""
    import subprocess

    from cluster.env import ray_env
    from cluster.nodes import ray_cli_path

    job = [sys.executable, "-m", "cluster.batch", "--model", args.model, "--input", _abs(args.input),
           "--output", _abs(args.output)]
    job += [arg for column in args.input_column for arg in ("--input-column", column)]
    for name in ("version", "batch_size", "output_columns", "output_tensors", "shared_memory", "in_flight", "progress_every"):
        if getattr(args, name) is not None:
            job += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    cmd = [ray_cli_path(), "job", "submit", "--address", _dashboard(args)]
    if args.working_dir:
        cmd += ["--working-dir", args.working_dir]
    cmd += ["--", *job]
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, env=ray_env()).returncode


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def cmd_jobs(args: argparse.Namespace) -> int:
    import subprocess

    from cluster.env import ray_env
    from cluster.nodes import ray_cli_path

    return subprocess.run([ray_cli_path(), "job", "list", "--address", _dashboard(args)], env=ray_env()).returncode


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmarks (``benchmarks`` package): the fleet against bare ONNX Runtime, naive Serve, Triton."""
    from benchmarks.cli import main as bench_main

    forwarded = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    return bench_main(forwarded)


# ---- parser --------------------------------------------------------------------
def _with_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="fleet HTTP endpoint (env FLEET_URL; default: the running fleet's, asked of it)")
    p.add_argument("--address", help="Ray address of the running fleet (default: RAY_ADDRESS, else this machine's)")


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="fleet config YAML (default: built-in local config)")
    p.add_argument("--repository", help="engine repository: a directory or a URI such as s3://bucket/prefix "
                   "(overrides the config; for build and models it means: this one, not the running fleet's)")


def _add_lifecycle_commands(sub) -> None:
    p = sub.add_parser("up", help="start Ray (or join --address), deploy the fleet, return when ready")
    _with_config(p)
    p.add_argument("--port", type=int, help="HTTP port (default from config: 8000)")
    p.add_argument("--grpc-port", type=int, help="KServe v2 / Triton gRPC port (default from config: 8001)")
    p.add_argument("--address", help="join a running Ray cluster instead of starting one")
    p.add_argument("--demo", action="store_true", help="build and serve the demo models (digits-mlp, cnn-small)")
    p.add_argument("--triton-repository", help="serve this Triton model repository too: imported at start "
                   "(as `fleet import-triton`; default from config: triton_repository)")
    p.add_argument("--foreground", action="store_true", help="keep running until Ctrl-C, then shut everything down")
    p.set_defaults(func=cmd_up)

    add_host_commands(sub)

    p = sub.add_parser("down", help="stop the fleet and every Ray node `fleet up` started")
    p.add_argument("--address", help="Ray address (default: auto)")
    p.set_defaults(func=cmd_down)


def _add_inspection_commands(sub) -> None:
    p = sub.add_parser("status", help="nodes, devices, budgets and loaded engines")
    _with_url(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("models", help="list the artifacts in the repository")
    _with_config(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)


def _add_build_command(sub) -> None:
    p = sub.add_parser("build", help="build an artifact from an ONNX model into the repository")
    _with_config(p)
    p.add_argument("source", help="source .onnx file")
    p.add_argument("--name", required=True, help="servable model name")
    p.add_argument("--version", default="1")
    p.add_argument("--precision", default="float32", choices=["float32", "float16", "int8", "int8_calib"],
                   help="int8_calib calibrates on --calib-data, stores the calibration, then builds int8; "
                        "int8 reuses a stored calibration of the same source model")
    p.add_argument("--calib-data", help="calibration data: .npz, a directory of .npy, or module:function")
    p.add_argument("--calib-method", choices=["entropy", "minmax", "percentile"],
                   help="calibration method (default: entropy for int8_calib; any stored one for int8)")
    p.add_argument("--eval-data", help="held-out samples (.npz: inputs, optional 'labels') for the accuracy check")
    p.add_argument("--accept-accuracy-loss", action="store_true", help="store the artifact even over the accuracy threshold")
    p.add_argument("--max-batch", type=int, help="max batch (default: the model's config, else 64)")
    p.add_argument("--targets", help="auto (every target in the running fleet) or a list: compute capabilities, "
                   "GPU model names, cpu (e.g. 7.5,V100); default: auto with a running fleet, else this machine's CPU")
    p.add_argument("--footprint", help="device memory to reserve per loaded engine (e.g. 2GiB); default: estimated")
    p.add_argument("--custom-ops", nargs="+", metavar="LIB.so",
                   help="native libraries the model's custom operators need: ONNX Runtime custom-op libraries "
                        "and/or TensorRT plugin libraries (default: models.<name>.custom_ops of --config); stored "
                        "beside the artifact, loaded by workers only when its sha256 is in models.<name>.trusted_sha256")
    p.add_argument("--local", action="store_true", help="build on this machine even if a fleet is running "
                   "(published into its repository by its controller)")
    p.add_argument("--address", help="Ray address of the running fleet (default: auto)")
    p.set_defaults(func=cmd_build)


def _add_serving_commands(sub) -> None:
    p = sub.add_parser("batch", help="score a data set on the fleet (`ray job submit` of cluster.batch)")
    p.add_argument("--model", required=True)
    p.add_argument("--version")
    p.add_argument("--input", required=True, help="Parquet / .npy / .npz file or directory, or a URI pyarrow.fs opens (s3://...)")
    p.add_argument("--output", required=True, help="output directory (a rerun resumes into it)")
    p.add_argument("--batch-size", type=int, help="rows per output part (default: about 128 MB of tensors a part)")
    p.add_argument("--input-column", action="append", default=[], metavar="[INPUT=]COLUMN")
    p.add_argument("--output-columns", help="comma-separated outputs to write (default: all)")
    p.add_argument("--output-tensors", choices=("auto", "lists", "bytes"), help="output tensors as lists or bytes (default auto: as the input's)")
    p.add_argument("--shared-memory", choices=("auto", "on", "off"), help="parts in shared memory where the fleet allows it (default auto)")
    p.add_argument("--in-flight", type=int, help="parts in flight per worker (default 8)")
    p.add_argument("--progress-every", type=float, metavar="SECONDS", help="a progress line this often, 0 for none (default 10)")
    p.add_argument("--working-dir", help="passed to `ray job submit --working-dir` (not needed on one machine)")
    p.add_argument("--address", help="Ray dashboard address (default: http://127.0.0.1:<dashboard_port of --config>)")
    p.add_argument("--config", help="fleet config (for its dashboard port)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("jobs", help="list batch jobs (`ray job list`)")
    p.add_argument("--address", help="Ray dashboard address")
    p.add_argument("--config", help="fleet config (for its dashboard port)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("bench", help="run the benchmarks (options after --, e.g. fleet bench -- --quick)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmarks (see fleet bench -- --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("infer", help="send one request and print the outputs")
    _with_url(p)
    p.add_argument("model")
    p.add_argument("--input", required=True, help=".npy (one input) or .npz (named inputs)")
    p.add_argument("--input-name", help="input name for a .npy file (default: 'input')")
    p.add_argument("--version")
    p.add_argument("--output", help="write the outputs to this .npz")
    p.set_defaults(func=cmd_infer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description="forward-fleet: serve ONNX models as TensorRT / ONNX "
                                     "Runtime engines on a heterogeneous Ray GPU fleet.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lifecycle_commands(sub)
    _add_inspection_commands(sub)
    _add_build_command(sub)
    _add_serving_commands(sub)
    add_triton_commands(sub, _with_config)
    add_fleet_commands(sub, _with_url)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_ray_env()  # before anything imports Ray
    try:
        return args.func(args)
    except FleetError as exc:
        print(f"fleet {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

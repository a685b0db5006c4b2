"""`fleet promote`, `fleet rollback`, `fleet doctor`, `fleet runtimes`, `fleet upgrade`: rolling versions
out and keeping each GPU type's runtime right. They act on the running fleet through its controller."""

from __future__ import annotations

import argparse
import json

from workers.errors import NotReady

from cluster.calls import get


def _controller(args):
    from cluster.running import NO_FLEET
    from cluster.nodes import running_fleet

    fleet = running_fleet(getattr(args, "address", None))
    if fleet is None:
        raise NotReady(NO_FLEET)
    return fleet.controller


def print_rollout(views: list[dict]) -> None:
    """`fleet status`: per model whose GPU types serve different versions (or with a promotion), what each serves."""
    shown = [v for v in views if v["mixed"] or v["promoted"] or any(t["waiting_for"] for t in v["types"])]
    if not shown:
        return
    print("\nversions served to requests that name none (per GPU type):")
    for view in shown:
        head = f"promoted {view['promoted']}" if view["promoted"] else f"latest {view['latest']}, not promoted"
        print(f"  {view['model']} ({head}{', MIXED' if view['mixed'] else ''})")
        for t in view["types"]:
            wait = f"  (no artifact of version {t['waiting_for']} for it yet)" if t["waiting_for"] else ""
            print(f"    {t['gpu_type']:<8} serves {t['default'] or 'nothing'}{wait}   [{', '.join(t['workers'])}]")


def print_runtime_problems(status: dict) -> None:
    """`fleet status`: workers whose runtimes cannot use their device (what the probe at start found)."""
    for node in status["nodes"]:
        for w in node["workers"]:
            for problem in w.get("runtime_problems") or ():
                print(f"\n{w['worker_id']}: RUNTIME CANNOT USE ITS GPU: {problem}")


def cmd_promote(args: argparse.Namespace) -> int:
    view = get(_controller(args).promote.remote(args.model, args.version, args.force), timeout=600)
    print_rollout([dict(view, mixed=True)])
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    view = get(_controller(args).rollback.remote(args.model), timeout=600)
    print_rollout([dict(view, mixed=True)])
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from cluster.doctor import render

    report = get(_controller(args).doctor.remote(), timeout=300)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 1 if report["problems"] else 0


def cmd_runtimes(args: argparse.Namespace) -> int:
    """Prepare this host's environments for the GPU types of a config (what `fleet doctor` tells a host to run)."""
    from cluster.config import load_config
    from cluster.runtime_envs import prepare_environment, wanted_environments

    config = load_config(args.config)
    for packages, where in wanted_environments(config).items():
        python = prepare_environment(packages)
        print(f"{', '.join(packages)} ({where}): {python}")
    return 0


def print_upgrade_plan(plan: dict) -> None:
    print(f"node {plan['node']}: TensorRT {', '.join(plan['from'])} -> {plan['to']}; workers rolled one at a time: "
          f"{', '.join(plan['workers'])}")
    for what, label in (("rebuild", "build first"), ("ready", "built already"), ("drop", "drop afterwards")):
        for item in plan[what]:
            print(f"  {label}: {item}")


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Plan (and print) first; then run it on the controller, printing its progress as it goes."""
    import ray

    controller = _controller(args)
    print_upgrade_plan(get(controller.upgrade_tensorrt.remote(args.node, args.tensorrt, True), timeout=300))
    if args.dry_run:
        return 0
    done = controller.upgrade_tensorrt.remote(args.node, args.tensorrt)
    shown = 0
    while True:
        finished = bool(ray.wait([done], timeout=1.0)[0])
        lines = get(controller.upgrade_progress.remote(shown), timeout=60)
        for line in lines:
            print(line, flush=True)
        shown += len(lines)
        if finished:
            break
    result = get(done)  # the typed error, when it failed
    print(f"upgraded {result['node']} to TensorRT {result['to']} in {result['seconds']} s: {len(result['built'])} plan(s) "
          f"built, {len(result['rolled'])} worker(s) rolled, {len(result['dropped'])} old plan(s) dropped. The fleet "
          f"keeps this (in its repository); set `tensorrt: {result['to']}` for {result['node']} in the config file too")
    return 0


def add_commands(sub, with_url) -> None:
    p = sub.add_parser("promote", help="serve MODEL VERSION to every request that names no version, on every GPU type")
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="promote even where a GPU type has no artifact of VERSION "
                   "(its workers serve the newest older version they have)")
    p.add_argument("--address", help="Ray address of the running fleet (default: RAY_ADDRESS, else this machine's)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="undo MODEL's last promotion (the one before, else each GPU type's latest)")
    p.add_argument("model")
    p.add_argument("--address", help="Ray address of the running fleet (default: RAY_ADDRESS, else this machine's)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("doctor", help="per host and GPU: runtimes installed, what the repository's targets miss, "
                       "and the commands that fix it (exit 1 when something is missing)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--address", help="Ray address of the running fleet (default: RAY_ADDRESS, else this machine's)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("upgrade", help="move NODE to another TensorRT release on the live fleet: its plans rebuilt "
                       "first (on a builder with the new release), its workers rolled one at a time, the old plans "
                       "dropped; no request fails")
    p.add_argument("node", help="the node's name (`fleet status` lists them)")
    p.add_argument("--tensorrt", required=True, metavar="VERSION", help="the release to move to, e.g. 10.16.1.11")
    p.add_argument("--dry-run", action="store_true", help="print what would be built, rolled and dropped; change nothing")
    p.add_argument("--address", help="Ray address of the running fleet (default: RAY_ADDRESS, else this machine's)")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("runtimes", help="prepare this host's Python environments for the config's gpu_types "
                       "(workers of those types start in them)")
    p.add_argument("--config", help="fleet config YAML")
    p.set_defaults(func=cmd_runtimes)

"""``fleet join`` and ``fleet leave``: a machine joins a running fleet, or leaves it drained
(the work is in ``cluster.joining``; imported when a command runs, after Ray's environment is set)."""

from __future__ import annotations

import argparse


def cmd_join(args: argparse.Namespace) -> int:
    from cluster import joining
    from cluster.config import load_config

    config = load_config(args.config) if args.config else None
    start = joining.ray_start_args(args.address, config, args.node, args.node_ip_address)
    return joining.join(start, args.address, block=args.block)


def cmd_leave(args: argparse.Namespace) -> int:
    from cluster import joining
    from cluster.env import ray_address

    report = joining.leave(args.address or ray_address() or "auto", timeout_s=args.timeout)
    return 0 if report and not report.get("timed_out") else 1


def add_host_commands(sub) -> None:
    p = sub.add_parser("join", help="add this machine (its GPUs) to a running fleet: run it on the extra machine")
    p.add_argument("--address", required=True, help="the head's Ray address, HEAD:PORT (the ray_port of `fleet up`)")
    p.add_argument("--node", help="take the identity of this node declared in --config (simulated GPUs)")
    p.add_argument("--config", help="the fleet's config (for --node)")
    p.add_argument("--node-ip-address", help="this machine's address the others reach (default: Ray's pick)")
    p.add_argument("--block", action="store_true", help="stay in the foreground; Ctrl-C leaves the fleet "
                   "(drained), and a node Ray dropped (a long network outage) joins again")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("leave", help="drain this machine's workers (no request fails) and stop its Ray node")
    p.add_argument("--address", help="the head's Ray address (default: RAY_ADDRESS, else this machine's)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for in-flight requests")
    p.set_defaults(func=cmd_leave)

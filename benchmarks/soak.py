"""Soak the simulated heterogeneous fleet: mixed traffic for a bounded time while workers are killed.

    python scripts/soak.py --minutes 5 [--threads 8] [--kill-every 20] [--json out.json]

Traffic: several models (one served only by the T4s), batch sizes 1-64, about one bad
request in ten (each must get its 4xx). A worker is killed every ``--kill-every`` seconds
(give or take half). It prints requests, errors by kind, p50/p99 and worker memory over
time, and exits 1 if any accepted request was lost (no answer) or any good request
failed for a reason other than a clearly reported one (a typed 503 while a worker was
being replaced).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.env import apply_ray_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills (average)")
    parser.add_argument("--config", default="configs/hetero-sim.yaml")
    parser.add_argument("--json", help="write the summary here too")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_ray_env()  # before anything imports Ray: Ray and Serve read their switches then
    from benchmarks.soak_run import soak

    summary = soak(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "memory"}, indent=2))
    samples = summary["memory"]
    first, last = (samples[0]["rss_mib"], samples[-1]["rss_mib"]) if samples else ({}, {})
    print("worker RSS MiB, first -> last sample: " + ", ".join(f"{k} {first.get(k)} -> {v}" for k, v in sorted(last.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    failed = summary["lost"] > 0 or bool(summary["unclear"])
    print("SOAK FAILED" if failed else "SOAK PASSED: no accepted request lost, every failure clearly reported")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""KServe v2 binary over HTTP with wide, cheap rows: what moving 4 MB bodies costs the fleet.

    python -m benchmarks.http_wide                       # batch 256 x 4096 float32: 4 MB in, 4 MB out
    python -m benchmarks.http_wide --rounds 3 --out bench-http-wide.json

The model is ``benchmarks.batch_wide``'s Mul (input * 2) over [N, width] float32, so next to no
compute: the numbers are the HTTP path's own (parsing, decoding, encoding, the sockets). A local
fleet (configs/local.yaml) serves it on the CPU; the load generator (wrk when installed, else
``benchmarks.loadgen``'s Python one) posts one binary request body over and over, through the
fleet's port (the HAProxy front door) and straight at the worker's own endpoint, ``--rounds``
times each, alternating. Every answer is checked once before it is timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from cluster.env import apply_ray_env

apply_ray_env()

import numpy as np  # noqa: E402
import requests  # noqa: E402

from benchmarks import loadgen  # noqa: E402
from benchmarks.batch_wide import CONFIG, make_wide_mul  # noqa: E402
from workers.kserve.client_codec import decode_response, encode_request  # noqa: E402
from workers.cpus import usable_cpus  # noqa: E402


def measure(args, work: Path) -> dict:
    import ray

    from cluster.buildfarm import build_on_fleet
    from cluster.config import load_config
    from cluster.deploy import deploy, teardown
    from cluster.names import NAMESPACE
    from cluster.net import free_port

    name = "wide-mul"
    model = make_wide_mul(work / f"{name}.onnx", args.width)
    config = load_config(str(CONFIG), repository=str(work / "repository"), port=free_port(), grpc_port=free_port(),
                         models={name: {"max_batch": args.batch}})
    ray.init(address="local", namespace=NAMESPACE, num_cpus=usable_cpus(), log_to_driver=False,
             include_dashboard=False, logging_level=logging.ERROR)
    try:
        controller = deploy(config)
        outcomes = build_on_fleet(controller, model, model=name, max_batch=args.batch)
        assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes]
        base = f"http://127.0.0.1:{config.port}"
        worker = requests.get(f"{base}/v2/fleet/status", timeout=30).json()["nodes"][0]["workers"][0]["http"]
        urls = {"front-door": f"{base}/v2/models/{name}/infer", "worker": f"http://{worker}/v2/models/{name}/infer"}
        X = np.random.default_rng(0).standard_normal((args.batch, args.width), dtype=np.float32)
        body, headers = encode_request({"input": X})
        for url in urls.values():  # the right answer first, then load
            answer = requests.post(url, data=body, headers=headers, timeout=60)
            answer.raise_for_status()
            _, outputs = decode_response(answer.content, answer.headers.get("inference-header-content-length"))
            np.testing.assert_array_equal(outputs["output"], X * 2)
        tool = loadgen.pick_tool(args.loadgen)
        loadgen.run(urls["front-door"], body, headers, concurrency=args.concurrency, duration_s=2, tool=tool)
        rows = []
        for round_ in range(args.rounds):
            for path, url in urls.items():
                r = loadgen.run(url, body, headers, concurrency=args.concurrency, duration_s=args.duration,
                                rows_per_request=args.batch, tool=tool).to_dict()
                row = {"path": path, "round": round_, "tool": tool, "concurrency": args.concurrency,
                       "req_per_s": round(r["req_per_s"], 1), "rows_per_s": round(r["rows_per_s"]),
                       "mb_per_s_each_way": round(r["req_per_s"] * len(body) / 1e6), "p50_ms": round(r["p50_ms"], 1),
                       "p99_ms": round(r["p99_ms"], 1), "errors": r["errors"]}
                rows.append(row)
                print(f"{path:<10} round {round_}: {row['req_per_s']:>7.1f} req/s  {row['mb_per_s_each_way']:>6,} MB/s "
                      f"each way  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}", flush=True)
        best = {path: max(r["req_per_s"] for r in rows if r["path"] == path) for path in urls}
        return {"model": f"Mul over [{args.batch}, {args.width}] float32", "body_bytes": len(body),
                "cores": os.cpu_count(), "rows": rows, "best_req_per_s": best,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    finally:
        teardown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loadgen", default="auto", choices=["auto", "wrk", "python"])
    p.add_argument("--out", default="", help="also write the result here (JSON)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="http-wide-") as tmp:
        result = measure(args, Path(tmp))
    print(json.dumps(result["best_req_per_s"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

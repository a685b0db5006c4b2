"""fleet-client: the fleet from inside the cluster, no HTTP: through the DataPlane (route +
worker call, what the ingress does), through the in-cluster client with its tensors in shared
memory (``cluster.incluster.InClusterClient``), and straight at the worker holding the engine
(as the batch job)."""

from __future__ import annotations

import asyncio
import time

import ray

from cluster.dataplane import DataPlane
from cluster.incluster import InClusterClient
from cluster.names import CONTROLLER_NAME, NAMESPACE
from workers.kserve.codec import InferRequest

from benchmarks.common import closed_loop_row, local_fleet, model_inputs, progress

HOWS = ("dataplane", "shm", "direct")  # "shm": InClusterClient(shared_memory=True)


def client_bench_class():
    """The ClientBench actor class (defined here, so Ray ships it by value to its worker)."""

    @ray.remote(num_cpus=0)
    class ClientBench:
        """Calls the fleet the way the ingress does (``DataPlane.serve``: route + worker call) or
        straight at the worker holding the engine (``handle.infer``, as cluster/batch.py does)."""

        def __init__(self) -> None:
            self.plane = DataPlane(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE))
            self.shm_client: InClusterClient | None = None

        async def _direct(self, model: str, feeds: dict):
            plane = self.plane
            version = await plane.resolve(model, None)
            choice = plane.router.choose(model, version)
            if choice is None:
                await plane.load(model, version)  # the controller places it; the plane routes by the placement
                choice = plane.router.choose(model, version)
            if choice is None:
                raise RuntimeError(f"no worker holds {model} after loading it")
            handle = plane.handles[choice.worker_id]
            return lambda: handle.infer.remote(model, InferRequest(feeds), version)

        async def run(self, how: str, model: str, feeds: dict, concurrency: int, duration_s: float) -> dict:
            await self.plane.refresh(force=True)
            if how == "direct":
                call = await self._direct(model, feeds)
            elif how == "shm":
                self.shm_client = self.shm_client or InClusterClient(self.plane.controller, shared_memory=True)

                def call():
                    return self.shm_client.infer(model, feeds)
            else:
                def call():
                    return self.plane.serve(model, None, InferRequest(feeds))
            for _ in range(20):
                await call()
            latencies: list[float] = []
            started = time.perf_counter()
            deadline = started + duration_s

            async def loop():
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    await call()
                    latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(loop() for _ in range(concurrency)))
            return {"elapsed": time.perf_counter() - started, "latencies": latencies}

    return ClientBench


def run(spec: dict) -> dict:
    with local_fleet(spec):
        bench = client_bench_class().remote()
        rows = []
        for model in spec["models"]:
            rows_per_request = spec["prepared"]["models"][model]["request_rows"]
            feeds = model_inputs(model, rows_per_request)
            for how in spec.get("hows", HOWS):
                for c in spec["levels"].get(model, []):
                    out = ray.get(bench.run.remote(how, model, feeds, c, spec["duration_s"]))
                    row = closed_loop_row("fleet-client", how, rows_per_request, c, out["latencies"], out["elapsed"],
                                          model=model)
                    progress(f"fleet-client [{how}] {model} c={c}: {row['req_per_s']:.0f} req/s, "
                             f"p50 {row['p50_ms']:.2f} ms")
                    rows.append(row)
        return {"rows": rows}

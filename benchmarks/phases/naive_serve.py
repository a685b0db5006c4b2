"""naive-serve: a plain ten-minute Ray Serve deployment (one replica, ONNX Runtime, JSON in and
out) per model, in the Serve mode the orchestrator chose (``benchmarks.plans``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ray import serve
from starlette.requests import Request

from cluster.net import free_port

from benchmarks.common import progress, ray_start, wait_http
from benchmarks.httpbench import http_matrix, levels_of
from benchmarks.serve_modes import direct_ingress_url, serve_mode


def naive_deployment():
    """What a user writes in ten minutes (defined here, so Ray ships it by value to the replica)."""

    @serve.deployment
    class NaiveOnnx:
        def __init__(self, model_path: str) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
            self.outputs = [o.name for o in self.session.get_outputs()]

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            feeds = {i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"]) for i in body["inputs"]}
            results = self.session.run(self.outputs, feeds)
            return {"outputs": [
                {"name": n, "datatype": "INT64" if r.dtype == np.int64 else "FP32", "shape": list(r.shape),
                 "data": r.reshape(-1).tolist()}
                for n, r in zip(self.outputs, results)
            ]}

    return NaiveOnnx


def run(spec: dict) -> dict:
    ray = ray_start()
    mode = serve_mode()
    spec = dict(spec, models=[m for m in spec["models"] if levels_of(spec, m, "json")])
    try:
        t0 = time.monotonic()
        urls = _deploy(spec)
        deploy_s = time.monotonic() - t0
        progress(f"naive serve [{mode}] up in {deploy_s:.1f} s: {urls}")
        rows = []
        for model in spec["models"]:
            rows += http_matrix("naive-serve", mode, urls[model], dict(spec, models=[model]), protocols=("json",))
        return {"rows": rows, "info": {"deploy_s": deploy_s, "serve_mode": mode, "urls": urls}}
    finally:
        t1 = time.monotonic()
        try:
            if not spec.get("quick"):
                serve.shutdown()
        finally:
            ray.shutdown()
        progress(f"torn down in {time.monotonic() - t1:.1f} s")


def _deploy(spec: dict) -> dict[str, str]:
    """One application per model; returns where each answers (its replica under direct ingress)."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    naive = naive_deployment()
    for model in spec["models"]:
        serve.run(naive.bind(spec["prepared"]["models"][model]["onnx"]), name=f"naive-{model}",
                  route_prefix=f"/v2/models/{model}", blocking=False)
    urls = {}
    for model in spec["models"]:
        urls[model] = direct_ingress_url(f"naive-{model}") or f"http://127.0.0.1:{port}"
        body_info = spec["prepared"]["models"][model]["bodies"]["json"]
        wait_http(urls[model] + f"/v2/models/{model}/infer", 120, method="POST",
                  body=Path(body_info["path"]).read_bytes(), headers=body_info["headers"])
    return urls

"""The front door: HAProxy config rendering (pure) and a real HAProxy routing real HTTP."""

import http.server
import subprocess
import threading
import time

import pytest
import requests

from cluster.frontdoor.haproxy import FrontDoor, haproxy_binary
from cluster.net import free_port
from cluster.frontdoor.routes import GRPC_MISS_HEADER, GrpcFrontend, Route, Server, render_config, routes_from
from cluster.router import Router, WorkerState
from workers.devices import Device
from workers.manifest import Manifest
from workers.targets import Runtime, Target, WorkerCaps
from workers.tensors import TensorSpec

from tests.needs import skip_unless

TARGET = Target("onnxruntime", "1.31.1", "any", provider="cpu")


@pytest.fixture
def haproxy_installed():
    skip_unless(haproxy_binary() is not None, "HAProxy is not installed (ray[serve] brings it on Linux)")


needs_haproxy = pytest.mark.usefixtures("haproxy_installed")



def _manifest(model: str, version: str) -> Manifest:
    spec = (TensorSpec("x", "FP32", (-1, 4)),)
    return Manifest(model=model, version=version, precision="float32", target=TARGET, artifact_file="model.onnx",
                    artifact_sha256="0" * 64, source_sha256="1" * 64, inputs=spec, outputs=spec,
                    footprint_bytes=1 << 20, max_batch=8)


def _worker(worker_id: str, loaded: set[str], alive: bool = True) -> WorkerState:
    cpu = Device(name="CPU", uuid=f"CPU-{worker_id}", kind="cpu", compute_capability=None, total_memory_bytes=1 << 34)
    caps = WorkerCaps(worker_id=worker_id, device=cpu, runtimes=(Runtime("onnxruntime", "1.31.1", "cpu"),))
    state = WorkerState(caps=caps, budget_bytes=1 << 30, used_bytes=0, loaded=set(loaded))
    state.alive = alive
    return state


def test_routes_list_only_live_workers_holding_the_engine():
    m1, m2 = _manifest("mlp", "1"), _manifest("mlp", "2")
    router = Router()
    router.set_inventory(
        [_worker("a", {m1.engine_key, m2.engine_key}), _worker("b", {m2.engine_key}), _worker("c", set()),
         _worker("d", {m2.engine_key}, alive=False)],
        [m1, m2],
    )
    addresses = {"a": ("127.0.0.1", 1001), "b": ("127.0.0.1", 1002), "c": ("127.0.0.1", 1003), "d": ("127.0.0.1", 1004)}
    routes = routes_from(router, addresses)
    assert [(r.version, r.latest, [s.name for s in r.servers]) for r in routes] == [
        ("1", False, ["a"]), ("2", True, ["a", "b"])]
    # a worker without an HTTP endpoint is not a server
    assert [s.name for s in routes_from(router, {"b": ("127.0.0.1", 1002)})[0].servers] == ["b"]


def test_a_holder_out_of_reach_stays_a_server_on_both_paths():
    """Its link is down: HAProxy's own checks take it out and bring it back (in seconds, when the
    link is up again), on the unversioned path too."""
    m2 = _manifest("mlp", "2")
    away = _worker("away", {m2.engine_key}, alive=False)
    away.standby = True
    gone = _worker("gone", {m2.engine_key}, alive=False)  # dead, not out of reach: no server
    router = Router()
    router.set_inventory([_worker("a", {m2.engine_key}), away, gone], [m2])
    addresses = {w: ("127.0.0.1", 1000 + i) for i, w in enumerate(("a", "away", "gone"))}
    assert [(r.version, r.latest, [s.name for s in r.servers]) for r in routes_from(router, addresses)] == [
        ("2", True, ["a", "away"])]


def test_config_routes_the_latest_version_on_both_paths_and_everything_else_to_the_ingress():
    routes = [Route("mlp", "1", False, (Server("a", "127.0.0.1", 1001),)),
              Route("mlp", "2", True, (Server("a", "127.0.0.1", 1001), Server("b", "127.0.0.1", 1002)))]
    text = render_config(routes, bind=("127.0.0.1", 8000), ingress=("127.0.0.1", 9000), admin_socket="/tmp/x.sock")
    assert "acl infer_0 path /v2/models/mlp/versions/1/infer\n" in text
    assert "acl infer_1 path /v2/models/mlp/infer /v2/models/mlp/versions/2/infer\n" in text
    assert "use_backend model_1 if METH_POST infer_1 { nbsrv(model_1) gt 0 }" in text
    assert "server b 127.0.0.1:1002 check" in text
    assert "default_backend ingress" in text and "server serve 127.0.0.1:9000" in text


@needs_haproxy
def test_haproxy_accepts_the_rendered_config(tmp_path):
    routes = [Route("digits-mlp", "1", True, (Server("node-1.2.3.4-gpu0", "127.0.0.1", 1001),))]
    path = tmp_path / "h.cfg"
    path.write_text(render_config(routes, bind=("127.0.0.1", free_port()), ingress=("127.0.0.1", 9000),
                                  admin_socket=str(tmp_path / "a.sock")))
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


class _Named(http.server.ThreadingHTTPServer):
    """A tiny real HTTP server that answers every request with its own name."""

    def __init__(self, name: str) -> None:
        self.name = name
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                body = f"{outer.name} {self.command} {self.path}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _who(url: str, method: str = "POST") -> str:
    with requests.Session() as s:  # a new connection: a reload applies to new connections
        return s.request(method, url, data=b"{}", timeout=10).text.split()[0]


@needs_haproxy
def test_real_haproxy_routes_moves_and_falls_back(tmp_path):
    ingress, w1, w2 = _Named("ingress"), _Named("w1"), _Named("w2")
    port = free_port()
    door = FrontDoor(bind=("127.0.0.1", port), ingress=("127.0.0.1", ingress.port))
    base = f"http://127.0.0.1:{port}"
    try:
        door.start([Route("mlp", "1", True, (Server("w1", "127.0.0.1", w1.port),))])
        assert _who(f"{base}/v2/models/mlp/infer") == "w1"
        assert _who(f"{base}/v2/models/mlp/versions/1/infer") == "w1"
        assert _who(f"{base}/v2/models/mlp", "GET") == "ingress"  # metadata
        assert _who(f"{base}/v2/models/mlp/infer", "GET") == "ingress"  # not an inference
        assert _who(f"{base}/v2/models/other/infer") == "ingress"  # nobody holds it: load on a miss
        assert _who(f"{base}/v2/models/mlp/versions/7/infer") == "ingress"

        assert door.update([Route("mlp", "1", True, (Server("w2", "127.0.0.1", w2.port),))]) is True
        assert door.update([Route("mlp", "1", True, (Server("w2", "127.0.0.1", w2.port),))]) is False  # unchanged
        deadline = time.monotonic() + 10
        while _who(f"{base}/v2/models/mlp/infer") != "w2":
            assert time.monotonic() < deadline, "the reload never took effect"
            time.sleep(0.1)

        w2.shutdown()
        w2.server_close()  # the only holder is gone: after its health check fails, the ingress answers
        deadline = time.monotonic() + 15
        while True:
            try:
                if _who(f"{base}/v2/models/mlp/infer") == "ingress":
                    break
            except (requests.RequestException, IndexError):
                pass
            assert time.monotonic() < deadline, "HAProxy kept sending requests to a dead worker"
            time.sleep(0.2)
        assert door.describe()["running"] and door.describe()["reloads"] == 1
    finally:
        door.stop()
        for server in (ingress, w1):
            server.shutdown()
    assert not door.dir.exists()


class _GrpcNamed:
    """A tiny real gRPC server (HTTP/2) whose ModelInfer answers with its own name and the caller's miss mark."""

    def __init__(self, name: str) -> None:
        import grpc
        from concurrent.futures import ThreadPoolExecutor

        def infer(raw, context):
            marked = dict(context.invocation_metadata()).get(GRPC_MISS_HEADER, "")
            return f"{name} {marked}".strip().encode()

        self.server = grpc.server(ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


class _Http1GrpcNamed:
    """A worker's HTTP endpoint as the front door reaches it over gRPC: the real HTTP/1.1 protocol
    (workers/httpwire.py) answering ModelInfer in gRPC's HTTP/1.1 form (workers/grpc_http1.py) with
    its own name and the caller's miss mark; the health check as a worker answers it."""

    def __init__(self, name: str) -> None:
        import asyncio

        from workers.grpc_http1 import grpc_answer
        from workers.httpwire import HttpConnection
        from workers.kserve.handler import json_answer
        from workers.loopthread import LoopThread

        async def handle(request):
            if request.path == "/v2/health/live":
                return json_answer(200, {"live": True})
            assert request.path == "/inference.GRPCInferenceService/ModelInfer", request.path
            return grpc_answer(f"{name} {request.headers.get(GRPC_MISS_HEADER, '')}".strip().encode())

        self.port = free_port()
        self.loop = LoopThread(f"grpc-{name}", fast=True)
        servers = []

        async def setup():
            servers.append(await asyncio.get_running_loop().create_server(
                lambda: HttpConnection(handle, 1 << 20), "127.0.0.1", self.port))

        async def teardown():
            servers[0].close()

        self.loop.start(setup, teardown)


def _grpc_who(port: int, model: str, version: str = "", rows: int = 1, metadata=()) -> str:
    import grpc
    import numpy as np

    from workers.kserve.grpc_codec import grpc_request

    raw = grpc_request(model, {"x": np.zeros((rows, 4), np.float32)}, version=version).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(raw, metadata=metadata, timeout=10).decode()


def test_config_routes_grpc_model_infer_by_the_name_in_its_body():
    routes = [Route("mlp", "2", True, (Server("a", "127.0.0.1", 1001, 2001), Server("b", "127.0.0.1", 1002)))]
    text = render_config(routes, bind=("127.0.0.1", 8000), ingress=("127.0.0.1", 9000), admin_socket="/x.sock",
                         grpc=GrpcFrontend(("127.0.0.1", 8001), ("127.0.0.1", 9001)))
    assert "bind 127.0.0.1:8001 proto h2" in text and "req.body,ungrpc(1)" in text
    # to the holder's HTTP endpoint over HTTP/1.1 (its gRPC port is what the router uses)
    assert "server a 127.0.0.1:1001 proto h1" in text and "server b 127.0.0.1:1002 proto h1" not in text  # no gRPC
    assert "default_backend grpc_router" in text and "server router 127.0.0.1:9001 proto h2 backup" in text


@needs_haproxy
def test_real_haproxy_routes_grpc_to_a_holder_and_the_rest_to_the_router(tmp_path):
    worker, router, ingress = _Http1GrpcNamed("w1"), _GrpcNamed("router"), _Named("ingress")
    port, grpc_port = free_port(), free_port()
    door = FrontDoor(bind=("127.0.0.1", port), ingress=("127.0.0.1", ingress.port),
                     grpc=GrpcFrontend(("127.0.0.1", grpc_port), ("127.0.0.1", router.port)))
    try:
        door.start([Route("mlp", "1", True, (Server("w1", "127.0.0.1", worker.port, 1),))])
        assert _grpc_who(grpc_port, "mlp") == "w1"  # the latest version: no version in the request
        assert _grpc_who(grpc_port, "mlp", "1") == "w1"
        assert _grpc_who(grpc_port, "mlp", "7") == "router"  # nobody holds it: the router loads it
        assert _grpc_who(grpc_port, "other") == "router"
        assert _grpc_who(grpc_port, "mlp", rows=8192) == "router"  # 128 KiB: over HAProxy's buffer
        assert _grpc_who(grpc_port, "mlp", metadata=((GRPC_MISS_HEADER, "1"),)) == "router 1"  # a worker's miss
    finally:
        door.stop()
        worker.loop.stop()
        router.server.stop(0)
        ingress.shutdown()

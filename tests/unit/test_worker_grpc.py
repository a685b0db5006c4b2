"""A worker's own gRPC endpoint and the fleet's gRPC router, without Ray: real gRPC, real ONNX Runtime."""

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from cluster.buildfarm import build_locally, local_target
from cluster.frontdoor.grpc_router import GrpcFront, GrpcRouter
from cluster.frontdoor.haproxy import FrontDoor, haproxy_binary
from cluster.frontdoor.routes import GrpcFrontend, Route, Server
from cluster.net import free_port
from cluster.inventory import Placement
from cluster.repository import Repository
from workers.actor import FleetWorker, WorkerSpec
from workers.build import BuildRequest
from workers.errors import InvalidInput, ModelNotFound
from workers.grpc_http1 import STATUS_CODES, GrpcUnimplemented, grpc_answer, grpc_message_value, unframe
from workers.grpc_server import MODEL_INFER, GrpcOptions
from workers.http import HttpOptions
from workers.kserve.grpc_codec import grpc_request, read_grpc_response
from workers.kserve.handler import InferPolicy
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.manifest import sha256_file

from tests.needs import skip_unless

TOKEN = "grpc-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, demo_models):
    repo = Repository(tmp_path_factory.mktemp("repo"))
    path = demo_models["digits-mlp"]
    build_locally(repo, BuildRequest(str(path), "digits-mlp", local_target(), max_batch=64), sha256_file(path))
    worker = FleetWorker(WorkerSpec("w0", budget_bytes=1 << 30))
    (artifact,) = repo.artifacts("digits-mlp")
    worker.load(artifact.manifest, repo.object_source(artifact.manifest))
    missed: list = []

    async def on_miss(raw: bytes, metadata) -> bytes:  # stands in for the fleet's router
        missed.append((pb.ModelInferRequest.FromString(raw).model_name, dict(metadata).get("x-fleet-miss")))
        return pb.ModelInferResponse(model_name="passed-on").SerializeToString()

    policy = InferPolicy(auth_token=TOKEN, auth_inference=True)
    worker.http_address = worker.start_http(HttpOptions(policy=policy))  # where the front door sends gRPC
    host, port = worker.start_grpc(GrpcOptions(policy=policy), on_miss)
    worker.missed = missed
    yield worker, f"{host}:{port}", path
    worker.shutdown()


@pytest.fixture
def front_door(worker):
    """HAProxy's gRPC port in front of the worker, as the fleet renders it: ModelInfer to the worker's
    HTTP endpoint over HTTP/1.1 (workers/grpc_http1.py), for digits-mlp and for a model it does not hold."""
    skip_unless(haproxy_binary() is not None, "HAProxy is not installed (ray[serve] brings it on Linux)")
    fleet_worker, grpc_address, _ = worker
    host, http_port = fleet_worker.http_address
    server = Server("w0", host, http_port, int(grpc_address.rsplit(":", 1)[1]))
    port, grpc_port = free_port(), free_port()
    door = FrontDoor(bind=("127.0.0.1", port), ingress=("127.0.0.1", 9), grpc=GrpcFrontend(("127.0.0.1", grpc_port),
                                                                                         ("127.0.0.1", 9)))
    door.start([Route("digits-mlp", "1", True, (server,)), Route("cnn-small", "1", True, (server,))])
    yield f"127.0.0.1:{grpc_port}"
    door.stop()


def call(address: str, message, metadata=AUTH):
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        return stub(message, metadata=metadata, timeout=30)


def failure(address: str, message, metadata=AUTH) -> tuple[grpc.StatusCode, str, str | None]:
    with pytest.raises(grpc.RpcError) as caught:
        call(address, message, metadata)
    err = caught.value
    return err.code(), err.details(), dict(err.trailing_metadata() or ()).get("x-fleet-error")


def test_a_worker_serves_model_infer_with_the_same_checks_as_http(worker):
    fleet_worker, address, path = worker
    check_model_infer(fleet_worker, address, path)


def test_through_the_front_door_over_http1_the_answers_are_the_same(worker, front_door):
    fleet_worker, _, path = worker
    check_model_infer(fleet_worker, front_door, path)


def test_grpc_over_http1_framing_and_status_text():
    assert unframe(b"\x00\x00\x00\x00\x02ab") == b"ab"
    with pytest.raises(GrpcUnimplemented, match="compressed"):
        unframe(b"\x01\x00\x00\x00\x02ab")
    with pytest.raises(InvalidInput, match="holds 1 bytes after its prefix, which announces 2"):
        unframe(b"\x00\x00\x00\x00\x02a")
    assert grpc_message_value("dimension 1 is 8; 100% wrong\né") == "dimension 1 is 8; 100%25 wrong%0A%C3%A9"
    answer = grpc_answer(status="NOT_FOUND", details="no", trailing=(("x-fleet-error", "ModelNotFound"),))
    assert answer.body == b"" and answer.trailers == [("grpc-status", "5"), ("grpc-message", "no"),
                                                      ("x-fleet-error", "ModelNotFound")]
    assert grpc_answer(b"xyz").body == b"\x00\x00\x00\x00\x03xyz"
    assert STATUS_CODES["NOT_FOUND"] == 5 and STATUS_CODES["UNAUTHENTICATED"] == 16


def check_model_infer(fleet_worker, address: str, path) -> None:
    missed_before = len(fleet_worker.missed)
    X = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    params, arrays, _ = read_grpc_response(call(address, grpc_request("digits-mlp", {"input": X})))
    label, probabilities = ort.InferenceSession(str(path)).run(None, {"input": X})
    np.testing.assert_array_equal(arrays["label"], label)
    np.testing.assert_allclose(arrays["probabilities"], probabilities, rtol=1e-6)
    assert params["fleet_worker"] == "w0"
    assert failure(address, grpc_request("digits-mlp", {"input": X}), ()) == (
        grpc.StatusCode.UNAUTHENTICATED, "this call needs 'Authorization: Bearer <token>' with the fleet's auth token",
        "Unauthorized")
    code, details, kind = failure(address, grpc_request("digits-mlp", {"input": X[:, :8]}))
    assert (code, kind) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidInput") and "dimension 1 is 8" in details
    assert call(address, grpc_request("cnn-small", {"input": X})).model_name == "passed-on"  # a miss: passed on
    assert fleet_worker.missed[missed_before:] == [("cnn-small", None)]
    code, details, kind = failure(address, grpc_request("cnn-small", {"input": X}), AUTH + (("x-fleet-routed", "1"),))
    assert (code, kind) == (grpc.StatusCode.UNAVAILABLE, "EngineNotHere")  # from the router: it tries elsewhere
    assert len(fleet_worker.missed) == missed_before + 1
    assert fleet_worker.request_stats.report()["models"]["digits-mlp"]["success"] >= 1


def route(model: str, worker_id: str, address: str) -> Route:
    host, port = address.rsplit(":", 1)
    return Route(model, "1", True, (Server(worker_id, host, 1, int(port)),))


def test_the_router_forwards_loads_on_a_miss_and_retries_elsewhere(worker):
    _, address, _ = worker
    loads: list = []
    X = np.random.default_rng(2).random((2, 64), dtype=np.float32)

    async def load(model, version):
        loads.append((model, version))
        if model == "nope":
            raise ModelNotFound("Request for unknown model: model 'nope' is not in the repository")
        return Placement(model, "1", {"w0": f"{model}:1"}, 1)

    async def scenario():
        router = GrpcRouter(GrpcFront(("127.0.0.1", 0), InferPolicy(auth_token=TOKEN, auth_inference=True)),
                            "http://127.0.0.1:9", load)
        port = await router.start()
        host, worker_port = address.rsplit(":", 1)
        router.set_addresses({"w0": (host, int(worker_port))})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                infer = channel.unary_unary(MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                            response_deserializer=pb.ModelInferResponse.FromString)
                router.set_routes([route("digits-mlp", "w0", address)])
                ok = await infer(grpc_request("digits-mlp", {"input": X}), metadata=AUTH)  # a route: no load
                assert loads == [] and read_grpc_response(ok)[1]["label"].shape == (2,)
                router.set_routes([])  # nobody holds it: the controller is asked, then the placement is used
                await infer(grpc_request("digits-mlp", {"input": X}, version="1"), metadata=AUTH)
                assert loads == [("digits-mlp", "1")]
                with pytest.raises(grpc.aio.AioRpcError) as no_token:  # nothing loads without the token
                    await infer(grpc_request("digits-mlp", {"input": X}))
                assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED and len(loads) == 1
                router.set_routes([route("digits-mlp", "dead", "127.0.0.1:9")])  # a worker gone: load, go on
                await infer(grpc_request("digits-mlp", {"input": X}), metadata=AUTH)
                assert loads[-1] == ("digits-mlp", None)
                router.set_routes([route("cnn-small", "w0", address)])  # evicted there a moment ago: load, try again
                with pytest.raises(grpc.aio.AioRpcError) as evicted:
                    await infer(grpc_request("cnn-small", {"input": X}), metadata=AUTH)
                assert evicted.value.code() == grpc.StatusCode.UNAVAILABLE and ("cnn-small", None) in loads
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await infer(grpc_request("nope", {"input": X}), metadata=AUTH)
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
                assert unknown.value.details().startswith("Request for unknown model")
                assert dict(router._in_flight) == {"w0": 0, "dead": 0}
        finally:
            await router.stop()

    asyncio.run(scenario())

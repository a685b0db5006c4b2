"""A worker's own gRPC endpoint and the fleet's gRPC router, without Ray: real gRPC, real ONNX Runtime."""

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from cluster.buildfarm import build_locally, local_target
from cluster.frontdoor.grpc_router import GrpcFront, GrpcRouter
from cluster.frontdoor.routes import Route, Server
from cluster.inventory import Placement
from cluster.repository import Repository
from workers.actor import FleetWorker, WorkerSpec
from workers.build import BuildRequest
from workers.errors import ModelNotFound
from workers.grpc_server import MODEL_INFER, GrpcOptions
from workers.kserve.grpc_codec import grpc_request, read_grpc_response
from workers.kserve.handler import InferPolicy
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.manifest import sha256_file

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

    host, port = worker.start_grpc(GrpcOptions(policy=InferPolicy(auth_token=TOKEN, auth_inference=True)), on_miss)
    worker.missed = missed
    yield worker, f"{host}:{port}", path
    worker.shutdown()


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
    assert fleet_worker.missed == [("cnn-small", None)]
    code, details, kind = failure(address, grpc_request("cnn-small", {"input": X}), AUTH + (("x-fleet-routed", "1"),))
    assert (code, kind) == (grpc.StatusCode.UNAVAILABLE, "EngineNotHere")  # from the router: it tries elsewhere
    assert len(fleet_worker.missed) == 1
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

"""tritonclient.http and tritonclient.grpc (sync, aio, streaming) against the fleet: the same tests.

Metadata, model configuration, inference for every datatype and multi-input models, system
shared memory, the repository (load with a config override, unload), statistics and errors,
each run once over HTTP (the front door) and once over gRPC (the fleet's gRPC router).
"""

import asyncio
import queue
import uuid

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import tritonclient.utils.shared_memory as tshm
from tritonclient.utils import InferenceServerException

from cluster.client import FleetClient
from workers.kserve.model_config import config_json

pytestmark = pytest.mark.integration
STATUS = {"http": {"NOT_FOUND": "404", "INVALID_ARGUMENT": "400"},
          "grpc": {"NOT_FOUND": "StatusCode.NOT_FOUND", "INVALID_ARGUMENT": "StatusCode.INVALID_ARGUMENT"}}


class Triton:
    """One of tritonclient's two clients, with its answers as Triton's JSON (gRPC's messages converted)."""

    def __init__(self, protocol: str, fleet: dict) -> None:
        self.protocol = protocol
        self.lib = httpclient if protocol == "http" else grpcclient
        self.url = fleet["url"].removeprefix("http://") if protocol == "http" else fleet["grpc"]
        self.client = self.lib.InferenceServerClient(self.url)

    def json(self, answer):
        return answer if self.protocol == "http" else config_json(answer)

    def config(self, model: str) -> dict:
        answer = self.client.get_model_config(model)
        return answer if self.protocol == "http" else config_json(answer.config)

    def inputs(self, feeds: dict, binary: bool = True) -> list:
        made = []
        for name, array in feeds.items():
            datatype = "BYTES" if array.dtype == np.object_ else {np.float32: "FP32", np.float16: "FP16", np.int64: "INT64",
                                                                  np.int32: "INT32"}[array.dtype.type]
            inp = self.lib.InferInput(name, list(array.shape), datatype)
            if self.protocol == "http":
                inp.set_data_from_numpy(array, binary_data=binary or datatype == "FP16")
            else:
                inp.set_data_from_numpy(array)
            made.append(inp)
        return made

    def status(self, code: str) -> str:
        return STATUS[self.protocol][code]


@pytest.fixture(scope="module")
def fleet(shared_fleet):
    return shared_fleet


@pytest.fixture(params=["http", "grpc"])
def triton(request, fleet):
    t = Triton(request.param, fleet)
    yield t
    t.client.close()


def direct(path, feeds):
    session = ort.InferenceSession(str(path))
    strings = {k: np.vectorize(bytes.decode, otypes=[object])(v) if v.dtype == np.object_ else v for k, v in feeds.items()}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, strings)))


def cases():
    rng = np.random.default_rng(11)
    numbers = np.array([[str(i).encode() for i in range(16)]] * 2, dtype=np.object_)
    return [
        ("digits-mlp", {"input": rng.random((3, 64), dtype=np.float32)}),
        ("fp16-scale", {"x": rng.standard_normal((4, 8)).astype(np.float16)}),
        ("int64-add", {"x": rng.integers(-1000, 1000, (5, 3), dtype=np.int64)}),
        ("add-sub", {"a": rng.standard_normal((2, 4)).astype(np.float32), "b": rng.standard_normal((2, 4)).astype(np.float32)}),
        ("simple", {"INPUT0": rng.integers(-50, 50, (2, 16), dtype=np.int32), "INPUT1": np.ones((2, 16), np.int32)}),
        ("mixed-scale", {"x": rng.random((3, 5), dtype=np.float32), "k": np.array([[1], [2], [3]], np.int64)}),
        ("simple_string", {"INPUT0": numbers, "INPUT1": np.full((2, 16), b"7", dtype=np.object_)}),
        ("simple_identity", {"INPUT0": np.array([[b"he\x00llo", "\u00e9t\u00e9".encode()]], dtype=np.object_)}),
    ]


def same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if want.dtype == np.object_ or want.dtype.kind == "U":
        want = np.array([w.encode() if isinstance(w, str) else w for w in want.reshape(-1)], dtype=np.object_).reshape(want.shape)
    else:
        assert got.dtype == want.dtype, what
    np.testing.assert_array_equal(got, want, err_msg=what)


def test_health_and_metadata(triton):
    client = triton.client
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("simple")
    server = triton.json(client.get_server_metadata())
    assert server["name"] == "forward-fleet"
    assert {"model_configuration", "statistics", "system_shared_memory"} <= set(server["extensions"])
    meta = triton.json(client.get_model_metadata("simple"))
    assert meta["name"] == "simple" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]


def test_model_configuration(triton):
    config = triton.config("simple")
    assert config["name"] == "simple" and config["max_batch_size"] == 16 and config["backend"] == "onnxruntime"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] >= 1
    assert triton.config("mixed-scale")["input"][0]["dims"] == [-1]  # the dynamic dimension besides the batch


def test_infer_every_datatype_and_multi_input_model(triton, fleet):
    for model, feeds in cases():
        expected = direct(fleet["sources"][model], feeds)
        result = triton.client.infer(model, triton.inputs(feeds))
        for name, want in expected.items():
            same(result.as_numpy(name), want, f"{triton.protocol} {model}:{name}")


def test_requested_outputs_and_json_inputs(triton, fleet):
    feeds = cases()[4][1]
    outputs = [triton.lib.InferRequestedOutput("OUTPUT1")]
    result = triton.client.infer("simple", triton.inputs(feeds, binary=False), outputs=outputs)
    same(result.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"], "OUTPUT1")
    assert result.as_numpy("OUTPUT0") is None


def test_system_shared_memory(triton):
    client = triton.client
    x0, x1 = np.arange(32, dtype=np.int32).reshape(2, 16), np.full((2, 16), 3, np.int32)
    tag = uuid.uuid4().hex[:8]
    inp = tshm.create_shared_memory_region(f"in_{tag}", f"/in_{tag}", 256)
    out = tshm.create_shared_memory_region(f"out_{tag}", f"/out_{tag}", 256)
    try:
        tshm.set_shared_memory_region(inp, [x0])
        tshm.set_shared_memory_region(inp, [x1], offset=128)
        client.register_system_shared_memory(f"in_{tag}", f"/in_{tag}", 256)
        client.register_system_shared_memory(f"out_{tag}", f"/out_{tag}", 256)
        inputs = [triton.lib.InferInput("INPUT0", [2, 16], "INT32"), triton.lib.InferInput("INPUT1", [2, 16], "INT32")]
        inputs[0].set_shared_memory(f"in_{tag}", 128)
        inputs[1].set_shared_memory(f"in_{tag}", 128, offset=128)
        outputs = [triton.lib.InferRequestedOutput("OUTPUT0"), triton.lib.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory(f"out_{tag}", 128)
        outputs[1].set_shared_memory(f"out_{tag}", 128, offset=128)
        result = client.infer("simple", inputs, outputs=outputs)
        assert result.get_output("OUTPUT0") is not None
        np.testing.assert_array_equal(tshm.get_contents_as_numpy(out, np.int32, [2, 16]), x0 + x1)
        np.testing.assert_array_equal(tshm.get_contents_as_numpy(out, np.int32, [2, 16], offset=128), x0 - x1)
        status = triton.json(client.get_system_shared_memory_status())
        names = {r["name"] for r in status} if triton.protocol == "http" else set(status["regions"])
        assert {f"in_{tag}", f"out_{tag}"} <= names
    finally:
        client.unregister_system_shared_memory(f"in_{tag}")
        client.unregister_system_shared_memory(f"out_{tag}")
        tshm.destroy_shared_memory_region(inp)
        tshm.destroy_shared_memory_region(out)
    client.unregister_cuda_shared_memory()  # answers, with nothing registered
    assert not triton.json(client.get_cuda_shared_memory_status()) or triton.protocol == "grpc"
    with pytest.raises(InferenceServerException, match="not supported here"):
        client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)


def test_statistics(triton):
    def count() -> int:
        stats = triton.json(triton.client.get_inference_statistics("int64-add"))["model_stats"]
        assert len(stats) == 1 and stats[0]["name"] == "int64-add" and stats[0]["version"] == "1"
        return int(stats[0]["inference_stats"]["success"]["count"])

    before = count()
    for _ in range(3):
        triton.client.infer("int64-add", triton.inputs({"x": np.ones((2, 3), np.int64)}))
    assert count() >= before + 3
    everything = triton.json(triton.client.get_inference_statistics())["model_stats"]
    assert {"digits-mlp", "int64-add", "simple"} <= {s["name"] for s in everything}


def test_load_with_a_config_override_then_unload(triton):
    client = triton.client
    feeds = {"a": np.ones((20, 4), np.float32), "b": np.ones((20, 4), np.float32)}
    try:
        client.load_model("add-sub", config='{"max_batch_size": "16"}')
        assert triton.config("add-sub")["max_batch_size"] == 16  # applied and visible
        same(client.infer("add-sub", triton.inputs(feeds)).as_numpy("sum"), np.full((20, 4), 2, np.float32), "sum")
        with pytest.raises(InferenceServerException, match="failed to load") as bad:
            client.load_model("add-sub", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
        assert bad.value.status() == triton.status("INVALID_ARGUMENT")
        with pytest.raises(InferenceServerException, match="over the 64 its artifact was built for"):
            client.load_model("add-sub", config='{"max_batch_size": 128}')
        with pytest.raises(InferenceServerException, match="failed to load"):
            client.load_model("wrong_model_name")
        client.unload_model("add-sub")
        assert not client.is_model_ready("add-sub")
    finally:
        client.load_model("add-sub")
    assert client.is_model_ready("add-sub") and triton.config("add-sub")["max_batch_size"] == 64


def test_errors_name_the_problem_with_tritons_status(triton):
    with pytest.raises(InferenceServerException) as unknown:
        triton.client.infer("wrong_model_name", triton.inputs({"x": np.ones((1, 3), np.int64)}))
    assert unknown.value.message().startswith("Request for unknown model")
    assert unknown.value.status() == triton.status("NOT_FOUND")
    with pytest.raises(InferenceServerException, match="Request for unknown model") as meta:
        triton.client.get_model_metadata("wrong_model_name")
    assert meta.value.status() == triton.status("NOT_FOUND")
    with pytest.raises(InferenceServerException, match=r"shape \[1, 4\] does not match the model's shape \[-1, 3\]") as shape:
        triton.client.infer("int64-add", triton.inputs({"x": np.ones((1, 4), np.int64)}))
    assert shape.value.status() == triton.status("INVALID_ARGUMENT")
    with pytest.raises(InferenceServerException, match="datatype INT32 does not match the model's INT64"):
        triton.client.infer("int64-add", triton.inputs({"x": np.ones((1, 3), np.int32)}))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_asyncio_clients(fleet, protocol):
    lib = httpaio if protocol == "http" else grpcaio
    url = fleet["url"].removeprefix("http://") if protocol == "http" else fleet["grpc"]
    helper = Triton(protocol, fleet)

    async def run():
        client = lib.InferenceServerClient(url)
        try:
            assert await client.is_server_ready() and await client.is_model_ready("add-sub")
            results = await asyncio.gather(*(client.infer(m, helper.inputs(f)) for m, f in cases()))
            for (model, feeds), result in zip(cases(), results):
                for name, want in direct(fleet["sources"][model], feeds).items():
                    same(result.as_numpy(name), want, f"{protocol} aio {model}:{name}")
            meta = helper.json(await client.get_model_metadata("add-sub"))
            assert [i["name"] for i in meta["inputs"]] == ["a", "b"]
            stats = helper.json(await client.get_inference_statistics("add-sub"))
            assert stats["model_stats"][0]["name"] == "add-sub"
        finally:
            await client.close()

    asyncio.run(run())


def test_grpc_streaming(fleet):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(fleet["grpc"])
    helper = Triton("grpc", fleet)
    sent = {}
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(6):
            feeds = {"INPUT0": np.full((1, 16), i, np.int32), "INPUT1": np.ones((1, 16), np.int32)}
            sent[str(i)] = feeds
            client.async_stream_infer("simple", helper.inputs(feeds), request_id=str(i))
        client.async_stream_infer("wrong_model_name", helper.inputs(feeds), request_id="bad")
        got, errors = {}, []
        for _ in range(7):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = result
    finally:
        client.stop_stream()
        client.close()
    assert sorted(got) == sorted(sent)
    for rid, feeds in sent.items():
        np.testing.assert_array_equal(got[rid].as_numpy("OUTPUT0"), feeds["INPUT0"] + 1)
    assert len(errors) == 1 and "Request for unknown model" in errors[0]


def test_fleet_client_over_grpc_equals_http(fleet):
    rng = np.random.default_rng(5)
    X = rng.random((40, 64), dtype=np.float32)
    with FleetClient(fleet["url"]) as http, FleetClient(fleet["grpc"], protocol="grpc") as grpc, \
            FleetClient(fleet["grpc"], protocol="grpc", shared_memory=True) as grpc_shm:
        expected = http.infer("digits-mlp", {"input": X})
        for client in (grpc, grpc_shm):
            got = client.infer("digits-mlp", {"input": X})
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name])
            assert client.last_parameters["fleet_worker"].endswith("-cpu")
        many = grpc.infer_many("digits-mlp", [{"input": X[i:i + 4]} for i in range(0, 40, 4)], concurrency=3)
        np.testing.assert_array_equal(np.concatenate([m["label"] for m in many]), expected["label"])
        region = grpc_shm._arena.region
        assert region in {r["name"] for r in grpc.get_system_shared_memory_status()}
        assert {m["name"] for m in grpc.models()} >= {"digits-mlp", "simple"}
        assert grpc.model_metadata("simple")["inputs"][0]["shape"] == [-1, 16]
    assert region not in {r["name"] for r in FleetClient(fleet["url"]).get_system_shared_memory_status()}

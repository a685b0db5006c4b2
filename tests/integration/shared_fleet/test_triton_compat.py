"""Triton's own client (tritonclient.http, sync and asyncio) against the fleet, unchanged."""

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(shared_fleet):
    return shared_fleet["url"].removeprefix("http://"), shared_fleet["sources"]


def direct(path, feeds):
    session = ort.InferenceSession(str(path))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def cases(sources):
    rng = np.random.default_rng(7)
    return [
        ("digits-mlp", {"input": rng.random((5, 64), dtype=np.float32)}),
        ("cnn-small", {"input": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)}),
        ("add-sub", {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal((3, 4)).astype(np.float32)}),
        ("fp16-scale", {"x": rng.standard_normal((4, 8)).astype(np.float16)}),
        ("int64-add", {"x": rng.integers(-1000, 1000, (6, 3), dtype=np.int64)}),
    ]


def make_inputs(feeds, binary):
    inputs = []
    for name, array in feeds.items():
        datatype = {np.float32: "FP32", np.float16: "FP16", np.int64: "INT64"}[array.dtype.type]
        inp = httpclient.InferInput(name, list(array.shape), datatype)
        # FP16 travels only as binary data in KServe v2 JSON, as with Triton
        inp.set_data_from_numpy(array, binary_data=binary or array.dtype == np.float16)
        inputs.append(inp)
    return inputs


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_sync_client_all_datatypes(server, binary):
    url, sources = server
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    for model, feeds in cases(sources):
        expected = direct(sources[model], feeds)
        outputs = None if binary else [httpclient.InferRequestedOutput(n, binary_data=False) for n in expected]
        result = client.infer(model, make_inputs(feeds, binary), outputs=outputs)
        for name, want in expected.items():
            got = result.as_numpy(name)
            assert got.dtype == want.dtype, (model, name)
            np.testing.assert_array_equal(got, want, err_msg=f"{model}:{name}")
        assert result.get_response()["parameters"]["fleet_worker"]


def test_async_client(server):
    url, sources = server

    async def run():
        client = aioclient.InferenceServerClient(url)
        try:
            assert await client.is_server_ready()
            results = await asyncio.gather(*(client.infer(m, make_inputs(f, True)) for m, f in cases(sources)))
            for (model, feeds), result in zip(cases(sources), results):
                for name, want in direct(sources[model], feeds).items():
                    np.testing.assert_array_equal(result.as_numpy(name), want)
            meta = await client.get_model_metadata("add-sub")
            assert [i["name"] for i in meta["inputs"]] == ["a", "b"]
        finally:
            await client.close()

    asyncio.run(run())


def test_metadata_and_errors(server):
    url, _ = server
    client = httpclient.InferenceServerClient(url)
    meta = client.get_model_metadata("fp16-scale")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP16", "shape": [-1, 8]}]
    assert client.get_server_metadata()["name"] == "forward-fleet"
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.infer("no-such-model", make_inputs({"x": np.zeros((1, 3), np.int64)}, True))
    with pytest.raises(InferenceServerException, match="datatype INT32 does not match the model's INT64"):
        bad = httpclient.InferInput("x", [1, 3], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.int32))
        client.infer("int64-add", [bad])


def test_repository_index(server):
    url, _ = server
    client = httpclient.InferenceServerClient(url)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert set(index) == {"digits-mlp", "cnn-small", "add-sub", "fp16-scale", "int64-add", "mixed-scale", "simple",
                          "simple_string", "simple_identity"}
    assert all(m["version"] == "1" and m["state"] in ("READY", "UNAVAILABLE") for m in index.values())


def test_repository_unload_then_load(server):
    url, _ = server
    client = httpclient.InferenceServerClient(url)
    feeds = {"x": np.ones((1, 3), np.int64)}
    client.infer("int64-add", make_inputs(feeds, True))
    assert client.is_model_ready("int64-add")
    client.unload_model("int64-add")
    assert not client.is_model_ready("int64-add")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["int64-add"]["state"] == "UNAVAILABLE" and index["int64-add"]["reason"] == "unloaded"
    with pytest.raises(InferenceServerException, match="was unloaded"):
        client.infer("int64-add", make_inputs(feeds, True))
    client.load_model("int64-add")
    assert client.is_model_ready("int64-add")
    assert client.infer("int64-add", make_inputs(feeds, True)).as_numpy("y").tolist() == [[8, 8, 8]]


def test_repository_load_unknown_model(server):
    url, _ = server
    client = httpclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.load_model("no-such-model")

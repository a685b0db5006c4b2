"""The calls of Triton's example clients (``src/python/examples/simple_{http,grpc}_*`` in Triton's client
repository), with the same expectations, over HTTP and gRPC, against the model "simple" (INT32 INPUT0,
INPUT1 [-1, 16] -> OUTPUT0 sum, OUTPUT1 difference) and its BYTES siblings.

Written here, not copied. Two checks of the examples are about Triton's own deployment, not
its protocol, and are left out: the server's name ("triton") and the number of models in
Triton's test repository (7 or 8).
"""

import queue
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as tshm
from tritonclient import utils
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration


@pytest.fixture(params=["http", "grpc"])
def example(request, shared_fleet):
    lib = httpclient if request.param == "http" else grpcclient
    url = shared_fleet["url"].removeprefix("http://") if request.param == "http" else shared_fleet["grpc"]
    client = lib.InferenceServerClient(url)
    # The examples expect a server that has just started with these models loaded; earlier tests on
    # the shared fleet may have unloaded them (schemathesis calls the repository API too).
    for model in ("simple", "simple_string", "simple_identity"):
        client.load_model(model)
    yield request.param, lib, client
    client.close()


def field(value, name):
    """A member of an answer: a dict over HTTP, a message over gRPC."""
    return value[name] if isinstance(value, dict) else getattr(value, name)


def simple_inputs(lib, protocol, input0, input1):
    inputs = [lib.InferInput("INPUT0", [1, 16], "INT32"), lib.InferInput("INPUT1", [1, 16], "INT32")]
    if protocol == "http":
        inputs[0].set_data_from_numpy(input0, binary_data=False)
        inputs[1].set_data_from_numpy(input1, binary_data=True)
    else:
        inputs[0].set_data_from_numpy(input0)
        inputs[1].set_data_from_numpy(input1)
    return inputs


def test_health_metadata(example):
    protocol, lib, client = example
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("simple")
    assert field(client.get_model_metadata("simple"), "name") == "simple"
    with pytest.raises(InferenceServerException) as wrong:
        client.get_model_metadata("wrong_model_name")
    assert "Request for unknown model" in wrong.value.message()
    if protocol == "grpc":
        assert client.get_model_config("simple").config.name == "simple"


def test_infer(example):
    protocol, lib, client = example
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    input1 = np.full((1, 16), -1, dtype=np.int32)
    outputs = [lib.InferRequestedOutput("OUTPUT0", binary_data=True) if protocol == "http" else lib.InferRequestedOutput("OUTPUT0"),
               lib.InferRequestedOutput("OUTPUT1", binary_data=False) if protocol == "http" else lib.InferRequestedOutput("OUTPUT1")]
    extra = {"query_params": {"test_1": 1, "test_2": 2}} if protocol == "http" else {"headers": {"test": "1"}}
    for asked in (outputs, None):
        results = client.infer("simple", simple_inputs(lib, protocol, input0, input1), outputs=asked, **extra)
        np.testing.assert_array_equal(results.as_numpy("OUTPUT0"), input0 + input1)
        np.testing.assert_array_equal(results.as_numpy("OUTPUT1"), input0 - input1)
    statistics = client.get_inference_statistics(model_name="simple")
    assert len(field(statistics, "model_stats")) == 1
    with pytest.raises(InferenceServerException) as wrong:
        client.infer("wrong_model_name", simple_inputs(lib, protocol, input0, input1))
    assert wrong.value.message().startswith("Request for unknown model")


def test_async_infer(example):
    protocol, lib, client = example
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=np.int32)
    if protocol == "http":
        pending = [client.async_infer("simple", simple_inputs(lib, protocol, input0, input1)) for _ in range(4)]
        results = [p.get_result() for p in pending]
    else:
        done: queue.Queue = queue.Queue()
        for _ in range(4):
            client.async_infer("simple", simple_inputs(lib, protocol, input0, input1),
                               callback=lambda result, error: done.put((result, error)))
        answers = [done.get(timeout=60) for _ in range(4)]
        assert all(error is None for _, error in answers)
        results = [result for result, _ in answers]
    for result in results:
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), input0 + input1)


def test_system_shared_memory(example):
    protocol, lib, client = example
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    tag = uuid.uuid4().hex[:8]
    input0, input1 = np.arange(16, dtype=np.int32), np.ones(16, dtype=np.int32)
    size = input0.nbytes
    out_handle = tshm.create_shared_memory_region("output_data", f"/output_simple_{tag}", size * 2)
    in_handle = tshm.create_shared_memory_region("input_data", f"/input_simple_{tag}", size * 2)
    try:
        client.register_system_shared_memory("output_data", f"/output_simple_{tag}", size * 2)
        tshm.set_shared_memory_region(in_handle, [input0])
        tshm.set_shared_memory_region(in_handle, [input1], offset=size)
        client.register_system_shared_memory("input_data", f"/input_simple_{tag}", size * 2)
        inputs = [lib.InferInput("INPUT0", [1, 16], "INT32"), lib.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_shared_memory("input_data", size)
        inputs[1].set_shared_memory("input_data", size, offset=size)
        outputs = [lib.InferRequestedOutput("OUTPUT0"), lib.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("output_data", size)
        outputs[1].set_shared_memory("output_data", size, offset=size)
        results = client.infer(model_name="simple", inputs=inputs, outputs=outputs)
        for name, offset, want in (("OUTPUT0", 0, input0 + input1), ("OUTPUT1", size, input0 - input1)):
            output = results.get_output(name)
            assert output is not None
            got = tshm.get_contents_as_numpy(out_handle, utils.triton_to_np_dtype(field(output, "datatype")),
                                             list(field(output, "shape")), offset=offset)
            np.testing.assert_array_equal(got[0], want)
        client.get_system_shared_memory_status()
        client.unregister_system_shared_memory()
    finally:
        tshm.destroy_shared_memory_region(in_handle)
        tshm.destroy_shared_memory_region(out_handle)
    assert len(tshm.mapped_shared_memory_regions()) == 0


def test_model_control(example):
    protocol, lib, client = example
    try:
        client.load_model("simple")
        assert client.is_model_ready("simple")
        with pytest.raises(InferenceServerException, match="failed to load"):
            client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
        client.load_model("simple", config='{"max_batch_size":"16"}')
        config = client.get_model_config("simple")
        assert (config["max_batch_size"] if protocol == "http" else config.config.max_batch_size) == 16
        client.unload_model("simple")
        assert not client.is_model_ready("simple")
        if protocol == "grpc":  # model files in the load request: refused without stopping the server
            with pytest.raises(InferenceServerException, match="failed to poll from model repository") as files:
                client.load_model("simple", config="{}", files={"file:" + "A" * 256: b"a"})
            assert files.value.status() == "StatusCode.INTERNAL"  # Triton's status, which its example checks
            assert client.is_server_live()
        with pytest.raises(InferenceServerException, match="failed to load"):
            client.load_model("wrong_model_name")
    finally:
        client.load_model("simple")


def test_string_infer(example):
    protocol, lib, client = example
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    inputs = [lib.InferInput("INPUT0", [1, 16], "BYTES"), lib.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[str(x).encode() for x in in0.reshape(-1)]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[str(x).encode() for x in in1.reshape(-1)]], dtype=np.object_))
    results = client.infer("simple_string", inputs)
    assert [int(x) for x in results.as_numpy("OUTPUT0").reshape(-1)] == (in0 + in1).reshape(-1).tolist()
    assert [int(x) for x in results.as_numpy("OUTPUT1").reshape(-1)] == (in0 - in1).reshape(-1).tolist()
    for array in (np.array([["he\x00llo".encode() for _ in range(16)]], dtype=np.object_),
                  np.array([[str(i).encode() for i in range(16)]], dtype=np.bytes_)):
        identity = lib.InferInput("INPUT0", list(array.shape), "BYTES")
        identity.set_data_from_numpy(array)
        got = client.infer("simple_identity", [identity]).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(got.astype(np.bytes_) if array.dtype != np.object_ else got, array)

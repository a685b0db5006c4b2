"""KServe v2 gRPC messages <-> the fleet's tensors, wire-compatible with tritonclient's own messages."""

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as triton_pb

from cluster.frontdoor.grpc_router import _length_delimited
from workers.errors import ERROR_TYPES, InvalidInput, error_from_grpc
from workers.kserve.codec import ShmWritten
from workers.kserve.grpc_codec import grpc_request, grpc_response, model_name_of, read_grpc_request, read_grpc_response
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.shm import ShmRef

ARRAYS = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.ones((2, 2), np.float16),
    "i64": np.array([[-(2**40), 3]], np.int64), "u8": np.array([1, 255], np.uint8), "b": np.array([True, False]),
    "s": np.array([[b"he\x00llo", "\u00e9".encode()]], dtype=np.object_),
}


def tritonclient_request(model: str, version: str, feeds: dict) -> bytes:
    """The bytes tritonclient.grpc itself sends for this request (caught by a real gRPC server)."""
    from concurrent.futures import ThreadPoolExecutor

    caught: list[bytes] = []

    def infer(raw, context):
        caught.append(raw)
        return pb.ModelInferResponse(model_name=model).SerializeToString()

    server = grpc.server(ThreadPoolExecutor(1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        inputs = []
        for name, array in feeds.items():
            datatype = grpcclient.np_to_triton_dtype(array.dtype) if array.dtype != np.object_ else "BYTES"
            inp = grpcclient.InferInput(name, list(array.shape), datatype)
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            client.infer(model, inputs, model_version=version, request_id="7")
    finally:
        server.stop(0)
    return caught[0]


def test_tritonclients_request_decodes_to_the_same_tensors():
    raw = tritonclient_request("m", "2", ARRAYS)
    assert model_name_of(raw) == ("m", "2")
    request = read_grpc_request(pb.ModelInferRequest.FromString(raw))
    assert request.id == "7" and set(request.inputs) == set(ARRAYS)
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(request.inputs[name], array)
        assert request.inputs[name].dtype == array.dtype


def test_the_model_name_is_read_without_the_tensors():
    big = {"x": np.zeros((1, 1 << 18), np.float32)}  # 1 MiB of raw_input_contents
    assert model_name_of(grpc_request("digits-mlp", big).SerializeToString()) == ("digits-mlp", "")
    raw = grpc_request("m", big, version="3").SerializeToString()
    with pytest.raises(InvalidInput, match="runs past its end"):
        model_name_of(raw[: len(raw) // 2])
    with pytest.raises(InvalidInput, match="wire type"):
        model_name_of(b"\x0f")


def test_typed_contents_and_their_errors():
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="a", datatype="INT32", shape=[2]).contents.int_contents.extend([1, -2])
    message.inputs.add(name="s", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    request = read_grpc_request(message)
    assert request.inputs["a"].dtype == np.int32 and request.inputs["a"].tolist() == [1, -2]
    assert request.inputs["s"].tolist() == [b"x"]
    for datatype, fill, error in (("FP16", None, "travels only in raw_input_contents"),
                                  ("INT8", [300], "out of range for INT8"), ("INT32", [1, 2, 3], "needs 2 values")):
        bad = pb.ModelInferRequest(model_name="m")
        tensor = bad.inputs.add(name="x", datatype=datatype, shape=[2] if datatype != "INT8" else [1])
        if fill is None:
            tensor.contents.fp32_contents.append(1.0)
        else:
            tensor.contents.int_contents.extend(fill)
        with pytest.raises(InvalidInput, match=error):
            read_grpc_request(bad)


def test_raw_contents_must_match_the_inputs():
    extra = grpc_request("m", {"x": np.ones(2, np.float32)})
    extra.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInput, match="1 raw_input_contents entries follow the inputs"):
        read_grpc_request(extra)
    missing = pb.ModelInferRequest(model_name="m")
    missing.inputs.add(name="x", datatype="FP32", shape=[1])
    with pytest.raises(InvalidInput, match="needs contents, raw_input_contents or a shared memory region"):
        read_grpc_request(missing)
    wrong = grpc_request("m", {"x": np.ones(2, np.float32)})
    wrong.raw_input_contents[0] = b"\0" * 7
    with pytest.raises(InvalidInput, match="does not match shape"):
        read_grpc_request(wrong)


def test_shared_memory_inputs_and_outputs_are_only_described():
    from workers.kserve.codec import ShmInput

    message = grpc_request("m", {}, outputs=["y", "z"], shm_inputs={"x": ShmInput(ShmRef("r", 24, 8), "FP32", (2, 3))},
                           shm_outputs={"y": ShmRef("r", 24, 64)})
    request = read_grpc_request(message)
    assert request.shm_inputs["x"].ref == ShmRef("r", 24, 8) and not request.inputs
    assert [(o.name, o.shm) for o in request.outputs] == [("y", ShmRef("r", 24, 64)), ("z", None)]
    outputs = {"y": ShmWritten(ShmRef("r", 24, 64), "FP32", (2, 3)), "z": np.ones(3, np.int64)}
    response = grpc_response("m", "1", outputs, request, {"fleet_worker": "w", "simulated": True})
    assert list(response.raw_output_contents) == [b"", np.ones(3, np.int64).tobytes()]  # aligned with the outputs
    params, arrays, written = read_grpc_response(response)
    assert params == {"fleet_worker": "w", "simulated": True}
    assert written["y"].ref == ShmRef("r", 24, 64) and arrays["z"].tolist() == [1, 1, 1]


def test_tritonclient_reads_the_fleets_answer():
    request = read_grpc_request(grpc_request("m", ARRAYS))
    response = grpc_response("m", "1", dict(request.inputs), request)
    result = grpcclient.InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)
    with pytest.raises(InvalidInput, match="requested output 'nope' does not exist"):
        grpc_response("m", "1", {"a": np.ones(1)}, read_grpc_request(grpc_request("m", ARRAYS, outputs=["nope"])))


def test_every_error_has_a_grpc_status_and_comes_back_as_itself():
    for name, cls in ERROR_TYPES.items():
        code = getattr(grpc.StatusCode, cls.grpc_status)  # a real status code
        again = error_from_grpc(code.name, "boom", name)
        assert type(again) is cls and again.message == "boom"
    assert type(error_from_grpc("INVALID_ARGUMENT", "x")).__name__ == "InvalidInput"
    assert type(error_from_grpc("UNAUTHENTICATED", "x")).__name__ == "Unauthorized"


def test_a_streams_answers_are_wrapped_as_tritons():
    body = grpc_response("m", "1", {"y": np.ones(300, np.float32)}, read_grpc_request(grpc_request("m", ARRAYS)))
    answer = pb.ModelStreamInferResponse.FromString(_length_delimited(2, body.SerializeToString()))
    assert answer.infer_response == body and answer.error_message == ""
    error = pb.ModelStreamInferResponse.FromString(_length_delimited(1, "Request for unknown model".encode()))
    assert error.error_message == "Request for unknown model"

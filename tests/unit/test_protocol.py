"""KServe v2 decoding/encoding, JSON and binary, without a server."""

import gzip
import json
import zlib

import numpy as np
import pytest

from workers.kserve.client_codec import decode_response, encode_request
from workers.kserve.codec import decode_request, decompress, encode_response
from workers.errors import InvalidInput, PayloadTooLarge


def json_request(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode()


def test_json_round_trip():
    body = json_request([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}], id="r1")
    req = decode_request(body)
    assert req.id == "r1"
    np.testing.assert_array_equal(req.inputs["x"], np.array([[1, 2], [3, 4]], np.float32))
    assert req.inputs["x"].dtype == np.float32
    content, headers = encode_response("m", "1", {"y": np.array([1, 2], np.int64)}, req, {"fleet_worker": "w"})
    assert headers["content-type"] == "application/json"
    header, arrays = decode_response(content, None)
    assert header["id"] == "r1" and header["parameters"] == {"fleet_worker": "w"}
    np.testing.assert_array_equal(arrays["y"], [1, 2])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.float64])
def test_binary_round_trip(dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5)) * 10).astype(dtype)
    body, headers = encode_request({"x": array}, binary=True)
    req = decode_request(body, headers["inference-header-content-length"])
    np.testing.assert_array_equal(req.inputs["x"], array)
    assert req.binary_output
    content, out_headers = encode_response("m", "1", {"y": array}, req)
    _, arrays = decode_response(content, out_headers["inference-header-content-length"])
    np.testing.assert_array_equal(arrays["y"], array)
    assert arrays["y"].dtype == array.dtype


def test_bytes_tensor_binary_and_json():
    words = np.array([b"alpha", b"", "βeta".encode()], dtype=np.object_)
    body, headers = encode_request({"s": words}, binary=True)
    req = decode_request(body, headers["inference-header-content-length"])
    assert list(req.inputs["s"]) == list(words)
    req2 = decode_request(json_request([{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]))
    assert list(req2.inputs["s"]) == [b"a", b"b"]


def test_requested_outputs_filter_and_binary_flag():
    body = json_request(
        [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}],
        outputs=[{"name": "b", "parameters": {"binary_data": True}}],
    )
    req = decode_request(body)
    content, headers = encode_response("m", "1", {"a": np.array([1]), "b": np.array([2.5], np.float32)}, req)
    header, arrays = decode_response(content, headers["inference-header-content-length"])
    assert [o["name"] for o in header["outputs"]] == ["b"]
    assert arrays["b"][0] == np.float32(2.5)


def test_unknown_requested_output_is_named():
    req = decode_request(json_request([{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}], outputs=[{"name": "nope"}]))
    with pytest.raises(InvalidInput, match="'nope' does not exist"):
        encode_response("m", "1", {"a": np.array([1])}, req)


def test_gzip_and_deflate_bodies():
    body = json_request([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.5]}])
    for encoded, name in ((gzip.compress(body), "gzip"), (zlib.compress(body), "deflate")):
        assert decode_request(decompress(encoded, name, 1 << 20)).inputs["x"][0] == 1.5
    with pytest.raises(InvalidInput, match="not valid gzip"):
        decompress(b"garbage", "gzip", 1 << 20)
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(b" " * 10_000), "gzip", 1000)


BAD = [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, "must be a JSON object"),
    (json_request([]), None, "non-empty 'inputs'"),
    (json_request([{"shape": [1], "datatype": "FP32", "data": [1]}]), None, "needs a 'name'"),
    (json_request([{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]), None, "datatype 'FLOAT'"),
    (json_request([{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]), None, "negative dimension"),
    (json_request([{"name": "x", "shape": "2", "datatype": "FP32", "data": [1]}]), None, "list of integers"),
    (json_request([{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]), None, "needs 3 values, 'data' has 2"),
    (json_request([{"name": "x", "shape": [2], "datatype": "INT64", "data": [1.5, 2]}]), None, "which are not INT64"),
    (json_request([{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]), None, "which are not FP32"),
    (json_request([{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]), None, "ragged"),
    (json_request([{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]), None, "out of range"),
    (json_request([{"name": "x", "shape": [1], "datatype": "FP32"}]), None, "needs 'data'"),
    (json_request([{"name": "x", "shape": [1], "datatype": "FP16", "data": [1]}]), None, "FP16 travels only as binary"),
    (json_request([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "appears twice"),
    (json_request([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]) + b"\0" * 4, "len", "runs past the end"),
    (json_request([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]) + b"\0" * 4, "len", "does not match shape"),
    (json_request([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]) + b"\0" * 6, "len", "no input claims them"),
    (b"{}", "9999", "does not fit a body"),
    (b"{}", "abc", "is not a number"),
]


@pytest.mark.parametrize("body,header_length,fragment", BAD, ids=[b[2] for b in BAD])
def test_bad_requests_name_the_problem(body, header_length, fragment):
    if header_length == "len":
        header_length = str(body.index(b"}]}") + 3)
    with pytest.raises(InvalidInput, match=fragment):
        decode_request(body, header_length)


def test_body_over_limit():
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        decode_request(b" " * 2000, limit=1000)

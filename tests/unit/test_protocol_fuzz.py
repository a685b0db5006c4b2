"""Property-based tests of the KServe v2 decoder: valid requests round-trip, broken ones
raise only our typed 4xx errors (never anything else)."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from workers.kserve.client_codec import encode_request
from workers.kserve.codec import decode_request
from workers.errors import InvalidInput, PayloadTooLarge

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.float16]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    elements = None
    if np.dtype(dtype).kind == "f":
        elements = st.floats(-1e3, 1e3, width=16 if dtype == np.float16 else 32, allow_nan=False)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), tensors(), min_size=1, max_size=3),
       st.booleans())
def test_valid_requests_round_trip(inputs, binary):
    if any(a.dtype == np.float16 for a in inputs.values()):
        binary = True  # FP16 is binary-only
    body, headers = encode_request(inputs, binary=binary)
    decoded = decode_request(body, headers.get("inference-header-content-length"))
    assert set(decoded.inputs) == set(inputs)
    for name, array in inputs.items():
        assert decoded.inputs[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded.inputs[name], array)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries({}, optional={
    "name": JSON_VALUES | st.just("x"),
    "shape": JSON_VALUES | st.lists(st.integers(-3, 10), max_size=3),
    "datatype": JSON_VALUES | st.sampled_from(["FP32", "INT64", "BYTES", "FP16", "BOOL"]),
    "data": JSON_VALUES,
    "parameters": JSON_VALUES | st.fixed_dictionaries({"binary_data_size": st.integers(-2, 40)}),
})


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.lists(FIELDS, max_size=3).map(lambda inputs: json.dumps({"inputs": inputs}).encode()),
), st.one_of(st.none(), st.integers(-5, 300).map(str), st.text(max_size=4)), st.binary(max_size=64))
def test_broken_requests_raise_only_typed_client_errors(body, header_length, tail):
    try:
        decode_request(body + (tail if header_length else b""), header_length, limit=1 << 16)
    except (InvalidInput, PayloadTooLarge) as exc:
        assert exc.http_status in (400, 413) and exc.message

"""Schemathesis against the server's own /openapi.json: no generated request, valid or not,
gets a 5xx; every 4xx carries {"error": ...}; afterwards a good request is still answered."""

import numpy as np
import onnxruntime as ort
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cluster.client import FleetClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet_url(shared_fleet):
    return shared_fleet["url"]


def operations(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    schema.config.base_url = url
    return [result.ok() for result in schema.get_all_operations()]


# Schemathesis' pytest plugin does not run on pytest 9 yet, so drive its strategies with Hypothesis directly.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_generated_request_gets_a_server_error(fleet_url, mode):
    ops = operations(fleet_url)
    assert any(op.path == "/v2/models/{model}/infer" for op in ops)
    calls = []

    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fleet_url, timeout=30)
            calls.append(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
            if 400 <= response.status_code < 500:
                assert "error" in response.json()

        try:
            check()
        except Unsatisfiable:  # nothing invalid can be made for a route without parameters or body
            assert mode == GenerationMode.NEGATIVE
    assert len(calls) >= 40


def test_openapi_is_published_and_server_still_answers(fleet_url, digits_test, demo_models):
    spec = requests.get(f"{fleet_url}/openapi.json", timeout=30).json()
    assert "/v2/models/{model}/infer" in spec["paths"]
    assert "requestBody" in spec["paths"]["/v2/models/{model}/infer"]["post"]
    X = digits_test[0][:4]
    with FleetClient(fleet_url) as client:
        out = client.infer("digits-mlp", {"input": X})
    label, probabilities = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-6)

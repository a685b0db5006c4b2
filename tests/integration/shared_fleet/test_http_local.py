"""One machine, the CPU as the device: the KServe v2 HTTP surface end to end."""

import numpy as np
import onnxruntime as ort
import pytest
import requests

from cluster.client import FleetClient
from cluster.demo import train_digits_mlp
from workers.errors import InvalidInput, ModelNotFound

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet_url(shared_fleet):
    return shared_fleet["url"]


def infer_json(url, model, rows, name="input", datatype="FP32"):
    body = {"inputs": [{"name": name, "shape": list(rows.shape), "datatype": datatype, "data": rows.tolist()}]}
    return requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)


def test_health_and_metadata(fleet_url):
    assert requests.get(f"{fleet_url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{fleet_url}/v2/health/ready").status_code == 200
    assert requests.get(f"{fleet_url}/v2").json()["name"] == "forward-fleet"
    meta = requests.get(f"{fleet_url}/v2/models/digits-mlp").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert requests.get(f"{fleet_url}/v2/models/digits-mlp/versions/1").json()["versions"] == ["1"]
    assert requests.get(f"{fleet_url}/v2/models/digits-mlp/ready").status_code == 200
    assert requests.get(f"{fleet_url}/v2/models/digits-mlp/versions/1/ready").json()["ready"] is True


def test_json_infer_matches_scikit_learn(fleet_url, digits_test):
    X = digits_test[0][:8]
    resp = infer_json(fleet_url, "digits-mlp", X)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    labels = next(o for o in body["outputs"] if o["name"] == "label")
    assert labels["datatype"] == "INT64" and labels["shape"] == [8]
    assert labels["data"] == train_digits_mlp().predict(X).tolist()
    params = body["parameters"]
    assert params["fleet_worker"].endswith("-cpu") and params["compute_capability"] == "cpu" and params["simulated"] is False


def test_versioned_infer_and_client_equal_direct_onnxruntime(fleet_url, demo_models):
    X = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(demo_models["cnn-small"])).run(None, {"input": X})[0]
    for binary in (True, False):
        with FleetClient(fleet_url, binary=binary) as client:
            out = client.infer("cnn-small", {"input": X}, version="1")
            np.testing.assert_array_equal(out["logits"], expected)
    with FleetClient(fleet_url) as client:
        index = client.models()
        assert {m["name"] for m in index} == {"digits-mlp", "cnn-small", "add-sub", "fp16-scale", "int64-add", "mixed-scale",
                                              "simple", "simple_string", "simple_identity"}
        status = client.status()
        worker = status["nodes"][0]["workers"][0]
        assert worker["device"]["kind"] == "cpu" and worker["budget_bytes"] == 4 << 30
        (digits,) = [b for b in status["builds"] if b["model"] == "digits-mlp"]
        assert digits["precision"] == "float32" and digits["target"] == "onnxruntime-cpu"
        assert digits["judged_on"] == "random inputs" and not digits["weak"] and "rel_l2_error 0" in digits["accuracy"]
        assert {e["key"].split(":")[0] for e in worker["ledger"]} == {m["name"] for m in index if m["state"] == "READY"}


BAD = [
    # (model, body, status, fragment)
    ("nope", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 404, "model 'nope' is not in the repository"),
    ("digits-mlp", {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 400, "unknown input 'pixels'"),
    ("digits-mlp", {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}, 400, "dimension 1 is 63, expected 64"),
    ("digits-mlp", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}, 400, "datatype INT64 does not match the model's FP32"),
    ("digits-mlp", {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 400, "needs 128 values, 'data' has 64"),
    ("digits-mlp", {"inputs": []}, 400, "non-empty 'inputs'"),
    ("..%2F..%2Fetc%2Fpasswd", {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [0.0]}]}, 400, "is not valid"),
    ("%2e%2e", {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [0.0]}]}, 400, "is not valid"),
]


@pytest.mark.parametrize("model,body,status,fragment", BAD, ids=[b[3] for b in BAD])
def test_bad_requests_get_4xx_naming_the_problem(fleet_url, digits_test, model, body, status, fragment):
    resp = requests.post(f"{fleet_url}/v2/models/{model}/infer", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]
    good = infer_json(fleet_url, "digits-mlp", digits_test[0][:2])
    assert good.status_code == 200


def test_malformed_json_then_good_request(fleet_url, digits_test):
    resp = requests.post(f"{fleet_url}/v2/models/digits-mlp/infer", data=b'{"inputs": [', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
    assert infer_json(fleet_url, "digits-mlp", digits_test[0][:1]).status_code == 200


def test_client_raises_server_error_types(fleet_url):
    with FleetClient(fleet_url) as client:
        with pytest.raises(ModelNotFound):
            client.infer("nope", {"input": np.zeros((1, 64), np.float32)})
        with pytest.raises(InvalidInput, match="datatype FP64"):
            client.infer("digits-mlp", {"input": np.zeros((1, 64))})


def test_large_request_is_split_over_max_batch(fleet_url, demo_models, digits_test):
    X = np.tile(digits_test[0], (2, 1))  # 900 rows > max batch 256
    with FleetClient(fleet_url) as client:
        out = client.infer("digits-mlp", {"input": X})
    expected = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})[0]
    np.testing.assert_array_equal(out["label"], expected)


def test_metrics_parse_and_counters_move(fleet_url, digits_test):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        text = requests.get(f"{fleet_url}/metrics", timeout=30).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return values

    def total(values, name, **labels):
        return sum(v for (n, ls), v in values.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))

    import time

    before = scrape()
    while True:  # let worker counters of earlier tests reach the controller (polled every second)
        time.sleep(1.2)
        now = scrape()
        if total(now, "fleet_nv_inference_count_total") == total(before, "fleet_nv_inference_count_total"):
            break
        before = now
    for _ in range(5):
        assert infer_json(fleet_url, "digits-mlp", digits_test[0][:3]).status_code == 200
    infer_json(fleet_url, "digits-mlp", digits_test[0][:3], datatype="INT64")  # a failure
    time.sleep(1.5)  # worker counters reach the controller on its next health poll
    after = scrape()
    assert total(after, "fleet_nv_inference_request_success_total", model="digits-mlp") - total(before, "fleet_nv_inference_request_success_total", model="digits-mlp") == 5
    assert total(after, "fleet_nv_inference_request_failure_total", model="digits-mlp") > total(before, "fleet_nv_inference_request_failure_total", model="digits-mlp")
    assert total(after, "fleet_nv_inference_count_total", model="digits-mlp") - total(before, "fleet_nv_inference_count_total", model="digits-mlp") == 15
    assert total(after, "fleet_gpu_budget_bytes") == 4 << 30
    assert total(after, "fleet_gpu_ledger_bytes") > 0


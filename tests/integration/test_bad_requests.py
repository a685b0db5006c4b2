"""Hostile and broken input over real HTTP: always a 4xx naming the problem, never a 500 or a crash."""

import gzip
import json

import numpy as np
import pytest
import requests

from cluster.client import FleetClient
from workers.kserve.client_codec import encode_request
from tests.integration.fleet_fixtures import build_cpu, running_fleet
from tests.models import make_add_sub
from workers.errors import Unauthorized

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def url(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("bad")
    repo = work / "repo"
    build_cpu(repo, demo_models["digits-mlp"], "digits-mlp")
    build_cpu(repo, demo_models["digits-mlp"], "strict")
    build_cpu(repo, make_add_sub(work / "add-sub.onnx"), "add-sub")
    config = work / "fleet.yaml"
    config.write_text(f"cpu_budget: 2GiB\nmax_request_bytes: {LIMIT}\nauth_token: {TOKEN}\n"
                      "models:\n  strict:\n    reject_non_finite: true\n")
    with running_fleet(str(config), repo) as (_, url):
        yield url


def row(n=1):
    return [0.5] * (64 * n)


def j(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode()


def inp(name="input", shape=(1, 64), datatype="FP32", data=None, **extra):
    d = {"name": name, "shape": list(shape), "datatype": datatype, **extra}
    if data is not None:
        d["data"] = data
    return d


def binary(header: dict, blobs: bytes):
    h = json.dumps(header).encode()
    return h + blobs, {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}


NAN_BODY, NAN_HEADERS = encode_request({"input": np.full((1, 64), np.nan, np.float32)})
F32 = np.zeros((1, 64), np.float32).tobytes()

# (id, model path, body, headers, status, message fragment)
BAD = [
    ("malformed-json", "digits-mlp", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("empty-body", "digits-mlp", b"", {}, 400, "not valid JSON"),
    ("not-utf8", "digits-mlp", b"\xff\xfe\x00", {}, 400, "not valid JSON"),
    ("array-body", "digits-mlp", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("no-inputs", "digits-mlp", b"{}", {}, 400, "non-empty 'inputs'"),
    ("inputs-not-list", "digits-mlp", b'{"inputs": {"a": 1}}', {}, 400, "non-empty 'inputs'"),
    ("input-not-object", "digits-mlp", j([5]), {}, 400, "inputs[0] must be an object"),
    ("input-no-name", "digits-mlp", j([{"shape": [1, 64], "datatype": "FP32", "data": row()}]), {}, 400, "needs a 'name'"),
    ("unknown-input", "digits-mlp", j([inp("pixels", data=row())]), {}, 400, "unknown input 'pixels'"),
    ("missing-input", "add-sub", j([inp("a", (1, 4), data=[0.0] * 4)]), {}, 400, "missing input 'b'"),
    ("duplicate-input", "digits-mlp", j([inp(data=row()), inp(data=row())]), {}, 400, "appears twice"),
    ("bad-datatype", "digits-mlp", j([inp(datatype="FLOAT", data=row())]), {}, 400, "datatype 'FLOAT'"),
    ("datatype-mismatch", "digits-mlp", j([inp(datatype="INT64", data=[0] * 64)]), {}, 400, "datatype INT64 does not match the model's FP32"),
    ("shape-not-list", "digits-mlp", j([inp(shape="1x64", data=row())]), {}, 400, "list of integers"),
    ("shape-float", "digits-mlp", j([{**inp(data=row()), "shape": [1.0, 64]}]), {}, 400, "list of integers"),
    ("negative-dim", "digits-mlp", j([inp(shape=(-1, 64), data=row())]), {}, 400, "negative dimension"),
    ("absurd-dim", "digits-mlp", j([inp(shape=(1 << 40, 64), data=row())]), {}, 400, "absurd dimension"),
    ("rank-mismatch", "digits-mlp", j([inp(shape=(64,), data=row())]), {}, 400, "rank 1"),
    ("wrong-dim", "digits-mlp", j([inp(shape=(1, 63), data=[0.0] * 63)]), {}, 400, "dimension 1 is 63, expected 64"),
    ("count-mismatch", "digits-mlp", j([inp(shape=(2, 64), data=row())]), {}, 400, "needs 128 values, 'data' has 64"),
    ("ragged-data", "digits-mlp", j([inp(shape=(2, 2), data=[[1.0], [1.0, 2.0]])]), {}, 400, "ragged"),
    ("strings-as-fp32", "digits-mlp", j([inp(data=["a"] * 64)]), {}, 400, "which are not FP32"),
    ("floats-as-int64", "digits-mlp", j([inp(datatype="INT64", data=[0.5] * 64)]), {}, 400, "which are not INT64"),
    ("int8-out-of-range", "digits-mlp", j([inp(shape=(1,), datatype="INT8", data=[1000])]), {}, 400, "out of range for INT8"),
    ("no-data", "digits-mlp", j([inp()]), {}, 400, "needs 'data' or parameters.binary_data_size"),
    ("data-and-binary", "digits-mlp", j([inp(data=row(), parameters={"binary_data_size": 256})]), {}, 400, "has both"),
    ("fp16-as-json", "digits-mlp", j([inp(datatype="FP16", data=row())]), {}, 400, "FP16 travels only as binary"),
    ("batch-mismatch", "add-sub", j([inp("a", (1, 4), data=[0.0] * 4), inp("b", (2, 4), data=[0.0] * 8)]), {}, 400, "differs from the other inputs' batch"),
    ("outputs-not-list", "digits-mlp", j([inp(data=row())], outputs={"name": "label"}), {}, 400, "'outputs' must be a list"),
    ("unknown-output", "digits-mlp", j([inp(data=row())], outputs=[{"name": "nope"}]), {}, 400, "'nope' does not exist"),
    ("parameters-not-object", "digits-mlp", j([inp(data=row())], parameters=[1]), {}, 400, "'parameters' must be an object"),
    ("header-length-nan", "digits-mlp", j([inp(data=row())]), {"Inference-Header-Content-Length": "abc"}, 400, "is not a number"),
    ("header-length-too-big", "digits-mlp", j([inp(data=row())]), {"Inference-Header-Content-Length": "999999"}, 400, "does not fit a body"),
    ("binary-runs-past", "digits-mlp", *binary({"inputs": [inp(parameters={"binary_data_size": 256})]}, F32[:100]), 400, "runs past the end"),
    ("binary-size-vs-shape", "digits-mlp", *binary({"inputs": [inp(parameters={"binary_data_size": 128})]}, F32[:128]), 400, "does not match shape"),
    ("binary-trailing-bytes", "digits-mlp", *binary({"inputs": [inp(parameters={"binary_data_size": 256})]}, F32 + b"xx"), 400, "no input claims them"),
    ("binary-negative-size", "digits-mlp", *binary({"inputs": [inp(parameters={"binary_data_size": -4})]}, b""), 400, "non-negative integer"),
    ("bytes-truncated", "digits-mlp", *binary({"inputs": [inp(shape=(1,), datatype="BYTES", parameters={"binary_data_size": 6})]}, b"\x09\x00\x00\x00ab"), 400, "runs past the data"),
    ("gzip-garbage", "digits-mlp", b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("unknown-encoding", "digits-mlp", j([inp(data=row())]), {"Content-Encoding": "br"}, 400, "'br' is not supported"),
    ("body-over-limit", "digits-mlp", b" " * (LIMIT + 1), {}, 413, "over the limit"),
    ("gzip-bomb", "digits-mlp", gzip.compress(b" " * (LIMIT * 4)), {"Content-Encoding": "gzip"}, 413, "decompressed request body is over the limit"),
    ("nan-rejected", "strict", NAN_BODY, NAN_HEADERS, 400, "NaN or Inf"),
    # every field of the protocol: wrong type, wrong range, wrong combination
    ("zero-rows-json", "digits-mlp", j([inp(shape=(0, 64), data=[])]), {}, 400, "a batch of 0 rows"),
    ("zero-rows-binary", "digits-mlp", *binary({"inputs": [inp(shape=(0, 64), parameters={"binary_data_size": 0})]}, b""), 400, "a batch of 0 rows"),
    ("id-object", "digits-mlp", j([inp(data=row())], id={"x": 1}), {}, 400, "'id' must be a string"),
    ("id-number", "digits-mlp", j([inp(data=row())], id=7), {}, 400, "'id' must be a string"),
    ("body-null", "digits-mlp", b"null", {}, 400, "must be a JSON object"),
    ("inputs-null", "digits-mlp", b'{"inputs": null}', {}, 400, "non-empty 'inputs'"),
    ("name-not-string", "digits-mlp", j([{**inp(data=row()), "name": 5}]), {}, 400, "needs a 'name'"),
    ("name-empty", "digits-mlp", j([{**inp(data=row()), "name": ""}]), {}, 400, "needs a 'name'"),
    ("datatype-not-string", "digits-mlp", j([{**inp(data=row()), "datatype": 32}]), {}, 400, "is not a KServe v2 datatype"),
    ("shape-missing", "digits-mlp", j([{"name": "input", "datatype": "FP32", "data": row()}]), {}, 400, "list of integers"),
    ("shape-bool", "digits-mlp", j([inp(shape=(True, 64), data=row())]), {}, 400, "list of integers"),
    ("extra-dimension", "digits-mlp", j([inp(shape=(1, 64, 1), data=row())]), {}, 400, "rank 3"),
    ("input-params-not-object", "digits-mlp", j([inp(data=row(), parameters=[1])]), {}, 400, "'parameters' must be an object"),
    ("output-not-object", "digits-mlp", j([inp(data=row())], outputs=[5]), {}, 400, "outputs[0] needs a 'name'"),
    ("output-params-not-object", "digits-mlp", j([inp(data=row())], outputs=[{"name": "label", "parameters": 5}]), {}, 400, "'parameters' must be an object"),
    ("binary-size-bool", "digits-mlp", *binary({"inputs": [inp(parameters={"binary_data_size": True})]}, F32), 400, "non-negative integer"),
    ("binary-size-float", "digits-mlp", *binary({"inputs": [inp(parameters={"binary_data_size": 256.0})]}, F32), 400, "non-negative integer"),
    ("bools-as-fp32", "digits-mlp", j([inp(data=[True] * 64)]), {}, 400, "which are not FP32"),
    ("uint8-negative", "digits-mlp", j([inp(shape=(1,), datatype="UINT8", data=[-1])]), {}, 400, "out of range for UINT8"),
    ("shm-region-without-size", "digits-mlp", j([inp(parameters={"shared_memory_region": "r"})]), {}, 400, "go together"),
    ("shm-offset-alone", "digits-mlp", j([inp(parameters={"shared_memory_offset": 4})]), {}, 400, "needs shared_memory_region"),
    ("shm-negative-size", "digits-mlp", j([inp(parameters={"shared_memory_region": "r", "shared_memory_byte_size": -1})]), {}, 400, "non-negative integer"),
    ("shm-and-data", "digits-mlp", j([inp(data=row(), parameters={"shared_memory_region": "r", "shared_memory_byte_size": 256})]), {}, 400, "also carries data"),
    ("shm-output-and-binary", "digits-mlp", j([inp(data=row())], outputs=[{"name": "label", "parameters": {
        "binary_data": True, "shared_memory_region": "r", "shared_memory_byte_size": 8}}]), {}, 400, "asks for binary data and for a shared memory region"),
    ("header-length-negative", "digits-mlp", j([inp(data=row())]), {"Inference-Header-Content-Length": "-5"}, 400, "does not fit a body"),
    ("deflate-garbage", "digits-mlp", b"not deflate", {"Content-Encoding": "deflate"}, 400, "not valid deflate"),
    ("unknown-model", "no-such-model", j([inp(data=row())]), {}, 404, "model 'no-such-model' is not in the repository"),
    ("unknown-version", "digits-mlp/versions/7", j([inp(data=row())]), {}, 404, "no version '7'"),
    ("path-traversal", "..%2F..%2Fetc%2Fpasswd", j([inp(data=row())]), {}, 400, "is not valid"),
    ("dotdot-model", "%2e%2e", j([inp(data=row())]), {}, 400, "is not valid"),
    ("version-traversal", "digits-mlp/versions/..%2F..", j([inp(data=row())]), {}, 400, "is not valid"),
]


def good(url):
    X = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    resp = requests.post(f"{url}/v2/models/digits-mlp/infer", data=j([inp(shape=(2, 64), data=X.tolist())]), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def ingress(url):
    """The Serve ingress behind the front door (what serves misses, metadata and the repository API)."""
    status = requests.get(f"{url}/v2/fleet/status", timeout=30).json()
    return "http://" + status["front_door"]["ingress"]


@pytest.mark.parametrize("case,model,body,headers,status,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_request(url, ingress, case, model, body, headers, status, fragment):
    """Through the front door (a worker's own endpoint for a loaded model) and straight at the ingress:
    one handler, so the same status and message on both."""
    answers = {}
    for where, base in (("front door", url), ("ingress", ingress)):
        resp = requests.post(f"{base}/v2/models/{model}/infer", data=body, headers=headers, timeout=30)
        assert resp.status_code == status, (where, resp.text)
        assert fragment in resp.json()["error"], (where, resp.json())
        answers[where] = (resp.status_code, resp.json()["error"], resp.headers.get("x-fleet-error"))
    assert answers["front door"] == answers["ingress"]
    good(url)  # the next good request still succeeds


def test_wrong_method_is_a_4xx_with_error_body(url):
    resp = requests.get(f"{url}/v2/models/digits-mlp/infer", timeout=30)
    assert resp.status_code == 405 and "error" in resp.json()


def test_admin_calls_need_the_token_and_change_nothing(url):
    before = requests.get(f"{url}/v2/fleet/status", timeout=30).json()
    for path in ("/v2/repository/index", "/v2/repository/models/digits-mlp/unload", "/v2/repository/models/add-sub/load"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            resp = requests.post(url + path, headers=headers, timeout=30)
            assert resp.status_code == 401 and "Bearer" in resp.json()["error"], (path, headers, resp.text)
    after = requests.get(f"{url}/v2/fleet/status", timeout=30).json()
    loaded = lambda s: sorted(e["key"] for n in s["nodes"] for w in n["workers"] for e in w["ledger"])  # noqa: E731
    assert loaded(after) == loaded(before)
    good(url)
    with FleetClient(url) as anonymous:
        with pytest.raises(Unauthorized):
            anonymous.unload("digits-mlp")
    with FleetClient(url, token=TOKEN) as admin:
        assert {m["name"] for m in admin.models()} == {"digits-mlp", "strict", "add-sub"}


def test_server_binds_loopback_by_default():
    from cluster.config import load_config

    assert load_config(None).host == "127.0.0.1" and load_config("configs/local.yaml").host == "127.0.0.1"


def test_hundreds_of_bad_requests_leave_the_worker_unharmed(url):
    def rss():
        s = requests.get(f"{url}/v2/fleet/status", timeout=30).json()
        return s["nodes"][0]["workers"][0]["rss_bytes"]

    reference = good(url)
    session = requests.Session()
    for _ in range(3):  # warm up allocator pools
        for case in BAD[:20]:
            session.post(f"{url}/v2/models/{case[1]}/infer", data=case[2], headers=case[3], timeout=30)
    before = rss()
    statuses = set()
    for i in range(1000):  # a leak of 16 KiB a request fails it, as 2,000 requests and 32 MiB did
        case = BAD[i % len(BAD)]
        if case[0] in ("body-over-limit", "gzip-bomb"):
            continue
        statuses.add(session.post(f"{url}/v2/models/{case[1]}/infer", data=case[2], headers=case[3], timeout=30).status_code)
    assert statuses <= {400, 404, 413}
    assert good(url) == reference
    assert rss() - before < 16 << 20


def test_shared_memory_registration_is_refused_while_the_fleet_does_not_allow_it(url):
    """allow_client_shm is off by default (as Triton's --allow-client-shm): no worker maps anything."""
    r = requests.post(f"{url}/v2/systemsharedmemory/region/r1/register", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"key": "/r1", "offset": 0, "byte_size": 64}, timeout=30)
    assert r.status_code == 400 and "allow_client_shm: true" in r.json()["error"], r.text
    assert requests.get(f"{url}/v2/systemsharedmemory/status", timeout=30).json() == []
    assert "system_shared_memory" not in requests.get(f"{url}/v2", timeout=30).json()["extensions"]


@pytest.mark.parametrize("client", ["urllib", "requests", "tritonclient"])
def test_a_body_over_the_limit_is_a_clear_413_for_clients_that_send_it_at_once(url, ingress, client):
    """Clients that send the body without waiting for "100 Continue" must read the 413, not a broken
    pipe: through the front door (a worker's endpoint) and at the ingress."""
    import urllib.error
    import urllib.request

    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    rows = np.zeros((32 * LIMIT // 256, 64), np.float32)  # 32 MiB of FP32, far more than sockets buffer
    body, headers = encode_request({"input": rows})
    for base in (url, ingress):
        if client == "urllib":
            request = urllib.request.Request(f"{base}/v2/models/digits-mlp/infer", data=body, headers=headers, method="POST")
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=30)
            status, message = caught.value.code, json.loads(caught.value.read())["error"]
        elif client == "requests":
            resp = requests.post(f"{base}/v2/models/digits-mlp/infer", data=body, headers=headers, timeout=30)
            status, message = resp.status_code, resp.json()["error"]
        else:
            triton = httpclient.InferenceServerClient(base.removeprefix("http://"))
            inp = httpclient.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows)
            with pytest.raises(InferenceServerException) as caught:
                triton.infer("digits-mlp", [inp])
            status, message = int(caught.value.status() or 0), caught.value.message()
            triton.close()
        assert status == 413 and "over the limit" in message, (base, status, message)
    good(url)

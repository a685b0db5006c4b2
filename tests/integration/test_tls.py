"""TLS at the front door: HTTPS and gRPC over TLS, mutual TLS, the token still required, plain HTTP off.

A fleet with ``tls: {cert, key, client_ca}`` and ``auth_token`` (inference included), with
certificates this test makes (tests/tls_certs.py): the Python client (HTTP, gRPC and asyncio)
and tritonclient (``ssl=True``, HTTP and gRPC) infer through it; a client without a
certificate, with one from another CA, or one that does not trust the server's is refused;
the token is still required; nothing answers plain HTTP or plain gRPC on the fleet's ports.
"""

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cluster.client import AsyncFleetClient, FleetClient
from cluster.client_tls import ClientTls
from tests.integration.fleet_fixtures import build_cpu, running_fleet
from tests.tls_certs import make_certs
from workers.errors import FleetError, Unauthorized

pytestmark = pytest.mark.integration
TOKEN = "tls-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}  # lower case: gRPC metadata must be


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("tls")
    certs = make_certs(work / "certs")
    build_cpu(work / "repo", demo_models["digits-mlp"], "digits-mlp")
    tls = {"cert": str(certs.server_cert), "key": str(certs.server_key), "client_ca": str(certs.ca)}
    with running_fleet(None, work / "repo", auth_token=TOKEN, auth_inference=True, tls=tls) as (config, url):
        yield {"url": url, "grpc": f"127.0.0.1:{config.grpc_port}", "port": config.port, "certs": certs,
               "tls": ClientTls(str(certs.ca), str(certs.client_cert), str(certs.client_key)),
               "expected": ort.InferenceSession(str(demo_models["digits-mlp"]))}


def rows(n=4):
    return np.random.default_rng(n).random((n, 64), dtype=np.float32)


def expected(fleet, x):
    return fleet["expected"].run(None, {"input": x})[0]


def test_the_python_client_over_https_and_grpc_with_tls(fleet):
    assert fleet["url"].startswith("https://127.0.0.1:")
    x = rows()
    with FleetClient(fleet["url"], token=TOKEN, tls=fleet["tls"]) as client:
        np.testing.assert_array_equal(client.infer("digits-mlp", {"input": x})["label"], expected(fleet, x))
        assert client.status()["front_door"]["tls"] == "mutual"
    with FleetClient(fleet["grpc"], token=TOKEN, tls=fleet["tls"], protocol="grpc") as client:
        np.testing.assert_array_equal(client.infer("digits-mlp", {"input": x})["label"], expected(fleet, x))

    async def over_asyncio():
        async with AsyncFleetClient(fleet["url"], token=TOKEN, tls=fleet["tls"]) as client:
            return await client.infer("digits-mlp", {"input": x})

    np.testing.assert_array_equal(asyncio.run(over_asyncio())["label"], expected(fleet, x))


def test_the_token_is_still_required(fleet):
    with FleetClient(fleet["url"], tls=fleet["tls"]) as client:
        with pytest.raises(Unauthorized):
            client.infer("digits-mlp", {"input": rows()})
    with FleetClient(fleet["grpc"], tls=fleet["tls"], protocol="grpc") as client:
        with pytest.raises(Unauthorized):
            client.infer("digits-mlp", {"input": rows()})
    resp = requests.post(f"{fleet['url']}/v2/repository/models/digits-mlp/unload", timeout=30,
                         verify=str(fleet["certs"].ca), cert=(str(fleet["certs"].client_cert), str(fleet["certs"].client_key)))
    assert resp.status_code == 401


def test_tritonclient_with_ssl(fleet):
    certs, x = fleet["certs"], rows(3)
    http = httpclient.InferenceServerClient(
        url=f"127.0.0.1:{fleet['port']}", ssl=True,
        ssl_options={"ca_certs": str(certs.ca), "certfile": str(certs.client_cert), "keyfile": str(certs.client_key)})
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    assert http.is_model_ready("digits-mlp", headers=dict(AUTH))
    result = http.infer("digits-mlp", [inp], headers=dict(AUTH))
    np.testing.assert_array_equal(result.as_numpy("label"), expected(fleet, x))
    with pytest.raises(InferenceServerException, match="401|token"):
        http.infer("digits-mlp", [inp])
    http.close()

    grpc = grpcclient.InferenceServerClient(
        url=fleet["grpc"], ssl=True, root_certificates=str(certs.ca), private_key=str(certs.client_key),
        certificate_chain=str(certs.client_cert))
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert grpc.is_server_ready(headers=dict(AUTH))
    result = grpc.infer("digits-mlp", [inp], headers=dict(AUTH))
    np.testing.assert_array_equal(result.as_numpy("label"), expected(fleet, x))
    grpc.close()


@pytest.mark.parametrize("who", ["no certificate", "a certificate of another CA"])
def test_a_client_without_a_certificate_of_the_clients_ca_is_refused(fleet, who):
    certs = fleet["certs"]
    tls = ClientTls(str(certs.ca)) if who == "no certificate" else \
        ClientTls(str(certs.ca), str(certs.stranger_cert), str(certs.stranger_key))
    with FleetClient(fleet["url"], token=TOKEN, tls=tls) as client:
        with pytest.raises(FleetError, match="cannot reach the fleet"):
            client.infer("digits-mlp", {"input": rows()})
    with FleetClient(fleet["grpc"], token=TOKEN, tls=tls, protocol="grpc", timeout=10) as client:
        with pytest.raises(FleetError):
            client.infer("digits-mlp", {"input": rows()})


def test_a_client_that_does_not_trust_the_servers_certificate_refuses_it(fleet):
    certs = fleet["certs"]
    untrusting = ClientTls(None, str(certs.client_cert), str(certs.client_key))  # the system's CAs only
    with FleetClient(fleet["url"], token=TOKEN, tls=untrusting) as client:
        with pytest.raises(FleetError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            client.infer("digits-mlp", {"input": rows()})


def test_plain_http_and_plain_grpc_are_off(fleet):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{fleet['port']}/v2/health/ready", timeout=10)
    with FleetClient(fleet["grpc"], token=TOKEN, protocol="grpc", timeout=10) as client:
        with pytest.raises(FleetError):
            client.infer("digits-mlp", {"input": rows()})

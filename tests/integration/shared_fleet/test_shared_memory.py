"""System shared memory on a real fleet: Triton's own client and shared memory utilities,
the fleet's Python client, through the front door and through the ingress."""

import os
import time
import uuid

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as tshm
from tritonclient.utils import InferenceServerException

from cluster.client import FleetClient
from cluster.demo import train_digits_mlp
from workers.errors import SharedMemoryError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(shared_fleet):
    return shared_fleet["url"]


@pytest.fixture
def triton(fleet):
    client = httpclient.InferenceServerClient(fleet.removeprefix("http://"))
    handles = []

    def region(nbytes: int):
        name = f"t_{uuid.uuid4().hex[:8]}"
        handle = tshm.create_shared_memory_region(name, "/" + name, nbytes)
        handles.append(handle)
        client.register_system_shared_memory(name, "/" + name, nbytes)
        return name, handle

    yield client, region
    client.unregister_system_shared_memory()
    for handle in handles:
        tshm.destroy_shared_memory_region(handle)
    client.close()


def test_tritonclient_shared_memory_round_trip(triton, fleet, digits_test, demo_models):
    client, region = triton
    X = np.ascontiguousarray(digits_test[0][:32], dtype=np.float32)
    in_name, in_handle = region(X.nbytes)
    out_name, out_handle = region(32 * 8 + 32 * 10 * 4)
    tshm.set_shared_memory_region(in_handle, [X])
    inp = httpclient.InferInput("input", list(X.shape), "FP32")
    inp.set_shared_memory(in_name, X.nbytes)
    label = httpclient.InferRequestedOutput("label")
    label.set_shared_memory(out_name, 32 * 8)
    probs = httpclient.InferRequestedOutput("probabilities")
    probs.set_shared_memory(out_name, 32 * 10 * 4, offset=32 * 8)
    result = client.infer("digits-mlp", [inp], outputs=[label, probs])
    entry = result.get_output("probabilities")
    assert "data" not in entry and "data" not in result.get_output("label")  # nothing came over HTTP
    assert "parameters" not in entry  # as Triton answers (its C++ client reads any parameters as binary data)
    labels = tshm.get_contents_as_numpy(out_handle, np.int64, [32])
    probabilities = tshm.get_contents_as_numpy(out_handle, np.float32, [32, 10], offset=256)
    assert labels.tolist() == train_digits_mlp().predict(X).tolist()
    expected = ort.InferenceSession(str(demo_models["digits-mlp"])).run(["probabilities"], {"input": X})[0]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    status = client.get_system_shared_memory_status()
    assert {(r["name"], r["key"], r["byte_size"]) for r in status} >= {(in_name, "/" + in_name, X.nbytes)}
    assert client.get_system_shared_memory_status(region_name=in_name) == [
        {"name": in_name, "key": "/" + in_name, "offset": 0, "byte_size": X.nbytes}]
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]


def test_fleet_client_shared_memory_equals_http(fleet, demo_models):
    rng = np.random.default_rng(3)
    X = rng.random((256, 64), dtype=np.float32)
    images = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    with FleetClient(fleet) as plain, FleetClient(fleet, shared_memory=True) as shm:
        for model, feeds in (("digits-mlp", {"input": X[:3]}), ("digits-mlp", {"input": X}),
                             ("cnn-small", {"input": images})):
            expected = plain.infer(model, feeds)
            got = shm.infer(model, feeds)
            assert got.keys() == expected.keys()
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name])
        assert shm.last_parameters["fleet_worker"].endswith("-cpu")
        region = shm._arena.region
        assert shm._arena.byte_size >= X.nbytes  # grew past the first small request
        assert region in {r["name"] for r in shm.get_system_shared_memory_status()}
        assert os.path.exists(f"/dev/shm/{region}")
    assert region not in {r["name"] for r in FleetClient(fleet).get_system_shared_memory_status()}
    assert not os.path.exists(f"/dev/shm/{region}")


def test_shared_memory_through_the_ingress(fleet):
    """The ingress (Serve) path: what the front door sends there, e.g. a model not loaded."""
    status = requests.get(f"{fleet}/v2/fleet/status", timeout=30).json()
    ingress = "http://" + status["front_door"]["ingress"]
    X = np.random.default_rng(5).random((4, 64), dtype=np.float32)
    with FleetClient(ingress, shared_memory=True) as via_ingress, FleetClient(fleet) as plain:
        got = via_ingress.infer("digits-mlp", {"input": X})
        expected = plain.infer("digits-mlp", {"input": X})
    np.testing.assert_array_equal(got["probabilities"], expected["probabilities"])
    np.testing.assert_array_equal(got["label"], expected["label"])


def test_shared_memory_errors_are_clear(triton, fleet):
    client, region = triton
    name, _ = region(64)
    with pytest.raises(InferenceServerException, match="already registered"):
        client.register_system_shared_memory(name, "/" + name, 64)
    with pytest.raises(InferenceServerException, match="does not exist on any host of the fleet"):
        client.register_system_shared_memory("ghost", "/ff_ghost_" + uuid.uuid4().hex, 64)
    with pytest.raises(InferenceServerException, match="not a POSIX shared memory name"):
        client.register_system_shared_memory("evil", "/../../etc/passwd", 64)
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_shared_memory("never-registered", 256)
    for url in (fleet, "http://" + requests.get(f"{fleet}/v2/fleet/status").json()["front_door"]["ingress"]):
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "parameters": {"shared_memory_region": "never-registered", "shared_memory_byte_size": 256}}]}
        resp = requests.post(f"{url}/v2/models/digits-mlp/infer", json=body, timeout=30)
        assert resp.status_code == 400 and "'never-registered' is not registered" in resp.json()["error"], resp.text
    small_in = httpclient.InferInput("input", [1, 64], "FP32")
    small_in.set_data_from_numpy(np.zeros((1, 64), np.float32))
    out = httpclient.InferRequestedOutput("probabilities")
    out.set_shared_memory(name, 8)
    with pytest.raises(InferenceServerException, match="output 'probabilities' needs 40 bytes"):
        client.infer("digits-mlp", [small_in], outputs=[out])
    with FleetClient(fleet) as fc, pytest.raises(SharedMemoryError, match="is not registered"):
        fc.get_system_shared_memory_status("never-registered")


def test_regions_are_mapped_again_on_a_replacement_worker(fleet):
    """A worker dies; the controller starts another, which maps the client's regions as the old one
    had, so shared memory requests go on without the client registering anything again."""
    import ray

    from cluster.names import CONTROLLER_NAME, NAMESPACE
    from tests.integration.fleet_fixtures import worker_handles

    X = np.random.default_rng(9).random((8, 64), dtype=np.float32)
    with FleetClient(fleet, shared_memory=True) as shm, FleetClient(fleet) as plain:
        expected = plain.infer("digits-mlp", {"input": X})["label"]
        np.testing.assert_array_equal(shm.infer("digits-mlp", {"input": X})["label"], expected)
        region = shm._arena.region
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        (worker_id, handle), = worker_handles(controller).items()
        ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            handles = worker_handles(controller)
            if handles[worker_id] != handle:
                try:
                    if region in {r["name"] for r in ray.get(handles[worker_id].stats.remote())["shm"]}:
                        break
                except ray.exceptions.RayActorError:
                    pass
            time.sleep(0.25)
        else:
            pytest.fail("the replacement worker did not map the client's region within 60 s")
        np.testing.assert_array_equal(shm.infer("digits-mlp", {"input": X})["label"], expected)
        assert shm._arena.region == region  # nothing registered anew

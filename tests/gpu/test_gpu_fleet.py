"""The fleet on real GPUs through Ray: one worker per GPU on the device Ray gave it, HTTP
requests served by ONNX Runtime CUDA and spread over every GPU."""

import asyncio
import collections
import os
import time

import numpy as np
import onnxruntime as ort
import pynvml
import pytest
import ray

from cluster import deploy
from cluster.buildfarm import build_on_fleet
from cluster.client import FleetClient
from cluster.config import load_config
from cluster.incluster import InClusterClient
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.repository import Repository
from tests.integration.fleet_fixtures import free_port, worker_handles

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_fleet(tmp_path_factory, demo_models, big_mlp):
    work = tmp_path_factory.mktemp("gpu-fleet")
    config = load_config("configs/local.yaml", repository=str(work / "repo"), port=free_port(), grpc_port=free_port(),
                         allow_client_shm=True)
    pynvml.nvmlInit()
    n = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    ray.init(address="local", namespace=NAMESPACE, num_gpus=n, log_to_driver=False, include_dashboard=False)
    try:
        deploy.deploy(config)
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        repo = Repository(config.repository)
        for name, src, max_batch in (("cnn-small", demo_models["cnn-small"], 64), ("big-mlp", big_mlp, 256)):
            outcomes = build_on_fleet(controller, src, model=name, max_batch=max_batch)
            assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes]
        yield {"url": f"http://127.0.0.1:{config.port}", "controller": controller, "gpus": n, "repo": repo}
    finally:
        deploy.teardown()
        ray.shutdown()


def test_one_worker_per_gpu_on_the_device_ray_assigned(gpu_fleet):
    handles = worker_handles(gpu_fleet["controller"])
    assert len(handles) == gpu_fleet["gpus"]
    pynvml.nvmlInit()
    try:
        by_index = {i: pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(gpu_fleet["gpus"])}
    finally:
        pynvml.nvmlShutdown()
    seen = set()
    for worker_id, handle in handles.items():
        info = ray.get(handle.info.remote())
        ray_gpu = int(info.cuda_visible_devices)
        assert info.caps.device.uuid == by_index[ray_gpu], (worker_id, info.caps.device)
        assert info.caps.device.compute_capability == "9.0" and not info.simulated
        assert {r.provider for r in info.caps.runtimes} >= {"cpu", "cuda"}
        seen.add(ray_gpu)
    assert seen == set(range(gpu_fleet["gpus"]))


def test_artifacts_are_onnxruntime_cuda(gpu_fleet):
    (art,) = gpu_fleet["repo"].artifacts("big-mlp")
    assert art.manifest.target.provider == "cuda" and art.manifest.accuracy["check"]["passed"]


def test_http_answers_match_cpu_and_spread_over_gpus(gpu_fleet, demo_models):
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    want = ort.InferenceSession(str(demo_models["cnn-small"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    served = collections.Counter()
    with FleetClient(gpu_fleet["url"]) as client:
        for _ in range(40):
            out = client.infer("cnn-small", {"input": x})["logits"]
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
            served[client.last_parameters["fleet_worker"]] += 1
            assert client.last_parameters["compute_capability"] == "9.0"
    assert len(served) == gpu_fleet["gpus"], served


def test_shared_memory_client_on_gpus_equals_http(gpu_fleet):
    """FleetClient(shared_memory=True): the big MLP at batch 256, its 4 MB in and out through the
    client's shared memory region and the GPU worker, equal to the same request over HTTP."""
    x = np.random.default_rng(1).standard_normal((256, 4096)).astype(np.float32)
    served = collections.Counter()
    with FleetClient(gpu_fleet["url"]) as plain, FleetClient(gpu_fleet["url"], shared_memory=True) as shm:
        want = plain.infer("big-mlp", {"input": x})
        for _ in range(10 * gpu_fleet["gpus"]):
            got = shm.infer("big-mlp", {"input": x})
            np.testing.assert_allclose(got["output"], want["output"], rtol=1e-5, atol=1e-5)
            served[shm.last_parameters["fleet_worker"]] += 1
        # every GPU worker mapped the client's region and page-locked it (cudaHostRegister, in the
        # background: client_shm_pinning's default)
        for handle in worker_handles(gpu_fleet["controller"]).values():
            deadline = time.monotonic() + 10
            while True:
                mine = [r for r in ray.get(handle.stats.remote())["shm"] if r["name"] == shm._arena.region]
                if (mine and mine[0]["pinned"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert mine and mine[0]["pinned"], mine
    assert len(served) == gpu_fleet["gpus"], served


def test_regions_prepared_before_a_job_are_pinned_when_prepare_returns(gpu_fleet):
    """A batch job makes its regions before its first part (``InClusterClient.prepare``): every GPU
    worker has page-locked them by the time it returns, while the devices were idle, rather than later
    under the job's own load (CUDA's page-locking waits for the work in flight)."""
    x = np.zeros((256, 4096), np.float32)

    async def prepare() -> tuple[set[str], float]:
        client = InClusterClient(gpu_fleet["controller"], shared_memory=True)
        started = time.monotonic()
        await client.prepare("big-mlp", {"input": x}, 4)
        took = time.monotonic() - started
        names = {r["name"] for r in ray.get(gpu_fleet["controller"].shm_status.remote())
                 if r["name"].startswith(f"ff_{os.getpid()}_")}  # this process's regions
        pinned = {w: {r["name"] for r in ray.get(h.stats.remote())["shm"] if r["pinned"]}
                  for w, h in worker_handles(gpu_fleet["controller"]).items()}
        await client.close()
        assert len(names) == 4 and all(names <= on_worker for on_worker in pinned.values()), (names, pinned)
        return names, took

    names, took = asyncio.run(prepare())
    print(f"4 regions of 8 MB prepared and pinned in {took:.2f} s")
    assert not {r["name"] for r in ray.get(gpu_fleet["controller"].shm_status.remote())} & names  # given back

"""Real GPU (H100/H200): discovery, the ONNX Runtime CUDA backend, footprints, budgets,
concurrency and teardown. Skipped where NVML finds no GPU."""

import json
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pynvml
import pytest

from workers.actor import FleetWorker, WorkerSpec
from workers.artifacts import RepositoryObject
from workers.build import BuildRequest, build_artifact
from workers.devices import discover_devices, nvml_used_bytes
from workers.engines.onnxruntime import OnnxRuntimeEngine
from workers.errors import NoCapacity
from workers.kserve.codec import InferRequest
from workers.storage import StoreSpec
from workers.targets import Target

pytestmark = pytest.mark.gpu
CUDA = Target("onnxruntime", ort.__version__, provider="cuda")


def from_directory(manifest, directory) -> RepositoryObject:
    """The artifact as a worker gets it: an object of the repository (here a directory)."""
    return RepositoryObject(StoreSpec(str(directory)), manifest.artifact_file)


def nvml_devices():
    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append((i, pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetName(h)))
        return out
    finally:
        pynvml.nvmlShutdown()


def record(results_dir, name, data):
    (results_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def test_discovery_nvml_and_cuda_agree(results_dir):
    devices = discover_devices()
    assert devices and all(d.is_gpu and not d.simulated for d in devices)
    for d in devices:
        assert d.compute_capability == "9.0", d
        assert d.uuid.startswith("GPU-") and d.total_memory_bytes > 70 << 30
        assert "H100" in d.name or "H200" in d.name
    nvml = nvml_devices()
    assert [d.uuid for d in devices] == [u for _, u, _ in nvml]
    # under CUDA_VISIBLE_DEVICES the process sees one device, mapped to the right NVML device by UUID
    last_index, last_uuid, _ = nvml[-1]
    code = "from workers.devices import discover_devices; d = discover_devices(); print(len(d), d[0].uuid, d[0].cuda_ordinal)"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": str(last_index)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", last_uuid, "0"]
    record(results_dir, "discovery", [d.to_dict() for d in devices])


@pytest.mark.parametrize("model", ["digits-mlp", "cnn-small", "big-mlp"])
def test_cuda_outputs_match_cpu(model, demo_models, big_mlp, results_dir):
    path = big_mlp if model == "big-mlp" else demo_models[model]
    with OnnxRuntimeEngine(path, provider="cpu") as cpu, OnnxRuntimeEngine(path, provider="cuda", gpu_mem_limit=4 << 30) as gpu:
        rng = np.random.default_rng(0)
        spec = cpu.inputs[0]
        x = rng.random((32, *spec.shape[1:]), dtype=np.float32)
        want, got = cpu.infer({spec.name: x}), gpu.infer({spec.name: x})
        options = gpu.provider_options["CUDAExecutionProvider"]
    assert options["gpu_mem_limit"] == str(4 << 30) and options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["device_id"] == "0"
    errors = {}
    for name in want:
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
            errors[name] = float(np.max(np.abs(got[name] - want[name])))
        else:
            np.testing.assert_array_equal(got[name], want[name])
    record(results_dir, f"cuda-vs-cpu-{model}", errors)


@pytest.fixture(scope="module")
def mlp_artifacts(tmp_path_factory, results_dir):
    """Eight distinct 4x4096 MLPs (256 MiB of weights each) built for ONNX Runtime CUDA."""
    from cluster.demo import make_big_mlp

    root = tmp_path_factory.mktemp("gpu-repo")
    arts = []
    for i in range(8):
        src = make_big_mlp(root / f"src{i}.onnx", seed=i)
        out = root / f"mlp{i}"
        manifest = build_artifact(BuildRequest(str(src), f"mlp{i}", CUDA, max_batch=256), out)
        arts.append((manifest, out))
    return arts


def test_footprints_measured_and_budget_never_exceeded(mlp_artifacts, results_dir):
    budget = 2 << 30
    worker = FleetWorker(WorkerSpec("gpu-budget", budget_bytes=budget))
    baseline = worker.baseline_used_bytes
    samples, ooms = [], 0
    for round_ in range(2):
        for manifest, directory in mlp_artifacts:
            try:
                worker.load(manifest, from_directory(manifest, directory))
            except NoCapacity:
                pass
            except Exception as exc:  # anything else (a CUDA out-of-memory) fails the test below
                ooms += 1
                samples.append({"error": repr(exc)})
                continue
            health = worker.health()
            used = nvml_used_bytes(worker.device.uuid) - baseline
            ledger = health.used_bytes
            samples.append({"round": round_, "model": manifest.model, "ledger": ledger, "nvml_minus_baseline": used,
                            "loaded": len(health.loaded), "evictions": health.counters["evictions"]})
            assert ledger <= budget
            assert used <= budget * 1.05, samples[-1]
            assert abs(ledger - used) <= 0.10 * used, samples[-1]
    record(results_dir, "budget", {"budget": budget, "baseline": baseline, "ooms": ooms, "samples": samples})
    assert ooms == 0
    assert worker.health().counters["evictions"] > 0
    worker.shutdown()


def test_sixteen_threads_fifty_requests_each(mlp_artifacts, results_dir):
    manifest, directory = mlp_artifacts[0]
    worker = FleetWorker(WorkerSpec("gpu-threads", budget_bytes=8 << 30))
    worker.load(manifest, from_directory(manifest, directory))
    rng = np.random.default_rng(1)
    inputs = [rng.random((4, 4096), dtype=np.float32) for _ in range(16)]
    with OnnxRuntimeEngine(directory / "model.onnx", provider="cuda") as ref:
        expected = [ref.infer({"input": x})["output"] for x in inputs]
    bad = []

    def run(i):
        for _ in range(50):
            out = worker.infer(manifest.model, InferRequest({"input": inputs[i]})).outputs["output"]
            if not np.allclose(out, expected[i], rtol=1e-4, atol=1e-4):
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = worker.runner.engine_stats()[manifest.engine_key]
    record(results_dir, "concurrency", {"bad": len(bad), "stats": stats})
    assert bad == [] and stats["success"] == 16 * 50 + 0
    worker.shutdown()


TEARDOWN = """
import json, sys
from workers.actor import FleetWorker, WorkerSpec
from workers.devices import nvml_used_bytes
from workers.kserve.codec import InferRequest
from workers.manifest import Manifest
from workers.artifacts import RepositoryObject
from workers.storage import StoreSpec
import numpy as np
manifest = Manifest.read(sys.argv[1])
worker = FleetWorker(WorkerSpec("teardown", budget_bytes=8 << 30))
base = worker.baseline_used_bytes
worker.load(manifest, RepositoryObject(StoreSpec(sys.argv[1]), manifest.artifact_file))
worker.infer(manifest.model, InferRequest({"input": np.ones((64, 4096), np.float32)}))
loaded = nvml_used_bytes(worker.device.uuid)
worker.shutdown()
import gc; gc.collect()
after = nvml_used_bytes(worker.device.uuid)
print(json.dumps({"baseline": base, "loaded": loaded, "after_unload": after}))
"""


def test_teardown_returns_memory_and_exits_cleanly(mlp_artifacts, results_dir):
    _, directory = mlp_artifacts[1]
    proc = subprocess.run([sys.executable, "-c", TEARDOWN, str(directory)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    record(results_dir, "teardown", numbers)
    assert numbers["loaded"] - numbers["baseline"] > 256 << 20  # the engine really was on the GPU
    assert abs(numbers["after_unload"] - numbers["baseline"]) <= 64 << 20


def test_a_float16_engine_takes_at_most_055x_its_float32_one(big_mlp, tmp_path, results_dir):
    """Issue 21: the ledger's footprint (NVML, measured while each engine loads and warms up) of the big
    MLP at float16 against float32, both loaded in one worker; the worker's NVML reading agrees."""
    worker = FleetWorker(WorkerSpec("gpu-fp16", budget_bytes=8 << 30))
    footprints = {}
    for precision in ("float32", "float16"):
        target = Target("onnxruntime", ort.__version__, provider="cuda", precision=precision)
        out = tmp_path / precision
        manifest = build_artifact(BuildRequest(str(big_mlp), f"mlp-{precision}", target, max_batch=256,
                                               accept_accuracy_loss=True), out)
        footprints[precision] = worker.load(manifest, from_directory(manifest, out))["footprint_bytes"]
    used = nvml_used_bytes(worker.device.uuid) - worker.baseline_used_bytes
    ratio = footprints["float16"] / footprints["float32"]
    record(results_dir, "fp16-footprint", {"footprints": footprints, "ratio": ratio, "nvml_minus_baseline": used,
                                           "ledger": worker.health().used_bytes})
    assert ratio <= 0.55, footprints
    assert abs(worker.health().used_bytes - used) <= 0.05 * used
    worker.shutdown()

"""A real broken CUDA context: a kernel that writes far outside its buffer, in a worker's runner.

After an illegal memory access every later CUDA call of the process fails; the runner must
notice it on the request that hit it, answer that request and every later one with a clear
DeviceFailed (a 503), and say so in its health, which makes the controller restart the worker
(that part is tested on the simulated fleet: tests/integration/test_hetero_sim.py). Runs in a
subprocess: the context it breaks is gone for good.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = r'''
import json, sys
import cupy
import numpy as np
import onnxruntime as ort
from workers.build import BuildRequest, build_artifact
from workers.devices import discover_devices
from workers.engines import Engine, open_engine
from workers.errors import DeviceFailed
from workers.kserve.codec import InferRequest
from workers.manifest import Manifest
from workers.runner import EngineRunner
from workers.targets import Runtime, Target, WorkerCaps

OUT_OF_BOUNDS = cupy.RawKernel(r"""extern "C" __global__ void oob(float* p) { p[(size_t)1 << 40] = 1.0f; }""", "oob")


class OutOfBoundsEngine(Engine):
    """A deliberately broken engine: its kernel writes a terabyte past its buffer."""
    backend = "broken"

    def __init__(self, inputs, outputs):
        super().__init__()
        self._in, self._out = inputs, outputs

    inputs = property(lambda self: self._in)
    outputs = property(lambda self: self._out)
    footprint_bytes = property(lambda self: 1 << 20)

    def _activate(self):
        self.buffer = cupy.zeros(16, cupy.float32)

    def _deactivate(self):
        self.buffer = None

    def _infer(self, feeds):
        self.runs = getattr(self, "runs", 0) + 1
        if self.runs == 1:  # the load's warm-up run: fine, so the engine goes into service
            return {spec.name: np.zeros((len(feeds["input"]), 10), np.float32) for spec in self._out}
        OUT_OF_BOUNDS((1,), (1,), (self.buffer,))
        cupy.cuda.runtime.deviceSynchronize()
        raise AssertionError("the out-of-bounds kernel did not fail")


source, work = sys.argv[1], sys.argv[2]
target = Target("onnxruntime", ort.__version__, provider="cuda")
good = build_artifact(BuildRequest(source, "good", target, max_batch=8), work + "/good")
bad = Manifest.from_dict(dict(good.to_dict(), model="broken"))
(__import__("pathlib").Path(work) / "bad").mkdir()
__import__("shutil").copy(work + "/good/model.onnx", work + "/bad/model.onnx")

def factory(path, target, **kwargs):
    if "/bad/" in str(path):
        return OutOfBoundsEngine(good.inputs, good.outputs)
    return open_engine(path, target, **kwargs)

device = discover_devices()[0]
caps = WorkerCaps("gpu-fault", device, (Runtime("onnxruntime", ort.__version__, "cuda"),))
runner = EngineRunner(caps, 8 << 30, slots=2, engine_factory=factory)
runner.load(good, work + "/good/" + good.artifact_file)
runner.load(bad, work + "/bad/" + good.artifact_file)
x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
result = {"healthy_before": runner.infer(InferRequest({"input": x}), "good").outputs["logits"].shape == (4, 10)}
for name in ("broken", "good"):
    try:
        runner.infer(InferRequest({"input": x}), name)
        result[name] = "answered"
    except DeviceFailed as exc:
        result[name] = "DeviceFailed: " + exc.message
    except Exception as exc:
        result[name] = type(exc).__name__ + ": " + str(exc)
result["broken_in_health"] = runner.health().broken
print("RESULT " + json.dumps(result), flush=True)
'''


def test_an_illegal_memory_access_breaks_the_worker_and_it_says_so(tmp_path, demo_models, results_dir):
    pytest.importorskip("cupy")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(demo_models["cnn-small"]), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    result = json.loads(lines[-1].removeprefix("RESULT "))
    (results_dir / "device_fault.json").write_text(json.dumps({"result": result, "exit": proc.returncode}, indent=2))
    assert result["healthy_before"] is True
    assert result["broken"].startswith("DeviceFailed: ") and "illegal memory access" in result["broken"], result
    assert result["good"].startswith("DeviceFailed: "), result  # refused at once: the context is gone
    assert "illegal memory access" in result["broken_in_health"]


def test_nvml_health_counters_of_a_healthy_gpu(results_dir):
    """On a real GPU the probe reads NVML's counters (ECC, retirement/remapping, Xid events as far as
    the driver and container allow), finds nothing wrong, and a worker's health carries no verdict."""
    from workers.actor import FleetWorker, WorkerSpec
    from workers.gpu_health import GpuHealthProbe

    worker = FleetWorker(WorkerSpec(worker_id="gpu0", node_name="local"))
    assert worker.device.is_real_gpu
    probe = GpuHealthProbe(worker.device.uuid)
    watching = probe.describe()
    (results_dir / "nvml-health.json").write_text(json.dumps({"device": worker.device.name, "watching": probe.watching}))
    print(f"NVML health on {worker.device.name}: {watching}")
    assert probe.watching, "NVML supports none of its health counters on this GPU"
    assert probe.check() is None
    probe.close()
    health = worker.health()
    assert health.gpu_unhealthy is None and health.broken is None
    worker.shutdown()

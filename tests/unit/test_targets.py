"""Table tests for can_run: every rule of the compatibility contract."""

import pytest

from workers.devices import Device
from workers.targets import Runtime, Target, WorkerCaps, can_run


def gpu(name, cc, simulated=True):
    return Device(name=name, uuid=f"GPU-{name}", kind="gpu", compute_capability=cc, total_memory_bytes=16 << 30, simulated=simulated)


CPU = Device(name="CPU", uuid="CPU-0", kind="cpu", compute_capability=None, total_memory_bytes=8 << 30)


def worker(device, *runtimes):
    return WorkerCaps(worker_id=device.name, device=device, runtimes=tuple(runtimes))


def trt(version, *, simulated=True, lean=False):
    return Runtime("tensorrt", version, "tensorrt", simulated=simulated, lean=lean)


ORT_CPU = Runtime("onnxruntime", "1.23.2", "cpu")
ORT_CUDA = Runtime("onnxruntime", "1.23.2", "cuda", min_compute_capability="6.0")

T4 = worker(gpu("Tesla T4", "7.5"), trt("10.16.1.11"), ORT_CPU)
P4 = worker(gpu("Tesla P4", "6.1"), trt("8.6.1"), ORT_CPU)
V100 = worker(gpu("Tesla V100-SXM2-16GB", "7.0"), trt("10.4.0"), ORT_CPU)
A100 = worker(gpu("A100", "8.0"), trt("10.16.1"), ORT_CPU)
A10 = worker(gpu("A10", "8.6"), trt("10.16.1"), ORT_CPU)
H100 = worker(gpu("H100", "9.0"), trt("10.16.1"), ORT_CPU)
H100_TRT11 = worker(gpu("H100", "9.0"), trt("11.4.0"), ORT_CPU)
H100_LEAN11 = worker(gpu("H100", "9.0"), trt("11.4.0", lean=True), ORT_CPU)
H100_REAL = worker(gpu("H100", "9.0", simulated=False), trt("10.16.1", simulated=False), ORT_CPU, ORT_CUDA)
P4_REAL_CUDA = worker(gpu("Tesla P4", "6.1", simulated=False), ORT_CPU, Runtime("onnxruntime", "1.23.2", "cuda", min_compute_capability="7.5"))
CPU_WORKER = worker(CPU, ORT_CPU)


def plan(cc, version, **kw):
    kw.setdefault("simulated", True)
    return Target("tensorrt", version, cc, provider="tensorrt", **kw)


CASES = [
    # (artifact, worker, ok, reason fragment)
    (plan("6.1", "8.6.1"), P4, True, ""),
    (plan("6.1", "8.6.1"), T4, False, "built for compute capability 6.1, device has 7.5"),
    (plan("7.5", "10.16.1"), P4, False, "built for compute capability 7.5"),
    (plan("7.0", "10.4.0"), V100, True, ""),
    (plan("7.0", "10.16.1"), V100, False, "built with TensorRT 10.16.1, worker has TensorRT 10.4.0"),
    (plan("7.5", "10.16.1"), T4, True, ""),  # build number (10.16.1.11) does not matter
    (plan("7.5", "10.16.0"), T4, False, "built with TensorRT 10.16.0"),
    (plan("7.5", "10.16.1"), V100, False, "device has 7.0"),
    # hardware compatibility: ampere_plus runs on 8.0 / 8.6 / 9.0, not 7.5
    (plan("8.0", "10.16.1", hardware_compatibility="ampere_plus"), A100, True, ""),
    (plan("8.0", "10.16.1", hardware_compatibility="ampere_plus"), A10, True, ""),
    (plan("8.0", "10.16.1", hardware_compatibility="ampere_plus"), H100, True, ""),
    (plan("8.0", "10.16.1", hardware_compatibility="ampere_plus"), T4, False, "needs compute capability 8.0 or newer"),
    (plan("8.6", "10.16.1"), A100, False, "built for compute capability 8.6, device has 8.0"),
    (plan("8.6", "10.16.1", hardware_compatibility="same_compute_capability"), A10, True, ""),
    (plan("8.6", "10.16.1", hardware_compatibility="same_compute_capability"), H100, False, "device has 9.0"),
    # version compatibility
    (plan("9.0", "10.4.0", version_compatible=True), H100, True, ""),  # later 10.x runs it
    (plan("9.0", "10.16.1", version_compatible=False), H100_TRT11, False, "worker has TensorRT 11.4.0"),
    (plan("9.0", "10.16.1", version_compatible=True), H100_TRT11, True, ""),  # TRT 10 vc plans on 11
    (plan("9.0", "11.4.0", version_compatible=True), H100, False, "does not run on TensorRT 10.16.1"),
    (plan("9.0", "8.6.1", version_compatible=True), H100_TRT11, False, "does not run on TensorRT 11.4.0"),
    (plan("9.0", "11.4.0"), H100_LEAN11, False, "lean runtime"),
    (plan("9.0", "11.4.0", version_compatible=True), H100_LEAN11, True, ""),
    # simulated and real plans never mix
    (plan("9.0", "10.16.1"), H100_REAL, False, "simulated tensorrt artifact on a real runtime"),
    (plan("9.0", "10.16.1", simulated=False), H100_REAL, True, ""),
    # ONNX Runtime artifacts
    (Target("onnxruntime", "1.23.2", provider="cpu"), CPU_WORKER, True, ""),
    (Target("onnxruntime", "1.23.2", provider="cpu"), P4, True, ""),
    (Target("onnxruntime", "1.20.0", provider="cuda"), CPU_WORKER, False, "needs ONNX Runtime's CUDA provider"),
    (Target("onnxruntime", "1.20.0", provider="cuda"), H100_REAL, True, ""),
    (Target("onnxruntime", "1.20.0", provider="cuda"), P4_REAL_CUDA, False, "needs compute capability 7.5 or newer"),
    (plan("7.5", "10.16.1"), CPU_WORKER, False, "no tensorrt runtime"),
    # precision: no float16 for a device without fast FP16 unless built for it explicitly
    (Target("onnxruntime", "1.23.2", provider="cpu", precision="float16"), P4, False, "has no fast FP16"),
    (Target("onnxruntime", "1.23.2", provider="cpu", precision="float16"), T4, True, ""),
    (plan("6.1", "8.6.1", precision="float16"), P4, True, ""),  # asked for explicitly
    (plan("7.5", "10.16.1", precision="float16"), T4, True, ""),
]


@pytest.mark.parametrize("artifact,caps,ok,reason", CASES, ids=[f"{i}-{c[1].worker_id}" for i, c in enumerate(CASES)])
def test_can_run_table(artifact, caps, ok, reason):
    verdict = can_run(artifact, caps)
    assert verdict.ok is ok, verdict.reason
    assert reason in verdict.reason


def test_target_keys_are_distinct_and_directory_safe():
    # The repository path is <precision>/<target key>; an ONNX file runs on any ONNX
    # Runtime version, so that version alone need not make a new directory.
    targets = {c[0] for c in CASES}
    identities = {(t.precision, t.backend_version if t.backend == "tensorrt" else "", t) for t in targets}
    keys = {(t.precision, t.key()) for t in targets}
    assert len(keys) == len({(p, v, t.compute_capability, t.provider, t.hardware_compatibility, t.version_compatible, t.simulated) for p, v, t in identities})
    assert all("/" not in k and ".." not in k for k in keys)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(backend="tvm", backend_version="1"), "backend must be one of"),
        (dict(backend="tensorrt", backend_version="10.0"), "needs the compute capability"),
        (dict(backend="onnxruntime", backend_version="1.2", compute_capability="sm75"), "compute capability must look like"),
        (dict(backend="onnxruntime", backend_version="1.2", precision="bf17"), "precision must be one of"),
    ],
)
def test_target_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Target(**kwargs)

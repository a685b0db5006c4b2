"""GpuHealthProbe against a stand-in for NVML (no GPU here; the real-GPU test is in tests/gpu).

The stand-in is strict: every call is bound against the signature of the real ``pynvml``
function of the same name, and its constants and error classes are the real module's, so a
call the real library would refuse fails here too.
"""

from __future__ import annotations

import inspect
import types

import pynvml
import pytest

from workers.gpu_health import APPLICATION_XIDS, GpuHealthProbe


class FakeGpu:
    def __init__(self, *, ecc=0, ecc_supported=True, pending_pages=False, remap=(0, 0, False, False),
                 remap_supported=True, events_supported=True):
        self.ecc, self.ecc_supported = ecc, ecc_supported
        self.pending_pages, self.remap, self.remap_supported = pending_pages, remap, remap_supported
        self.events_supported = events_supported
        self.xids: list[int] = []
        self.sets_open = 0
        self.inits = 0


def strict_nvml(gpu: FakeGpu) -> types.SimpleNamespace:
    """A pynvml lookalike for one GPU: the real constants and errors, calls checked against the real signatures."""

    def nvmlInit():
        gpu.inits += 1

    def nvmlShutdown():
        gpu.inits -= 1

    def nvmlDeviceGetHandleByUUID(uuid):
        assert gpu.inits > 0, "NVML used before nvmlInit"
        return ("handle", uuid)

    def nvmlDeviceGetTotalEccErrors(handle, errorType, counterType):
        assert errorType in (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        assert counterType in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC)
        if not gpu.ecc_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.ecc

    def nvmlDeviceGetRetiredPagesPendingStatus(device):
        return pynvml.NVML_FEATURE_ENABLED if gpu.pending_pages else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(device):
        if not gpu.remap_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.remap

    def nvmlEventSetCreate():
        gpu.sets_open += 1
        return object()

    def nvmlEventSetFree(eventSet):
        gpu.sets_open -= 1

    def nvmlDeviceRegisterEvents(handle, eventTypes, eventSet):
        assert eventTypes == pynvml.nvmlEventTypeXidCriticalError
        if not gpu.events_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlEventSetWait_v2(eventSet, timeoutms):
        assert timeoutms == 0, "a health check must not block"
        if not gpu.xids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return types.SimpleNamespace(eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=gpu.xids.pop(0))

    fake = types.SimpleNamespace()
    for name, fn in dict(locals()).items():
        if name.startswith("nvml") and callable(fn):
            real = inspect.signature(getattr(pynvml, name))
            assert list(inspect.signature(fn).parameters) == list(real.parameters), name
            setattr(fake, name, fn)
    for name in dir(pynvml):  # the real constants and error classes
        if (name.isupper() or name.startswith(("NVMLError", "nvmlEventType"))) and not hasattr(fake, name):
            setattr(fake, name, getattr(pynvml, name))
    return fake


def probe(gpu: FakeGpu) -> GpuHealthProbe:
    return GpuHealthProbe("GPU-1234", nvml=strict_nvml(gpu))


def test_a_healthy_gpu_says_nothing_and_watches_everything_it_can():
    gpu = FakeGpu(ecc=3)  # errors from before the worker started are the baseline, not news
    p = probe(gpu)
    assert p.check() is None and p.check() is None
    assert p.describe() == "uncorrectable ECC errors, pages pending retirement, row remapping, critical Xid events"
    p.close()
    assert gpu.sets_open == 0 and gpu.inits == 0


def test_a_new_uncorrectable_ecc_error_makes_the_gpu_unhealthy():
    gpu = FakeGpu(ecc=3)
    p = probe(gpu)
    gpu.ecc = 4
    assert p.check() == "NVML counted 1 new uncorrectable ECC error(s) on GPU GPU-1234; it needs a reset"


def test_a_critical_xid_makes_the_gpu_unhealthy_but_an_applications_own_xid_does_not():
    gpu = FakeGpu()
    p = probe(gpu)
    gpu.xids = [13, 31, 43]  # the application's own faults: the sticky CUDA errors restart the process instead
    assert set(gpu.xids) <= APPLICATION_XIDS
    assert p.check() is None and gpu.xids == []
    gpu.xids = [31, 79]
    assert p.check() == "NVML reported critical Xid 79 on GPU GPU-1234"


@pytest.mark.parametrize("remap, expected", [
    ((0, 1, True, False), "GPU GPU-1234 has memory rows pending remapping (NVML); it needs a reset"),
    ((0, 8, False, True), "GPU GPU-1234 failed to remap a memory row (NVML); it needs service"),
    ((2, 0, False, False), None),  # rows remapped in the past, nothing pending: healthy
])
def test_row_remapping(remap, expected):
    gpu = FakeGpu()
    p = probe(gpu)
    gpu.remap = remap
    assert p.check() == expected


def test_pages_pending_retirement():
    gpu = FakeGpu(remap_supported=False)  # before Ampere: page retirement instead of row remapping
    p = probe(gpu)
    assert "row remapping" not in p.describe()
    gpu.pending_pages = True
    assert p.check() == "GPU GPU-1234 has memory pages pending retirement (NVML); it needs a reset"


def test_counters_this_gpu_lacks_are_skipped():
    gpu = FakeGpu(ecc_supported=False, remap_supported=False, events_supported=False)
    p = probe(gpu)
    assert p.describe() == "pages pending retirement"
    assert gpu.sets_open == 0  # the event set of an unsupported registration is freed
    assert p.check() is None

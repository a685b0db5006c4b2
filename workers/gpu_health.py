"""What NVML says about a GPU's own health, beyond what this process's CUDA calls show.

A GPU can go bad under a worker whose CUDA context still works: an uncorrectable ECC error,
memory rows that could not be remapped, pages waiting to be retired (both need a GPU reset),
or a critical Xid in the driver log (79: fallen off the bus, 48: double-bit ECC, 94/95:
contained/uncontained ECC, 74: NVLink). Requests sent there may come back wrong or never.
The worker reads these on every health check; the controller stops routing to it.

Xids that an application's own bug causes (13 graphics engine exception, 31 memory page
fault, 43 GPU stopped processing, 45 preemptive cleanup, 68 video decoder, 109 context
switch timeout) say nothing about the GPU: they are the sticky CUDA errors of
``workers.device_faults`` and restart the process instead. This is the same split the
Kubernetes NVIDIA device plugin makes.
"""

from __future__ import annotations

import threading
from typing import Any

APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


class GpuHealthProbe:
    """Reads one GPU's health from NVML. ``check()`` returns why the GPU is unhealthy, or None.

    Each counter NVML does not support on this GPU (ECC off, no row remapping before Ampere,
    Xid events in some containers) is skipped, and ``describe()`` says which are watched.
    """

    def __init__(self, uuid: str, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        self._lock = threading.Lock()
        nvml.nvmlInit()
        self._handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        self.uuid = uuid
        self.watching: list[str] = []
        self._ecc_baseline = self._uncorrected_ecc()
        if self._ecc_baseline is not None:
            self.watching.append("uncorrectable ECC errors")
        if self._retired_pages_pending() is not None:
            self.watching.append("pages pending retirement")
        if self._remapped_rows() is not None:
            self.watching.append("row remapping")
        self._events = self._register_xid_events()
        if self._events is not None:
            self.watching.append("critical Xid events")

    # ---- the counters, each None where this GPU or driver does not have it ---------------
    def _optional(self, read):
        try:
            return read()
        except (self._nvml.NVMLError_NotSupported, self._nvml.NVMLError_NoPermission):
            return None

    def _uncorrected_ecc(self) -> int | None:
        nv = self._nvml
        return self._optional(lambda: int(nv.nvmlDeviceGetTotalEccErrors(
            self._handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)))

    def _retired_pages_pending(self) -> bool | None:
        nv = self._nvml
        status = self._optional(lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(self._handle))
        return None if status is None else status == nv.NVML_FEATURE_ENABLED

    def _remapped_rows(self) -> tuple[int, int, bool, bool] | None:
        rows = self._optional(lambda: self._nvml.nvmlDeviceGetRemappedRows(self._handle))
        if rows is None:
            return None
        corrected, uncorrected, pending, failed = rows
        return int(corrected), int(uncorrected), bool(pending), bool(failed)

    def _register_xid_events(self):
        nv = self._nvml
        events = nv.nvmlEventSetCreate()
        try:
            nv.nvmlDeviceRegisterEvents(self._handle, nv.nvmlEventTypeXidCriticalError, events)
        except (nv.NVMLError_NotSupported, nv.NVMLError_NoPermission):
            nv.nvmlEventSetFree(events)
            return None
        return events

    def _pending_xids(self) -> list[int]:
        nv = self._nvml
        xids: list[int] = []
        while True:
            try:
                data = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError_Timeout:
                return xids
            if data.eventType & nv.nvmlEventTypeXidCriticalError:
                xids.append(int(data.eventData))

    # ---- the verdict -------------------------------------------------------------------
    def check(self) -> str | None:
        """Why this GPU should get no more work, or None while NVML sees nothing wrong."""
        with self._lock:
            if self._events is not None:
                device_xids = [x for x in self._pending_xids() if x not in APPLICATION_XIDS]
                if device_xids:
                    return f"NVML reported critical Xid {', '.join(map(str, device_xids))} on GPU {self.uuid}"
            ecc = self._uncorrected_ecc() if self._ecc_baseline is not None else None
            if ecc is not None and ecc > self._ecc_baseline:
                return (f"NVML counted {ecc - self._ecc_baseline} new uncorrectable ECC error(s) on GPU {self.uuid}; "
                        "it needs a reset")
            if self._retired_pages_pending():
                return f"GPU {self.uuid} has memory pages pending retirement (NVML); it needs a reset"
            rows = self._remapped_rows()
            if rows is not None and rows[3]:
                return f"GPU {self.uuid} failed to remap a memory row (NVML); it needs service"
            if rows is not None and rows[2]:
                return f"GPU {self.uuid} has memory rows pending remapping (NVML); it needs a reset"
            return None

    def describe(self) -> str:
        return ", ".join(self.watching) or "nothing (NVML supports none of its health counters here)"

    def close(self) -> None:
        with self._lock:
            if self._events is not None:
                self._nvml.nvmlEventSetFree(self._events)
                self._events = None
            self._nvml.nvmlShutdown()

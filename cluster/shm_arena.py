"""The Python client's side of system shared memory: one region per client.

``FleetClient(url, shared_memory=True)`` keeps one POSIX shared memory object,
registered with the fleet as one region, and lays each request's inputs and outputs
out in it: the request carries only their descriptions, the worker on this host
reads the inputs in place and writes the outputs there. The object grows (a new one,
registered anew) when a request needs more, and is unregistered and unlinked on
``close()``.

Tensors the region cannot hold go over HTTP as before: BYTES tensors, and outputs
whose size is not known before the answer (a dynamic dimension other than the batch).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from workers.errors import SharedMemoryError
from workers.kserve.codec import ShmInput
from workers.shm import SHM_ROOT, ShmRef
from workers.tensors import DATATYPE_TO_NUMPY, batch_shape, numpy_to_datatype

ALIGN = 64  # each tensor starts on a cache line
MIN_BYTES = 1 << 20


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ShmPlan:
    """Where one request's tensors go in the region."""

    inputs: dict[str, ShmInput]
    outputs: dict[str, ShmRef]
    byte_size: int


@dataclass
class RegionSetup:
    """What one shared memory object cost before it served: creating and registering it (the fleet's
    workers on this host map it, a GPU worker page-locks it), and the first copy of inputs into it
    (its pages are new: the kernel allocates and zeroes each). A region reused costs neither again."""

    byte_size: int
    setup_s: float
    first_fill_s: float | None = None


def plan_request(region: str, inputs: dict[str, np.ndarray], output_specs: list[dict], rows: int) -> ShmPlan:
    """Lay out ``inputs`` (all but BYTES) and the outputs whose size follows from the model's
    metadata (``-1`` in the first dimension is the request's batch rows) one after another."""
    offset = 0
    shm_inputs = {}
    for name, array in inputs.items():
        datatype = numpy_to_datatype(array.dtype)
        if datatype == "BYTES":
            continue
        shm_inputs[name] = ShmInput(ShmRef(region, array.nbytes, offset), datatype, tuple(array.shape))
        offset += _aligned(array.nbytes)
    shm_outputs = {}
    for spec in output_specs:
        if spec["datatype"] == "BYTES":
            continue
        shape = batch_shape(spec["shape"], rows)
        if shape is None:
            continue
        nbytes = math.prod(shape) * DATATYPE_TO_NUMPY[spec["datatype"]].itemsize
        shm_outputs[spec["name"]] = ShmRef(region, nbytes, offset)
        offset += _aligned(nbytes)
    return ShmPlan(shm_inputs, shm_outputs, offset)


def allocate_pages(name: str, size: int, root=SHM_ROOT) -> None:
    """Make the pages of the new object ``name`` now (``posix_fallocate``), on the caller's thread. The
    driver serialises a GPU worker's page-locking of all the regions a job registers at once; pages made
    here are not made (allocated and zeroed) there: a pin of 128 MB took 41 ms instead of 52 on an H200
    host. And a host short of shared memory says so here, not with a SIGBUS at the first write into a
    page the kernel cannot give."""
    try:
        fd = os.open(os.path.join(root, name), os.O_RDWR)
    except FileNotFoundError:
        return  # shared memory objects live elsewhere on this OS: their pages come with the first writes
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            return  # the file system cannot allocate ahead (EOPNOTSUPP, EINVAL): as above
        free = shutil.disk_usage(root).free
        raise SharedMemoryError(
            f"{root} has no room for a shared memory region of {size / 2**20:,.0f} MiB ({free / 2**20:,.0f} MiB "
            f"free): give this host (or its container: docker --shm-size) more shared memory, or send tensors "
            f"without shared memory") from exc
    finally:
        os.close(fd)


def written_outputs(header: dict, received: dict) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of the outputs an answer's JSON header describes but does not carry:
    the ones the server wrote into the region."""
    return [(o["name"], o["datatype"], o["shape"]) for o in header.get("outputs", []) if o["name"] not in received]


class ShmArena:
    """This client's shared memory object and the fleet region over it."""

    def __init__(self, register: Callable[[str, str, int], None], unregister: Callable[[str], None]) -> None:
        self._register = register
        self._unregister = unregister
        self._shm: shared_memory.SharedMemory | None = None
        self.region = ""
        self.setups: list[RegionSetup] = []  # one per object this arena created

    @property
    def byte_size(self) -> int:
        return self._shm.size if self._shm is not None else 0

    def ensure(self, nbytes: int) -> str:
        """A registered region of at least ``nbytes``; returns its name."""
        if self._shm is not None and self._shm.size >= nbytes:
            return self.region
        size = max(MIN_BYTES, nbytes, 2 * self.byte_size)
        self.release()
        started = time.monotonic()
        name = f"ff_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            allocate_pages(name, shm.size)
            self._register(name, "/" + name, shm.size)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        self._shm, self.region = shm, name
        self.setups.append(RegionSetup(shm.size, time.monotonic() - started))
        return name

    def place(self, inputs: dict[str, np.ndarray], output_specs: list[dict], rows: int) -> ShmPlan:
        """Plan a request in the region (grown if need be) and write its inputs there."""
        plan = plan_request(self.region, inputs, output_specs, rows)
        if plan.byte_size > self.byte_size or not self.region:  # a new region: plan again under its name
            plan = plan_request(self.ensure(plan.byte_size), inputs, output_specs, rows)
        started = time.monotonic()
        for name, item in plan.inputs.items():
            self._write(item.ref, inputs[name])
        if self.setups and self.setups[-1].first_fill_s is None:
            self.setups[-1].first_fill_s = time.monotonic() - started
        return plan

    def _write(self, ref: ShmRef, array: np.ndarray) -> None:
        assert self._shm is not None
        target = np.ndarray(array.shape, array.dtype.newbyteorder("<"), buffer=self._shm.buf, offset=ref.offset)
        np.copyto(target, array, casting="no" if array.dtype.byteorder in "=<|" else "equiv")

    def read(self, ref: ShmRef, datatype: str, shape: list[int], copy: bool = True) -> np.ndarray:
        """An output the server wrote: a copy (the region is reused by the next request), or with
        ``copy=False`` a view of it in the region (the caller keeps the region until done with it)."""
        assert self._shm is not None
        dtype = DATATYPE_TO_NUMPY[datatype].newbyteorder("<")
        view = np.ndarray(tuple(shape), dtype, buffer=self._shm.buf, offset=ref.offset)
        return view.astype(DATATYPE_TO_NUMPY[datatype], copy=True) if copy else view

    def release(self) -> None:
        """Unregister the region and unlink the object (also when the fleet is gone)."""
        shm, self._shm = self._shm, None
        if shm is None:
            return
        try:
            self._unregister(self.region)
        except Exception:
            pass  # the fleet is down: the object still goes
        finally:
            try:
                shm.close()
            except BufferError:
                pass  # an output read in place is still viewed: unmapped when the last view goes
            shm.unlink()
            self.region = ""

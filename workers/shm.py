"""System shared memory (Triton's extension): tensors that stay in host memory.

A client on the same host as a worker creates a POSIX shared memory object
(``shm_open``; on Linux a file under /dev/shm), registers a region of it under a
name, and then names that region in a request instead of sending the tensor's bytes:
the worker reads the inputs from it in place and writes the outputs into it. The
request and the answer carry only their JSON header, so a 4 MB batch costs what a
one-row request costs on the wire.

Each worker process maps the regions itself: a worker on another host cannot see the
object (``RegionNotHere``), and the controller keeps track of which workers could.
Keys are plain names under /dev/shm (no paths, no links), opened without following
links, so a client can name nothing but a shared memory object.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import stat
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from workers.errors import InvalidInput, SharedMemoryError

SHM_ROOT = Path("/dev/shm")
_KEY = re.compile(r"^/?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,239}$")
_REGION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
PARAM_REGION = "shared_memory_region"
PARAM_SIZE = "shared_memory_byte_size"
PARAM_OFFSET = "shared_memory_offset"


class RegionNotHere(SharedMemoryError):
    """The shared memory object does not exist on this worker's host."""


class HostPinner(Protocol):
    """Page-locks host memory for a device (a GPU worker's: ``workers.devices.CudaHostPinner``),
    so that the copies between a region and the device are DMA, without staging buffers."""

    def pin(self, address: int, size: int) -> bool: ...

    def unpin(self, address: int) -> None: ...


def check_region_name(name: str) -> str:
    if not isinstance(name, str) or not _REGION_NAME.match(name):
        raise SharedMemoryError(
            f"shared memory region name {name!r} is not allowed: use 1-128 letters, digits, '_', '.' or '-'"
        )
    return name


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise SharedMemoryError(
            f"shared memory key {key!r} is not a POSIX shared memory name (like '/my_input': one leading '/', "
            f"then letters, digits, '_', '.' or '-')"
        )
    return key


def _non_negative_int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ShmRef:
    """Where one tensor lies: ``byte_size`` bytes at ``offset`` into a registered region."""

    region: str
    byte_size: int
    offset: int = 0

    def to_params(self) -> dict:
        params: dict = {PARAM_REGION: self.region, PARAM_SIZE: self.byte_size}
        if self.offset:
            params[PARAM_OFFSET] = self.offset
        return params

    @classmethod
    def from_params(cls, params: dict, what: str) -> "ShmRef | None":
        """The shared memory parameters of one input or output; None when it names no region."""
        region, size = params.get(PARAM_REGION), params.get(PARAM_SIZE)
        if region is None and size is None:
            if PARAM_OFFSET in params:
                raise InvalidInput(f"{what}: {PARAM_OFFSET} needs {PARAM_REGION} and {PARAM_SIZE}")
            return None
        if region is None or size is None:
            raise InvalidInput(f"{what}: {PARAM_REGION} and {PARAM_SIZE} go together; only one was given")
        if not isinstance(region, str) or not region:
            raise InvalidInput(f"{what}: {PARAM_REGION} must be a region name, got {region!r}")
        return cls(region, _non_negative_int(size, f"{what}: {PARAM_SIZE}"),
                   _non_negative_int(params.get(PARAM_OFFSET, 0), f"{what}: {PARAM_OFFSET}"))


@dataclass(frozen=True)
class RegionInfo:
    name: str
    key: str
    offset: int
    byte_size: int

    @classmethod
    def checked(cls, name: str, key: str, offset: int, byte_size: int) -> "RegionInfo":
        """A registration request, every field checked (SharedMemoryError / InvalidInput)."""
        info = cls(check_region_name(name), check_key(key), _non_negative_int(offset, "offset"),
                   _non_negative_int(byte_size, "byte_size"))
        if info.byte_size == 0:
            raise SharedMemoryError(f"shared memory region '{name}': byte_size must be more than 0")
        return info

    def to_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def buffer_address(buffer: "mmap.mmap | bytearray") -> int:
    """Where a writable buffer starts in this process's memory (for ``HostPinner.pin``, or alignment)."""
    anchor = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(anchor)
    del anchor  # an export: it holds a mapping open, and a bytearray at its size, while it lives
    return address


class _Mapped:
    """One registered region, mapped into this process, and page-locked for the device if there is a
    pinner: at once, or (``pin_on``: an executor) in the background, while requests use it unpinned."""

    def __init__(self, info: RegionInfo, root: Path, pinner: HostPinner | None = None,
                 pin_on: Executor | None = None) -> None:
        self.info = info
        self._pinner = pinner
        self._pinned_at: int | None = None
        self._pin_lock = threading.Lock()  # a pin and the close() that would undo it, one at a time
        self._closed = False
        self.users = 0  # requests using it now (SharedMemoryRegistry.using)
        self.retired = False  # unregistered while in use: closed when the last user is done
        path = root / info.key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise RegionNotHere(f"shared memory object '{info.key}' does not exist on this host") from None
        except OSError as exc:
            raise SharedMemoryError(f"cannot open shared memory object '{info.key}': {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SharedMemoryError(f"'{info.key}' is not a shared memory object")
            if info.offset + info.byte_size > st.st_size:
                raise SharedMemoryError(
                    f"shared memory object '{info.key}' holds {st.st_size} bytes; region '{info.name}' asks for "
                    f"{info.byte_size} bytes at offset {info.offset}"
                )
            # mmap's offset must be a multiple of the allocation granularity: map from the page below.
            start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
            self._base = info.offset - start
            self._map = mmap.mmap(fd, self._base + info.byte_size, offset=start)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)[self._base:self._base + info.byte_size]
        self._pinning: Future | None = None
        if pinner is not None:
            if pin_on is None:
                self._pin()
            else:
                self._pinning = pin_on.submit(self._pin)

    def wait_pinned(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a pin in the background to end; whether the region is pinned."""
        if self._pinning is not None:
            futures_wait([self._pinning], timeout_s)
        return self.pinned

    def _pin(self) -> None:
        # The copies of a request that uses the region meanwhile are staged by the driver, as for any
        # pageable memory; those after the pin are DMA. Nothing else changes for them.
        with self._pin_lock:
            if self._closed or self._pinner is None:
                return
            address = buffer_address(self._map)
            if self._pinner.pin(address, len(self._map)):
                self._pinned_at = address

    @property
    def pinned(self) -> bool:
        return self._pinned_at is not None

    def close(self) -> None:
        with self._pin_lock:  # a pin under way ends first, and is undone; one not yet begun never begins
            self._closed = True
            if self._pinner is not None and self._pinned_at is not None:
                self._pinner.unpin(self._pinned_at)
                self._pinned_at = None
        try:
            self.view.release()
            self._map.close()
        except BufferError:  # an array made from it is still alive: unmapped when that goes
            pass


class SharedMemoryRegistry:
    """The regions registered in this process, by name. Thread-safe."""

    def __init__(self, root: Path = SHM_ROOT, pinner: HostPinner | None = None, pin_in_background: bool = False,
                 pin_threads: int = 1) -> None:
        """``pinner``: page-lock each region for the device. ``pin_in_background``: registration returns
        once the region is mapped, and ``pin_threads`` threads pin the regions in the order they came (a
        batch job registers 24 regions of 128 MB as it starts; each pin takes tens of ms on an H200 host)."""
        self.root = Path(root)
        self.pinner = pinner
        self._pin_on = (ThreadPoolExecutor(pin_threads, thread_name_prefix="shm-pin")
                        if pinner and pin_in_background else None)
        self._regions: dict[str, _Mapped] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int = 0, byte_size: int = 0, pin_wait_s: float = 0.0) -> RegionInfo:
        """Map ``byte_size`` bytes at ``offset`` of the object ``key`` as region ``name``.

        ``pin_wait_s``: when pinning in the background, wait up to this long for this region's pin.
        A client that registers its regions before it sends work (a batch job) gets them page-locked
        while the device is idle: CUDA's page-locking waits for the device's work in flight (an implicit
        synchronisation), so on a busy GPU a pin can wait for seconds and the region serves pageable.

        RegionNotHere when the object does not exist on this host; SharedMemoryError for
        everything else that is wrong with the request."""
        info = RegionInfo.checked(name, key, offset, byte_size)
        with self._lock:
            taken = name in self._regions
        if not taken:
            # Mapped and page-locked outside the lock: pinning a region of 128 MB took tens of ms on an
            # H200 host, and under the lock it held up every request's lookup and every other registration.
            mapped = _Mapped(info, self.root, self.pinner, self._pin_on)
            with self._lock:
                taken = name in self._regions
                if not taken:
                    self._regions[name] = mapped
            if taken:  # registered meanwhile by another call
                mapped.close()
        if taken:
            raise SharedMemoryError(f"shared memory region '{name}' is already registered; unregister it first")
        if pin_wait_s > 0:
            mapped.wait_pinned(pin_wait_s)
        return info

    def unregister(self, name: str | None = None) -> list[str]:
        """Unmap one region (None: all of them). Unknown names are not an error, as in Triton.
        A region a request is using now is unpinned and unmapped when that request is done."""
        with self._lock:
            names = list(self._regions) if name is None else [name] if name in self._regions else []
            gone = [self._regions.pop(n) for n in names]
            for mapped in gone:
                mapped.retired = True
            idle = [m for m in gone if m.users == 0]
        for mapped in idle:
            mapped.close()
        return names

    def hold(self, names: "set[str]") -> Callable[[], None]:
        """Keep these regions mapped (and pinned) until the returned function is called: an
        engine may be copying into them, so unregistering them must wait for the request."""
        with self._lock:
            held = [self._regions[n] for n in names if n in self._regions]
            for mapped in held:
                mapped.users += 1

        def release() -> None:
            with self._lock:
                for mapped in held:
                    mapped.users -= 1
                done = [m for m in held if m.retired and m.users == 0]
                held.clear()  # a second call releases nothing
            for mapped in done:
                mapped.close()

        return release

    @contextlib.contextmanager
    def using(self, names: "set[str]") -> Iterator[None]:
        """``hold`` for the length of a ``with`` block."""
        release = self.hold(names)
        try:
            yield
        finally:
            release()

    def status(self, name: str | None = None) -> list[dict]:
        with self._lock:
            if name is not None and name not in self._regions:
                raise SharedMemoryError(f"shared memory region '{name}' is not registered")
            return [dict(m.info.to_dict(), pinned=m.pinned) for n, m in sorted(self._regions.items()) if name in (None, n)]

    def names(self) -> set[str]:
        with self._lock:
            return set(self._regions)

    def buffer(self, ref: ShmRef, what: str) -> memoryview:
        """The bytes ``ref`` names, in place (writable)."""
        with self._lock:
            mapped = self._regions.get(ref.region)
        if mapped is None:
            raise SharedMemoryError(
                f"{what}: shared memory region '{ref.region}' is not registered on this worker; register it with "
                f"POST /v2/systemsharedmemory/region/{ref.region}/register"
            )
        size = mapped.info.byte_size
        if ref.offset + ref.byte_size > size:
            raise SharedMemoryError(
                f"{what}: {ref.byte_size} bytes at offset {ref.offset} run past the end of shared memory region "
                f"'{ref.region}' ({size} bytes)"
            )
        return mapped.view[ref.offset:ref.offset + ref.byte_size]

    def close(self) -> None:
        self.unregister(None)

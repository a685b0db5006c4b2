"""Artifacts on their way to a worker: where they come from, and the host's cache of them.

No file path crosses a process boundary. A worker is told where an artifact comes from
by an ``ArtifactSource``:

- ``RepositoryObject``: a key in the repository, an object store every host reaches
  (the worker fetches it itself);
- ``RayObject``: the artifact's bytes in Ray's object store, put there by the controller
  when the repository is a directory on the head.

``ArtifactCache`` keeps what was fetched on this host, by sha256, under its own
temporary directory (``$FLEET_ARTIFACT_CACHE``, else ``$TMPDIR/forward-fleet-artifacts``),
capped in bytes, least recently used out first. Every use re-hashes the file; a fetch
is written beside the cache, hashed as it streams and renamed into place only when the
sha256 matches, so a partial or corrupt download never loads (one retry, then a clear
error). Workers of one host share it: a lock file per sha256 lets one of them fetch
while the others wait, and keeps an artifact in use from being evicted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from workers.custom_ops import CustomOpLibrary, LibraryFile
from workers.errors import ArtifactCorrupt, FleetError, NotReady, RepositoryUnavailable
from workers.manifest import Manifest, sha256_file
from workers.storage import Store, StoreSpec

log = logging.getLogger("forward-fleet.artifacts")

CACHE_ENV = "FLEET_ARTIFACT_CACHE"
CACHE_DIR_NAME = "forward-fleet-artifacts"
DEFAULT_CACHE_BYTES = 10 << 30
CHUNK = 4 << 20
ATTEMPTS = 2  # a fetch and one retry
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RepositoryObject:
    """Fetch from the repository itself: ``key`` under ``store`` (an object store every host reaches)."""

    store: StoreSpec
    key: str

    def describe(self) -> str:
        return Store(self.store).where(self.key)


@dataclass(frozen=True)
class RayObject:
    """The artifact's bytes in Ray's object store (``ref``), put there by the controller from
    the repository on the head; ``where`` names that place in messages."""

    ref: Any  # ray.ObjectRef of bytes; only its reader (``ArtifactCache.read_object``) looks inside
    where: str

    def describe(self) -> str:
        return f"{self.where} (through Ray from the head)"


ArtifactSource = RepositoryObject | RayObject


def default_cache_root() -> Path:
    """This host's cache: ``$FLEET_ARTIFACT_CACHE``, else under this process's temporary directory."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / CACHE_DIR_NAME)


def _no_object_reader(ref: Any) -> bytes:
    raise NotReady("this worker runs outside Ray and cannot read an artifact sent through Ray's object store")


@dataclass
class CacheStats:
    hits: int = 0
    fills: int = 0
    fill_bytes: int = 0
    fill_seconds: float = 0.0
    retries: int = 0
    evictions: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Blob:
    """One file the cache keeps, by its sha256: an artifact or a custom-op library."""

    sha256: str
    artifact_file: str  # its name in the cache's sha256 directory
    what: str  # for messages


def _library_blob(manifest: Manifest, library: CustomOpLibrary) -> _Blob:
    return _Blob(library.sha256, library.file_name, f"the custom-op library {library.file_name} of {manifest.model}")


class _Corrupt(Exception):
    def __init__(self, actual: str) -> None:
        super().__init__(actual)
        self.actual = actual


class ArtifactCache:
    def __init__(self, root: Path | None = None, max_bytes: int = DEFAULT_CACHE_BYTES,
                 read_object: Callable[[Any], bytes] | None = None) -> None:
        """``read_object``: reads a ``RayObject``'s bytes (``ray.get`` in a Ray worker)."""
        self.root = Path(root) if root is not None else default_cache_root()
        self.max_bytes = max_bytes
        self.read_object = read_object or _no_object_reader
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()

    def _lock_path(self, sha: str) -> Path:
        return self.root / ".locks" / sha  # lock files stay: deleting one under a waiter would split the lock

    @contextlib.contextmanager
    def open(self, manifest: Manifest, source: ArtifactSource) -> Iterator[Path]:
        """The verified artifact file, fetched first if this host does not have it; kept from
        eviction until the block ends (open the engine inside it)."""
        with self._open(_Blob(manifest.artifact_sha256, manifest.artifact_file, f"the artifact of {manifest.model}"),
                        source) as path:
            yield path

    @contextlib.contextmanager
    def open_libraries(self, manifest: Manifest, sources: "dict[str, ArtifactSource]") -> Iterator[tuple[LibraryFile, ...]]:
        """The model's custom-op libraries, verified and kept as artifacts are (``sources``: by sha256);
        ArtifactCorrupt when one has no source."""
        with contextlib.ExitStack() as stack:
            files = []
            for library in manifest.custom_ops:
                source = sources.get(library.sha256)
                if source is None:
                    raise ArtifactCorrupt(f"{manifest.model} needs the custom-op library {library.describe()}, "
                                          f"and none was sent with it")
                path = stack.enter_context(self._open(_library_blob(manifest, library), source))
                files.append(LibraryFile(str(path), library))
            yield tuple(files)

    @contextlib.contextmanager
    def _open(self, blob: "_Blob", source: ArtifactSource) -> Iterator[Path]:
        sha = blob.sha256
        if not _SHA256.match(sha):
            raise ArtifactCorrupt(f"the manifest of {blob.what} has no valid sha256 ({sha!r})")
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        with open(self._lock_path(sha), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch of an artifact per host at a time
            path = self._cached(sha, blob) or self._fill(sha, blob, source)
            os.utime(self.root / sha)  # most recently used
            fcntl.flock(lock, fcntl.LOCK_SH)  # others may use it now; eviction leaves it alone
            self._evict(keep=sha)
            yield path

    def _cached(self, sha: str, manifest: "_Blob") -> Path | None:
        path = self.root / sha / manifest.artifact_file
        if not path.is_file():
            return None
        if sha256_file(path) == sha:
            with self._stats_lock:
                self.stats.hits += 1
            return path
        log.warning("cached artifact %s is corrupt; fetching it again", path)
        shutil.rmtree(self.root / sha, ignore_errors=True)
        return None

    def _fill(self, sha: str, manifest: "_Blob", source: ArtifactSource) -> Path:
        """Fetch, verify, rename into place; one retry after a partial, corrupt or failed fetch."""
        last: BaseException | None = None
        for attempt in range(1, ATTEMPTS + 1):
            staging = self.root / f".fetch-{sha[:16]}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            try:
                t0 = time.monotonic()
                size = self._fetch(source, staging / manifest.artifact_file, sha)
                os.rename(staging, self.root / sha)
                with self._stats_lock:
                    self.stats.fills += 1
                    self.stats.fill_bytes += size
                    self.stats.fill_seconds += time.monotonic() - t0
                log.info("fetched %s (%d bytes) in %.2f s", source.describe(), size, time.monotonic() - t0)
                return self.root / sha / manifest.artifact_file
            except (_Corrupt, RepositoryUnavailable, FileNotFoundError) as exc:
                last = exc
                if attempt < ATTEMPTS:
                    with self._stats_lock:
                        self.stats.retries += 1
                    log.warning("fetching %s failed (%s); retrying once", source.describe(), exc)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        raise self._failure(manifest, source, last)

    @staticmethod
    def _failure(manifest: "_Blob", source: ArtifactSource, last: BaseException | None) -> FleetError:
        where = source.describe()
        if isinstance(last, _Corrupt):
            return ArtifactCorrupt(
                f"artifact {where} is corrupt: sha256 {last.actual[:12]}... does not match the manifest's "
                f"{manifest.sha256[:12]}... (fetched {ATTEMPTS} times); rebuild it with `fleet build`")
        if isinstance(last, FileNotFoundError):
            return ArtifactCorrupt(f"artifact {where} is missing from the repository; rebuild it with `fleet build`")
        message = last.message if isinstance(last, FleetError) else str(last)
        return RepositoryUnavailable(f"could not fetch {manifest.what} ({ATTEMPTS} tries): {message}")

    def _fetch(self, source: ArtifactSource, dest: Path, sha: str) -> int:
        """Write the source's bytes to ``dest``, hashing them; raise _Corrupt on a mismatch."""
        digest = hashlib.sha256()
        size = 0
        with open(dest, "wb") as out:
            if isinstance(source, RayObject):
                try:
                    data = self.read_object(source.ref)
                except FleetError:
                    raise
                except Exception as exc:  # the object (or its owner) is gone
                    raise RepositoryUnavailable(f"could not read {source.describe()}: {exc}") from None
                digest.update(data)
                size = _write(out, data, dest)
            else:
                store = Store(source.store)
                with store.open_input(source.key) as stream, store.errors("read", source.key):
                    size = _copy(stream, out, digest, dest)
        actual = digest.hexdigest()
        if actual != sha:
            raise _Corrupt(actual)
        return size

    def _evict(self, keep: str) -> None:
        """Least recently used artifacts out until the cache fits; skip any in use."""
        entries = []
        for entry in self.root.iterdir():
            if entry.is_dir() and _SHA256.match(entry.name):
                try:
                    size = sum(f.stat().st_size for f in entry.iterdir())
                    entries.append((entry.stat().st_mtime, entry.name, size))
                except FileNotFoundError:
                    continue  # evicted by another worker just now
        total = sum(size for _, _, size in entries)
        for _, sha, size in sorted(entries):
            if total <= self.max_bytes:
                return
            if sha == keep or not self._remove_unless_in_use(sha):
                continue
            total -= size
            with self._stats_lock:
                self.stats.evictions += 1

    def _remove_unless_in_use(self, sha: str) -> bool:
        with open(self._lock_path(sha), "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(self.root / sha, ignore_errors=True)
            return True

    def report(self) -> dict:
        with self._stats_lock:
            return {"root": str(self.root), "max_bytes": self.max_bytes, **self.stats.to_dict()}


def _write(out: BinaryIO, data: bytes, dest: Path) -> int:
    try:
        out.write(data)
    except OSError as exc:
        raise NotReady(f"could not write the artifact cache ({dest.parent.parent}): {exc}") from None
    return len(data)


def _copy(stream, out: BinaryIO, digest, dest: Path) -> int:
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += _write(out, chunk, dest)
    return size

"""Where the engine repository lives: a local directory, or a URI that ``pyarrow.fs`` opens.

``StoreSpec`` says where (a plain value that pickles: the controller hands it to the
workers, which fetch artifacts from an object store themselves); ``Store`` reads and
writes keys (``/``-separated, relative to the root) and turns the filesystem's errors
into ours: ``RepositoryUnavailable`` (503) when the store cannot be reached or refuses,
``InvalidConfig`` when the URI itself is wrong. A missing key stays ``FileNotFoundError``
for the caller to name.

S3 settings come from the spec (the fleet config's ``storage:``), from the URI's query
(``s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=us-east-1``), or,
for what neither gives, from the usual AWS chain of the process that opens it
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION``, ``~/.aws``).
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from workers.errors import InvalidConfig, RepositoryUnavailable

S3_QUERY_KEYS = ("endpoint_override", "scheme", "region")
_CREDENTIAL_HINTS = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "credentials")


@dataclass(frozen=True)
class StoreSpec:
    uri: str  # an absolute local path, file://..., s3://bucket/prefix, gs://..., hdfs://...
    endpoint_override: str | None = None  # host:port of an S3-compatible endpoint
    scheme: str | None = None  # "http" for an endpoint without TLS
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri or self.uri.startswith("file://")

    @property
    def url_scheme(self) -> str:
        return "file" if self.is_local else self.uri.split("://", 1)[0].lower()

    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.uri).query)) if not self.is_local else {}

    def describe(self) -> str:
        """The place without secrets: the path, or the URI (and the S3 endpoint)."""
        if self.is_local:
            return self.uri.removeprefix("file://")
        base = self.uri.split("?", 1)[0]
        endpoint = self.endpoint_override or self.query().get("endpoint_override")
        return f"{base} (endpoint {endpoint})" if endpoint else base


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int
    mtime: float  # seconds since the epoch (0 when the store has none)


def _s3(spec: StoreSpec) -> tuple[pafs.FileSystem, str]:
    parts = urlsplit(spec.uri)
    query = spec.query()
    unknown = sorted(set(query) - set(S3_QUERY_KEYS))
    if unknown:
        raise InvalidConfig(f"repository {spec.describe()}: unknown URI option(s) {', '.join(unknown)} "
                            f"(allowed: {', '.join(S3_QUERY_KEYS)}; credentials go in storage: or the environment)")
    if bool(spec.access_key) != bool(spec.secret_key):
        raise InvalidConfig("storage.access_key and storage.secret_key go together: set both, or neither "
                            "(then AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws are used)")
    options: dict = {
        "endpoint_override": spec.endpoint_override or query.get("endpoint_override"),
        "scheme": spec.scheme or query.get("scheme"),
        "region": spec.region or query.get("region"),
        "access_key": spec.access_key,
        "secret_key": spec.secret_key,
    }
    options = {k: v for k, v in options.items() if v}
    fs = pafs.S3FileSystem(connect_timeout=spec.connect_timeout_s, request_timeout=spec.request_timeout_s,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **options)
    return fs, (parts.netloc + parts.path).rstrip("/")


def open_filesystem(spec: StoreSpec) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the root path inside it."""
    if spec.is_local:
        root = spec.uri.removeprefix("file://")
        if not Path(root).is_absolute():
            raise InvalidConfig(f"repository {root} must be an absolute path here (the config makes it absolute)")
        return pafs.LocalFileSystem(), root.rstrip("/") or "/"
    if spec.url_scheme == "s3":
        return _s3(spec)
    try:
        fs, root = pafs.FileSystem.from_uri(spec.uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise InvalidConfig(f"repository {spec.describe()} is not a URI pyarrow.fs can open: {exc}") from None
    except OSError as exc:
        raise RepositoryUnavailable(f"cannot open the repository {spec.describe()}: {exc}") from None
    return fs, root.rstrip("/")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(h in str(exc) for h in _CREDENTIAL_HINTS):
        text += (" (check the credentials: storage.access_key / storage.secret_key in the fleet config, "
                 "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY where the fleet runs)")
    return text


class Store:
    """Keys under one root of one filesystem; opened on first use."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        self._opened: tuple[pafs.FileSystem, str] | None = None

    @property
    def fs(self) -> pafs.FileSystem:
        return self._open()[0]

    def _open(self) -> tuple[pafs.FileSystem, str]:
        if self._opened is None:
            self._opened = open_filesystem(self.spec)
        return self._opened

    def path(self, key: str = "") -> str:
        root = self._open()[1]
        return posixpath.join(root, key) if key else root

    def where(self, key: str = "") -> str:
        """A key as a person reads it: a path, or the URI of the object."""
        base = self.spec.describe() if self.spec.is_local else self.spec.uri.split("?", 1)[0].rstrip("/")
        return posixpath.join(base, key) if key else self.spec.describe()

    @contextlib.contextmanager
    def errors(self, action: str, key: str = "") -> Iterator[None]:
        """OSError -> RepositoryUnavailable naming the action and the place; FileNotFoundError passes."""
        try:
            yield
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise RepositoryUnavailable(f"could not {action} {self.where(key)}: {_reason(exc)}") from None

    # ---- reading -------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        with self.errors("read", key), self.fs.open_input_stream(self.path(key)) as f:
            return f.read()

    def open_input(self, key: str):
        """A stream to read in chunks (``with``); errors while reading are the caller's to wrap."""
        with self.errors("open", key):
            return self.fs.open_input_stream(self.path(key))

    def size(self, key: str) -> int | None:
        with self.errors("look up", key):
            info = self.fs.get_file_info(self.path(key))
        return info.size if info.type == pafs.FileType.File else None

    def list_files(self, prefix: str = "") -> list[StoredFile]:
        """Every file under ``prefix`` (recursively), by key; empty when there is nothing."""
        base = self.path()
        with self.errors("list", prefix):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True))
        found = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            key = posixpath.relpath(info.path, base) if base != "/" else info.path.lstrip("/")
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            found.append(StoredFile(key, info.size or 0, mtime))
        return sorted(found, key=lambda f: f.key)

    def check(self) -> None:
        """Reach the root now: RepositoryUnavailable (or InvalidConfig) naming what is missing."""
        if self.spec.url_scheme == "s3":
            bucket = self.path().split("/", 1)[0]
            with self.errors("reach the bucket of"):
                kind = self.fs.get_file_info(bucket).type
            if kind == pafs.FileType.NotFound:
                raise RepositoryUnavailable(f"bucket '{bucket}' of the repository {self.spec.describe()} does not exist "
                                            f"(or these credentials cannot see it); create it first")
        with self.errors("list"):
            self.fs.get_file_info(pafs.FileSelector(self.path(), recursive=False, allow_not_found=True))

    # ---- writing -------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """One object (or file), whole: an object store shows it whole or not at all."""
        with self.errors("write", key), self.fs.open_output_stream(self.path(key)) as f:
            f.write(data)

    def make_dir(self, key: str) -> None:
        with self.errors("create", key):
            self.fs.create_dir(self.path(key), recursive=True)

    def move(self, src: str, dst: str) -> None:
        """Rename (atomic on a local filesystem; only used there)."""
        with self.errors("rename into", dst):
            self.fs.move(self.path(src), self.path(dst))

    def delete_prefix(self, prefix: str) -> None:
        """Remove a directory (or every object under a prefix); nothing when it is not there."""
        with self.errors("delete", prefix):
            try:
                self.fs.delete_dir(self.path(prefix))
            except FileNotFoundError:
                pass

    def delete(self, key: str) -> None:
        with self.errors("delete", key):
            try:
                self.fs.delete_file(self.path(key))
            except FileNotFoundError:
                pass

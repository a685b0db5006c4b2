"""The engine repository: ``<root>/<model>/<version>/<precision>/<target-key>/``, on a local
directory or on an object store (``workers.storage``: any URI ``pyarrow.fs`` opens).

Each leaf holds ``manifest.json`` and the artifact. While a fleet runs its controller is
the only writer (builds send their artifacts to it as bytes). Publishing is atomic:

- on a local directory, a build is written into ``<root>/.staging/`` and renamed into
  place, so a reader never sees half an artifact (``<leaf>/<artifact file>``);
- on an object store (no rename there), the artifact goes first, under its own sha256
  (``<leaf>/<sha256>/<artifact file>``), and the manifest last: a reader sees the old
  manifest with its artifact or the new one with its, never a manifest whose artifact is
  not all there. Older artifacts of the leaf are deleted after.

A listed manifest must parse and its artifact must be listed too; its sha256 is checked
on every load (``workers.artifacts``). int8 calibrations live under ``_calibration/``; the
custom-op libraries models need under ``_libraries/<sha256>/<file>``, by content (many models
and versions share one), each published before the first manifest that names it. Every build's
source ONNX model is kept under ``_sources/<sha256>.onnx`` (written once, before the build's
manifests: one copy per distinct source), so the fleet can rebuild any artifact for a new runtime
by itself (``fleet upgrade``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from workers.artifacts import RepositoryObject
from workers.custom_ops import CustomOpLibrary
from workers.errors import ArtifactCorrupt, FleetError, ModelNotFound
from workers.manifest import MANIFEST_NAME, Manifest, validate_model_ref, version_sort_key
from workers.precision import (
    CALIBRATION_FILES,
    HELDOUT_FILE,
    RANGES_FILE,
    CalibrationResult,
    parse_calibration_key,
    read_calibration,
    write_calibration,
)
from workers.storage import Store, StoredFile, StoreSpec

STAGING = ".staging"
CALIBRATION = "_calibration"  # int8 calibrations, by source sha256 + data sha256 + method
TRITON = "_triton"  # imported Triton configurations, by model: config.pbtxt and warmup/<file>
TRITON_CONFIG = "config.pbtxt"
LIBRARIES = "_libraries"  # custom-op libraries, by sha256
SOURCES = "_sources"  # the source ONNX model of every build, by sha256
CHUNK = 4 << 20


@dataclass(frozen=True)
class StoredArtifact:
    manifest: Manifest
    key: str  # the artifact's key under the repository's root
    location: str  # where it is, as a person reads it (a path or a URI)


def store_spec(where: StoreSpec | str | Path) -> StoreSpec:
    if isinstance(where, StoreSpec):
        return where
    text = str(where)
    return StoreSpec(text if "://" in text else str(Path(text).resolve()))


def _leaf(manifest: Manifest) -> str:
    return f"{manifest.model}/{manifest.version}/{manifest.precision}/{manifest.target.key()}"


class Repository:
    def __init__(self, where: StoreSpec | str | Path) -> None:
        self.spec = store_spec(where)
        self.store = Store(self.spec)
        # manifests read before, by key: a listing re-reads only what changed (one GET each on a store)
        self._read: dict[str, tuple[tuple[int, float], Manifest | None]] = {}
        self._files: dict[str, tuple[tuple[int, float], bytes]] = {}  # imported Triton configurations, by key

    @property
    def is_local(self) -> bool:
        return self.spec.is_local

    def describe(self) -> str:
        return self.spec.describe()

    @property
    def root(self) -> Path:
        """The directory of a local repository."""
        if not self.is_local:
            raise ValueError(f"repository {self.describe()} is not a local directory")
        return Path(self.store.path())

    def prepare(self) -> None:
        """Make sure it can be used now (``fleet up``): create a local root; reach an object store.
        RepositoryUnavailable / InvalidConfig say what is missing."""
        if self.is_local:
            self.store.make_dir("")
        self.store.check()

    # ---- artifacts ----------------------------------------------------------------
    def artifact_key(self, manifest: Manifest) -> str:
        leaf = _leaf(manifest)
        if self.is_local:
            return f"{leaf}/{manifest.artifact_file}"
        return f"{leaf}/{manifest.artifact_sha256}/{manifest.artifact_file}"

    def stored(self, manifest: Manifest) -> StoredArtifact:
        key = self.artifact_key(manifest)
        return StoredArtifact(manifest, key, self.store.where(posixpath.dirname(key)))

    def object_source(self, manifest: Manifest) -> RepositoryObject:
        """Where a worker fetches this artifact itself (for an object store every host reaches)."""
        return RepositoryObject(self.spec, self.artifact_key(manifest))

    def publish(self, manifest: Manifest, data: bytes, libraries: dict[str, bytes] | None = None) -> StoredArtifact:
        """Check the artifact's bytes against its manifest, then publish both (replacing an older build).
        ``libraries``: the custom-op libraries the manifest names, by sha256 (those the repository has
        already may be left out); published first, so no manifest names a library that is not there."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != manifest.artifact_sha256:
            raise ArtifactCorrupt(
                f"the artifact of {manifest.model} arrived corrupt: sha256 {actual[:12]}... does not match its "
                f"manifest's {manifest.artifact_sha256[:12]}...; build it again")
        for library in manifest.custom_ops:
            self._publish_library(manifest, library, (libraries or {}).get(library.sha256))
        if self.is_local:
            self._publish_by_rename(manifest, data)
        else:
            self._publish_artifact_then_manifest(manifest, data)
        return self.stored(manifest)

    def _publish_by_rename(self, manifest: Manifest, data: bytes) -> None:
        staging = f"{STAGING}/{uuid.uuid4().hex}"
        leaf = _leaf(manifest)
        try:
            self.store.make_dir(staging)
            self.store.write_bytes(f"{staging}/{manifest.artifact_file}", data)
            self.store.write_bytes(f"{staging}/{MANIFEST_NAME}", manifest.to_json().encode())
            self.store.make_dir(posixpath.dirname(leaf))
            old = None
            if Path(self.store.path(leaf)).exists():
                old = f"{posixpath.dirname(leaf)}/.old-{posixpath.basename(leaf)}-{uuid.uuid4().hex[:8]}"
                self.store.move(leaf, old)
            self.store.move(staging, leaf)
            if old is not None:
                self.store.delete_prefix(old)
        finally:
            self.store.delete_prefix(staging)  # nothing half-written ever stays

    def _publish_artifact_then_manifest(self, manifest: Manifest, data: bytes) -> None:
        leaf = _leaf(manifest)
        key = self.artifact_key(manifest)
        self.store.write_bytes(key, data)
        self.store.write_bytes(f"{leaf}/{MANIFEST_NAME}", manifest.to_json().encode())
        for stale in self.store.list_files(leaf):  # artifacts of earlier builds of this leaf
            if stale.key not in (key, f"{leaf}/{MANIFEST_NAME}"):
                self.store.delete(stale.key)

    def remove_artifact(self, manifest: Manifest) -> None:
        """Delete one artifact (its leaf: manifest and artifact), e.g. a plan no worker can run any more."""
        self.store.delete_prefix(_leaf(manifest))

    # ---- source models -----------------------------------------------------------
    def source_key(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return f"{SOURCES}/{sha256}.onnx"

    def has_source(self, sha256: str) -> bool:
        return self.store.size(self.source_key(sha256)) is not None

    def store_source(self, data: bytes) -> str:
        """Keep a build's source model by its sha256 (once: the same bytes are not written again).
        Returns its sha256. Renamed into place on a directory; one object on a store."""
        sha = hashlib.sha256(data).hexdigest()
        key = self.source_key(sha)
        if self.store.size(key) == len(data):
            return sha
        if not self.is_local:
            self.store.write_bytes(key, data)
            return sha
        staging = f"{STAGING}/{uuid.uuid4().hex}"
        try:
            self.store.make_dir(staging)
            self.store.write_bytes(f"{staging}/source.onnx", data)
            self.store.make_dir(SOURCES)
            self.store.move(f"{staging}/source.onnx", key)
        finally:
            self.store.delete_prefix(staging)
        return sha

    def read_source(self, sha256: str) -> bytes:
        try:
            return self.store.read_bytes(self.source_key(sha256))
        except FileNotFoundError:
            raise ArtifactCorrupt(f"the source model {sha256[:12]}... is not in the repository {self.describe()}; "
                                  f"run `fleet build` of that model again (builds keep their source)") from None

    # ---- custom-op libraries -----------------------------------------------------
    def library_key(self, library: CustomOpLibrary) -> str:
        return f"{LIBRARIES}/{library.sha256}/{library.file_name}"

    def _publish_library(self, manifest: Manifest, library: CustomOpLibrary, data: bytes | None) -> None:
        key = self.library_key(library)
        if data is None:
            if self.store.size(key) is None:
                raise ArtifactCorrupt(f"{manifest.model} needs the custom-op library {library.describe()}, which the "
                                      f"repository does not have and the build did not send; build it again")
            return
        actual = hashlib.sha256(data).hexdigest()
        if actual != library.sha256:
            raise ArtifactCorrupt(f"the custom-op library {library.file_name} of {manifest.model} arrived corrupt: sha256 "
                                  f"{actual[:12]}... does not match its manifest's {library.sha256[:12]}...; build it again")
        if self.store.size(key) == len(data):
            return  # content-addressed: the same bytes are there already
        self._publish_files(posixpath.dirname(key), {library.file_name: data}, last=library.file_name)

    def library_source(self, library: CustomOpLibrary) -> RepositoryObject:
        """Where a worker fetches a library itself (an object store every host reaches)."""
        return RepositoryObject(self.spec, self.library_key(library))

    def read_library(self, library: CustomOpLibrary) -> bytes:
        key = self.library_key(library)
        try:
            return self.store.read_bytes(key)
        except FileNotFoundError:
            raise ArtifactCorrupt(f"custom-op library {self.store.where(key)} is missing; rebuild the model with "
                                  f"`fleet build --custom-ops`") from None

    def read_artifact(self, manifest: Manifest) -> bytes:
        key = self.artifact_key(manifest)
        try:
            return self.store.read_bytes(key)
        except FileNotFoundError:
            raise ArtifactCorrupt(f"artifact {self.store.where(key)} is missing; rebuild it with `fleet build`") from None

    def artifacts(self, model: str | None = None) -> list[StoredArtifact]:
        """Every published artifact (of one model): manifests that parse and whose artifact is there."""
        if model is not None:
            validate_model_ref(model)
        files = self.store.list_files(model or "")
        keys = {f.key for f in files}
        found = []
        for f in files:
            parts = f.key.split("/")
            if len(parts) != 5 or parts[-1] != MANIFEST_NAME or any(p.startswith(".") for p in parts):
                continue
            if parts[0].startswith("_"):
                continue
            manifest = self._manifest(f)
            if manifest is not None and self.artifact_key(manifest) not in keys:
                manifest = self._manifest(f, fresh=True)  # replaced within the store's time resolution?
            if manifest is None or _leaf(manifest) != posixpath.dirname(f.key) or self.artifact_key(manifest) not in keys:
                continue  # not where its own fields put it, or its artifact is not all there yet
            found.append(self.stored(manifest))
        return found

    def _manifest(self, f: StoredFile, fresh: bool = False) -> Manifest | None:
        """The manifest at a listed key (read again only when its size or time changed); None if invalid."""
        seen = self._read.get(f.key)
        if seen is not None and seen[0] == (f.size, f.mtime) and not fresh:
            return seen[1]
        try:
            manifest: Manifest | None = Manifest.from_dict(json.loads(self.store.read_bytes(f.key)))
        except FileNotFoundError:
            return None  # replaced while we listed
        except (KeyError, TypeError, ValueError):
            manifest = None  # an invalid manifest is never served
        self._read[f.key] = ((f.size, f.mtime), manifest)
        return manifest

    def models(self) -> dict[str, list[str]]:
        """Model name -> versions, newest last."""
        result: dict[str, set[str]] = {}
        for art in self.artifacts():
            result.setdefault(art.manifest.model, set()).add(art.manifest.version)
        return {m: sorted(v, key=version_sort_key) for m, v in sorted(result.items())}

    def resolve_version(self, model: str, version: str | None) -> str:
        validate_model_ref(model, version)
        versions = self.models().get(model)
        if not versions:
            raise ModelNotFound(f"model '{model}' is not in the repository {self.describe()}")
        if version is None:
            return versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model '{model}' has no version '{version}' (versions: {', '.join(versions)})")
        return version

    def check(self, model: str | None = None) -> list[str]:
        """Problems found by re-hashing every artifact where it is stored (empty when all is well)."""
        problems = []
        for art in self.artifacts(model):
            digest = hashlib.sha256()
            try:
                with self.store.open_input(art.key) as stream, self.store.errors("read", art.key):
                    while chunk := stream.read(CHUNK):
                        digest.update(chunk)
            except (FileNotFoundError, FleetError) as exc:
                problems.append(f"artifact {self.store.where(art.key)} cannot be read: {exc}")
                continue
            if digest.hexdigest() != art.manifest.artifact_sha256:
                problems.append(f"artifact {self.store.where(art.key)} is corrupt: sha256 {digest.hexdigest()[:12]}... "
                                f"does not match the manifest's {art.manifest.artifact_sha256[:12]}...")
        return problems

    def remove(self, model: str, version: str | None = None) -> None:
        validate_model_ref(model, version)
        self.store.delete_prefix(f"{model}/{version}" if version else model)

    # ---- int8 calibrations -------------------------------------------------------
    def store_calibration(self, key: str, result: CalibrationResult) -> str:
        """Write a calibration (ranges, Q/DQ model, TensorRT cache) under its key, the ranges last.
        Returns where it went."""
        parse_calibration_key(key)
        with tempfile.TemporaryDirectory(prefix="fleet-calibration-") as tmp:
            write_calibration(result, tmp)
            files = {name: (Path(tmp) / name).read_bytes() for name in CALIBRATION_FILES + (HELDOUT_FILE,)
                     if (Path(tmp) / name).is_file()}  # the held-out rows are optional
        return self._publish_files(f"{CALIBRATION}/{key}", files, last=RANGES_FILE)

    def _publish_files(self, final: str, files: dict[str, bytes], last: str) -> str:
        """Replace the directory ``final`` with ``files`` (names may have '/'): renamed into place on a local
        directory; on an object store written one by one, ``last`` (what readers look for) last."""
        order = [n for n in files if n != last] + [last]
        if self.is_local:
            staging = f"{STAGING}/{uuid.uuid4().hex}"
            try:
                for name in order:
                    self.store.make_dir(posixpath.dirname(f"{staging}/{name}"))
                    self.store.write_bytes(f"{staging}/{name}", files[name])
                self.store.make_dir(posixpath.dirname(final))
                self.store.delete_prefix(final)
                self.store.move(staging, final)
            finally:
                self.store.delete_prefix(staging)
        else:
            for stale in self.store.list_files(final):
                if stale.key.removeprefix(final + "/") not in files:
                    self.store.delete(stale.key)
            for name in order:
                self.store.write_bytes(f"{final}/{name}", files[name])
        return self.store.where(final)

    # ---- imported Triton configurations ------------------------------------------
    def store_triton_config(self, model: str, files: dict[str, bytes]) -> str:
        """A model's Triton configuration as imported (``config.pbtxt``, ``warmup/<file>``), replacing the last one."""
        validate_model_ref(model)
        if TRITON_CONFIG not in files:
            raise ValueError(f"a Triton configuration needs {TRITON_CONFIG}")
        return self._publish_files(f"{TRITON}/{model}", files, last=TRITON_CONFIG)

    def triton_configs(self) -> dict[str, dict[str, bytes]]:
        """Model -> the files of its imported Triton configuration (read again only when changed)."""
        found: dict[str, dict[str, bytes]] = {}
        listed = self.store.list_files(TRITON)
        complete = {f.key.split("/")[1] for f in listed if f.key.count("/") == 2 and f.key.endswith("/" + TRITON_CONFIG)}
        for f in listed:
            parts = f.key.split("/", 2)
            if len(parts) != 3 or parts[1] not in complete:
                continue
            seen = self._files.get(f.key)
            if seen is None or seen[0] != (f.size, f.mtime):
                try:
                    seen = ((f.size, f.mtime), self.store.read_bytes(f.key))
                except FileNotFoundError:
                    continue  # replaced while we listed
                self._files[f.key] = seen
            found.setdefault(parts[1], {})[parts[2]] = seen[1]
        return found

    def remove_triton_config(self, model: str) -> None:
        validate_model_ref(model)
        self.store.delete_prefix(f"{TRITON}/{model}")

    def find_calibration(self, source_sha256: str, method: str | None = None) -> CalibrationResult | None:
        """The newest calibration of this source model (any data, the given method), or None."""
        found = []
        for f in self.store.list_files(CALIBRATION):
            parts = f.key.split("/")
            if len(parts) != 3 or parts[2] != RANGES_FILE:
                continue
            try:
                src, _, m = parse_calibration_key(parts[1])
            except ValueError:
                continue
            if src == source_sha256 and (method is None or m == method):
                found.append((f.mtime, parts[1], m))
        if not found:
            return None
        _, key, m = max(found)
        with tempfile.TemporaryDirectory(prefix="fleet-calibration-") as tmp:
            for name in CALIBRATION_FILES + (HELDOUT_FILE,):
                try:
                    (Path(tmp) / name).write_bytes(self.store.read_bytes(f"{CALIBRATION}/{key}/{name}"))
                except FileNotFoundError:
                    pass  # read_calibration names what is missing
            return read_calibration(tmp, m)

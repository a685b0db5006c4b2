"""The controller's calls that write the repository (the controller is its only writer) or read
single objects of it for other hosts: a mixin of FleetController, which provides ``repo``,
``events``, ``loader``, ``_manifests``, ``_scan`` and ``_need_gcs``."""

from __future__ import annotations

import asyncio

from workers.manifest import Manifest
from workers.precision import CalibrationResult

from cluster.repository import StoredArtifact


class RepositoryVerbs:
    async def publish(self, manifest: dict, data: bytes, libraries: dict[str, bytes] | None = None) -> StoredArtifact:
        """Publish a build: the artifact's bytes are checked against the manifest, then stored atomically
        (``libraries``: the custom-op libraries it names, by sha256, stored first)."""
        self._need_gcs("publishing a build")
        stored = await asyncio.to_thread(self.repo.publish, Manifest.from_dict(manifest), data, libraries)
        self.events.add("published", engine=stored.manifest.engine_key, location=stored.location)
        return stored

    async def store_triton_config(self, model: str, files: dict[str, bytes]) -> str:
        """A model's Triton configuration as imported (``fleet import-triton``)."""
        self._need_gcs("storing an imported configuration")
        return await asyncio.to_thread(self.repo.store_triton_config, model, files)

    async def triton_configs(self) -> dict[str, dict[str, bytes]]:
        return await asyncio.to_thread(self.repo.triton_configs)

    async def remove(self, model: str, version: str) -> None:
        """Take a model version out of service and out of the repository (an import whose version policy
        no longer selects it)."""
        self._need_gcs(f"removing {model} version {version}")
        if any(m.model == model and m.version == version for m in self._manifests):
            await self.loader.unload(model, version, self._manifests, explicit=False)
        await asyncio.to_thread(self.repo.remove, model, version)
        await self._scan()

    async def read_artifact(self, manifest: dict) -> bytes:
        """An artifact's bytes (``fleet export-triton`` on another host)."""
        return await asyncio.to_thread(self.repo.read_artifact, Manifest.from_dict(manifest))

    async def store_source(self, data: bytes) -> str:
        """Keep a build's source model by its sha256 (``_sources/``), so the fleet can rebuild it later."""
        self._need_gcs("storing a source model")
        return await asyncio.to_thread(self.repo.store_source, data)

    async def store_calibration(self, key: str, result: CalibrationResult) -> str:
        return await asyncio.to_thread(self.repo.store_calibration, key, result)

    async def find_calibration(self, source_sha256: str, method: str | None = None) -> CalibrationResult | None:
        return await asyncio.to_thread(self.repo.find_calibration, source_sha256, method)

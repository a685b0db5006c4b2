"""Reading a Triton model repository where it is: a directory, or any URI ``pyarrow.fs`` opens
(``s3://bucket/models?endpoint_override=...``, ``gs://...``), as Triton's ``--model-repository``.

``<model>/config.pbtxt``, ``<model>/<version>/<model file>`` (numeric version directories) and
``<model>/warmup/<file>`` (the warm-up data files); everything else is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import InvalidConfig
from workers.storage import Store, StoreSpec

from cluster.triton.mapping import CONFIG_FILE, WARMUP_DIR


@dataclass
class ModelDir:
    name: str
    config_text: str | None  # config.pbtxt, when there is one
    versions: dict[str, set[str]] = field(default_factory=dict)  # numeric directory -> file names in it
    warmup: set[str] = field(default_factory=set)  # file names under warmup/


def source_spec(where: str | Path) -> StoreSpec:
    text = str(where)
    return StoreSpec(text if "://" in text else str(Path(text).expanduser().resolve()))


class TritonRepository:
    """One Triton model repository, read through ``workers.storage`` (nothing is written to it)."""

    def __init__(self, where: str | Path) -> None:
        self.spec = source_spec(where)
        self.store = Store(self.spec)

    def describe(self) -> str:
        return self.spec.describe()

    def models(self) -> list[ModelDir]:
        """Every model directory (a top-level directory with a config.pbtxt or version directories)."""
        if self.spec.is_local and not Path(self.store.path()).is_dir():
            raise InvalidConfig(f"Triton model repository {self.describe()} is not a directory")
        found: dict[str, ModelDir] = {}
        texts: dict[str, str] = {}
        for stored in self.store.list_files(""):
            parts = stored.key.split("/")
            if len(parts) < 2 or any(p.startswith(".") for p in parts):
                continue
            name = parts[0]
            if parts[1:] == [CONFIG_FILE]:
                texts[name] = self.store.read_bytes(stored.key).decode("utf-8", errors="replace")
            elif len(parts) >= 3 and parts[1].isdigit():
                found.setdefault(name, ModelDir(name, None)).versions.setdefault(parts[1], set()).add("/".join(parts[2:]))
            elif len(parts) == 3 and parts[1] == WARMUP_DIR:
                found.setdefault(name, ModelDir(name, None)).warmup.add(parts[2])
        for name, text in texts.items():
            found.setdefault(name, ModelDir(name, None)).config_text = text
        return [found[name] for name in sorted(found) if found[name].versions or found[name].config_text is not None]

    def read(self, model: ModelDir, *parts: str) -> bytes:
        """A file of a model: ``read(m, "3", "model.onnx")``, ``read(m, "warmup", "x.bin")``."""
        return self.store.read_bytes("/".join((model.name, *parts)))

    def warmup_files(self, model: ModelDir) -> dict[str, bytes]:
        return {name: self.read(model, WARMUP_DIR, name) for name in sorted(model.warmup)}


def triton_models_in(directory: str | Path) -> list[str]:
    """The models of a local directory that has Triton's layout (``<model>/config.pbtxt``), for a
    clear error when it is given where the fleet keeps its own engines."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}") if not p.parent.name.startswith((".", "_")))

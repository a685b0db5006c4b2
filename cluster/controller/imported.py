"""Models imported from a Triton model repository: their configurations as imported (what the
config endpoint shows, as Triton would) and how the fleet serves them (their load options).

The importer (``cluster.triton.importer``) stores each configuration in the repository
(``_triton/<model>/``); the controller reads them with every scan.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import InvalidInput
from workers.kserve.model_config import read_config
from workers.kserve.proto import model_config_pb2 as mc
from workers.messages import LoadOptions

from cluster.config import FleetConfig
from cluster.repository import TRITON_CONFIG
from cluster.triton.mapping import WARMUP_DIR, imported_options


@dataclass(frozen=True)
class Imported:
    config: mc.ModelConfig
    options: LoadOptions


def read_imported(files: dict[str, dict[str, bytes]], fleet: FleetConfig) -> tuple[dict[str, Imported], dict[str, str]]:
    """Model -> its imported configuration and options; and model -> why one could not be read."""
    found, problems = {}, {}
    for model, named in files.items():
        try:
            config = read_config(named[TRITON_CONFIG].decode(), model, pbtxt=True)
            warmup = {name.removeprefix(WARMUP_DIR + "/"): data for name, data in named.items()
                      if name.startswith(WARMUP_DIR + "/")}
            found[model] = Imported(config, imported_options(config, fleet.model_config_for(model).load_options(), warmup))
        except (InvalidInput, ValueError, KeyError) as exc:
            problems[model] = str(exc)
    return found, problems

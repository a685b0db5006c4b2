import os
from pathlib import Path

import pytest

from cluster.demo import make_big_mlp


@pytest.fixture(scope="session")
def big_mlp(tmp_path_factory):
    return make_big_mlp(tmp_path_factory.mktemp("big") / "big-mlp.onnx")


@pytest.fixture(scope="session")
def results_dir():
    """Where GPU test numbers go ($OUT on the device machine, else a temp dir)."""
    out = Path(os.environ.get("OUT") or "/tmp/fleet-gpu-results")
    out.mkdir(parents=True, exist_ok=True)
    return out

"""One CPU fleet for the HTTP, Triton compatibility, schemathesis and shared memory modules.

Package-scoped: it starts when the first module of this folder needs it and stops after
the last, so these modules share one Ray, one set of workers and one start-up (about 15 s
each before). Every module leaves the fleet serving: a test that changes it (unloads a
model, kills a worker) waits until the fleet is whole again or puts it back.
"""

import pytest

from tests.integration.fleet_fixtures import build_cpu, running_fleet
from tests.models import (
    make_add_sub,
    make_fp16_scale,
    make_int64_add,
    make_mixed_scale,
    make_simple,
    make_simple_identity,
    make_simple_string,
)

# Triton's example models, as its example clients expect them (built for 16 rows: its model control
# example loads "simple" with max_batch_size 16)
TRITON_EXAMPLES = {"simple": make_simple, "simple_string": make_simple_string, "simple_identity": make_simple_identity}


@pytest.fixture(scope="package")
def shared_fleet(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("shared-fleet")
    repo = work / "repo"
    sources = {
        "digits-mlp": demo_models["digits-mlp"],
        "cnn-small": demo_models["cnn-small"],
        "add-sub": make_add_sub(work / "add-sub.onnx"),
        "fp16-scale": make_fp16_scale(work / "fp16.onnx"),
        "int64-add": make_int64_add(work / "int64.onnx"),
        "mixed-scale": make_mixed_scale(work / "mixed.onnx"),
        **{name: make(work / f"{name}.onnx") for name, make in TRITON_EXAMPLES.items()},
    }
    for name, path in sources.items():
        build_cpu(repo, path, name, max_batch=256 if name == "digits-mlp" else 16 if name in TRITON_EXAMPLES else 64)
    with running_fleet("configs/local.yaml", repo, allow_client_shm=True) as (config, url):
        yield {"url": url, "grpc": f"127.0.0.1:{config.grpc_port}", "sources": sources}

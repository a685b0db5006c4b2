"""Triton's perf_analyzer (its real C++ binary, scripts/install_perf_analyzer.py) against the fleet.

Over HTTP (the front door) and gRPC (the fleet's gRPC router), with and without system shared
memory, on digits-mlp and on a model with two inputs of different types, one of them with a
dynamic dimension besides the batch (``--shape``). perf_analyzer reads the model's metadata,
its configuration and its statistics before and after each window: it exits 0 only when all
of them answer as Triton's do. Short runs: a few hundred requests each.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.needs import skip_unless

pytestmark = pytest.mark.integration
PERF_ANALYZER = Path(sys.prefix) / "perf-analyzer" / "bin" / "perf_analyzer"
RUN = ["--concurrency-range", "2", "--measurement-mode", "count_windows", "--measurement-request-count", "60",
       "--stability-percentage", "999", "--max-trials", "10"]  # clean runs are the point: a busy CI host never settles


@pytest.fixture(scope="module")
def fleet(shared_fleet):
    skip_unless(PERF_ANALYZER.is_file(), f"perf_analyzer is not installed at {PERF_ANALYZER} "
                                         "(scripts/test.sh installs it: scripts/install_perf_analyzer.py)")
    return shared_fleet


def perf_analyzer(fleet, protocol: str, model: str, *extra: str) -> str:
    url = fleet["url"].removeprefix("http://") if protocol == "http" else fleet["grpc"]
    done = subprocess.run([str(PERF_ANALYZER), "-m", model, "-u", url, "-i", protocol, *RUN, *extra],
                          capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "error" not in output.lower(), output[-3000:]
    throughput = float(re.search(r"Throughput: ([0-9.]+) infer/sec", output).group(1))
    served = int(re.search(r"Server: \n\s+Inference count: (\d+)", output).group(1))
    assert throughput > 0 and served > 0, output[-3000:]  # the server's statistics moved too
    return output


@pytest.mark.parametrize("shm", [False, True], ids=["body", "system-shm"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_clean_on_digits_mlp(fleet, protocol, shm):
    perf_analyzer(fleet, protocol, "digits-mlp", *(["--shared-memory", "system"] if shm else []))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_clean_on_two_inputs_of_different_types(fleet, protocol):
    output = perf_analyzer(fleet, protocol, "mixed-scale", "--shape", "x:5", "--shared-memory", "system")
    assert "Avg request latency" in output

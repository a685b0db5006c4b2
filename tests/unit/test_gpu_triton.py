"""The GPU bench's Triton part (benchmarks/gpu_triton.py) without a GPU: its provider list, its
environment, the comparison; end to end on the CPU only with a PyTriton environment
(FLEET_BENCH_TRITON_PYTHON, opt-in: PyTriton pins numpy < 2 and lives in its own venv; with
FLEET_BENCH_TRITON_PYTHONPATH for a site directory such as the GPU host's /tmp/triton-site)."""

import os
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu, gpu_triton
from benchmarks.common import REPO_ROOT
from benchmarks.phases import triton as triton_phase


def test_cuda_spec_builds_the_fleet_engines_cuda_provider_options():
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    (cuda,) = triton_phase.session_providers("cuda", device_id=0)
    fleet = OnnxRuntimeEngine("m.onnx", provider="cuda")._cuda_options()
    assert cuda == ("CUDAExecutionProvider", fleet)
    assert triton_phase.session_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError):
        triton_phase.session_providers("tensorrt")


def test_cublas_workspace_is_the_fleets():
    from workers.engines import onnxruntime as fleet_engine

    assert triton_phase.CUBLAS_WORKSPACE == fleet_engine.CUBLAS_WORKSPACE


def test_a_cuda_session_without_the_cuda_provider_is_an_error_naming_it(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        triton_phase.make_session(str(tmp_path / "m.onnx"), "cuda")


def test_triton_environment_puts_its_dirs_first_and_the_checkout_last():
    env = gpu_triton.triton_env("/tmp/triton-site:/tmp/site", "m1",
                                {"PYTHONPATH": "/tmp/site:.", "FLEET_LOADGEN_CPUS": "8-15", "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/tmp/triton-site", "/tmp/site", ".", str(REPO_ROOT)]
    assert env["FLEET_BENCH_MARKER"] == "m1" and env["X"] == "1" and "FLEET_LOADGEN_CPUS" not in env


def test_gpu_bench_takes_the_triton_options():
    args = gpu.parse_args(["--triton-python", "python3", "--triton-pythonpath", "/a:/b", "--batches", "1",
                           "--levels", "1:64"])
    assert args.triton_python == "python3" and args.triton_pythonpath == "/a:/b" and args.levels == {1: [64]}


def _row(system, batch, c, req_s, p99, errors=0):
    return {"system": system, "gpus": 1, "batch": batch, "concurrency": c, "req_per_s": req_s, "p99_ms": p99,
            "errors": errors}


def test_vs_triton_pairs_the_same_batch_and_level():
    rows = [_row("fleet-http-binary", 1, 64, 12000, 9.0), _row("triton-http-binary", 1, 64, 10000, 10.0),
            _row("fleet-http-binary", 1, 8, 3000, 3.0), _row("triton-http-binary", 256, 8, 100, 90.0),
            _row("bare", 1, 64, 50000, 1.0)]
    (c,) = gpu_triton.vs_triton(rows)
    assert (c["batch"], c["concurrency"], c["req_per_s_ratio"], c["p99_no_worse"]) == (1, 64, 1.2, True)
    assert gpu_triton.target_met([c]) is True
    assert gpu_triton.target_met([dict(c, p99_no_worse=False)]) is False
    assert gpu_triton.target_met([]) is None
    assert "| 1 | 64 | 12,000 | 10,000 | 1.20x |" in "\n".join(gpu_triton.table([c]))


def test_a_wrong_answer_is_named():
    from workers.kserve.client_codec import encode_request

    want = {"output": np.ones((2, 3), np.float32)}
    body, headers = encode_request({"output": np.ones((2, 3), np.float32)}, binary=True)
    assert gpu_triton._check_answer(b'{"outputs":[{"name":"output","datatype":"FP32","shape":[2,3],'
                                    b'"data":[1,1,1,1,1,1]}]}', {}, want) is None
    bad = gpu_triton._check_answer(b'{"outputs":[{"name":"output","datatype":"FP32","shape":[2,3],'
                                   b'"data":[1,1,1,1,1,2]}]}', {}, want)
    assert "differs" in bad
    assert "missing" in gpu_triton._check_answer(b'{"outputs":[]}', {}, want)
    assert "undecodable" in gpu_triton._check_answer(b"<html>", {}, want)


def test_the_triton_process_group_is_ended_when_the_block_fails(tmp_path):
    """A stand-in for PyTriton (prints its lines, then starts a child that ignores stdin closing): the
    block's exception ends it and its child; nothing with the marker is left."""
    fake = tmp_path / "benchmarks" / "phases"
    fake.mkdir(parents=True)
    python = tmp_path / "fake-python"
    python.write_text(f"""#!/bin/sh
exec {sys.executable} -c '
import subprocess, sys, time
subprocess.Popen(["sleep", "300"])
print("TRITON_INFO {{}}", flush=True)
print("TRITON_READY", flush=True)
time.sleep(300)
'
""")
    python.chmod(0o755)
    spec = {"ports": {"http": 1}}
    with pytest.raises(KeyError):
        with gpu_triton.pytriton_server(str(python), "", spec, tmp_path / "work", stop_grace_s=1) as (base, info):
            assert base == "http://127.0.0.1:1" and info == {}
            raise KeyError("the bench failed")
    time.sleep(0.5)
    assert pids_with_marker_prefix("gpu-triton-") == []


def pids_with_marker_prefix(prefix: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(f"FLEET_BENCH_MARKER={prefix}{os.getpid()}-".encode()) for e in env):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not os.environ.get("FLEET_BENCH_TRITON_PYTHON"),
                    reason="set FLEET_BENCH_TRITON_PYTHON to a python with nvidia-pytriton (opt-in)")
def test_triton_part_end_to_end_on_the_cpu(tmp_path):
    """PyTriton with ONNX Runtime on the CPU (the GPU path's code, the CPU provider): answers checked,
    rows measured, Triton gone afterwards."""
    from cluster.demo import make_big_mlp

    model = make_big_mlp(tmp_path / "big-mlp.onnx", 64, 2)
    args = Namespace(batches=[1, 4], levels={1: [4], 4: [2]}, duration=1.0,
                     triton_python=os.environ["FLEET_BENCH_TRITON_PYTHON"],
                     triton_pythonpath=os.environ.get("FLEET_BENCH_TRITON_PYTHONPATH", ""))
    out = gpu_triton.bench_triton(model, args, "python", tmp_path, lambda b: gpu.feeds_for(b, 64), provider="cpu")
    assert "wrong_answers" not in out, out
    assert [(r["system"], r["batch"], r["concurrency"]) for r in out["rows"]] == [
        ("triton-http-binary", 1, 4), ("triton-http-binary", 4, 2)]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in out["rows"])
    assert out["info"]["provider"] == "cpu"
    assert pids_with_marker_prefix("gpu-triton-") == []

"""The `fleet` CLI as a user runs it: up (real `ray start`), status, infer, models, build, down; and the
commands run from another directory, which act on the running fleet (its controller says where it is)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from cluster.client import FleetClient
from cluster.demo import train_digits_mlp
from tests.custom_ops_model import calibration_data, direct, extensions_library, extensions_sha256, within_precision
from tests.integration.fleet_fixtures import checkout_env, free_port
from tests.models import custom_op_rows, make_custom_op_mlp

pytestmark = pytest.mark.integration
FLEET = [sys.executable, "-m", "cluster.cli"]


def run(args, cwd, timeout=120, **env):
    return subprocess.run(FLEET + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=checkout_env(**env))


@pytest.fixture(scope="module")
def foreground_fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    port = free_port()
    config = work / "fleet.yaml"
    config.write_text(
        f"name: cli-test\nrepository: {work / 'repo'}\nport: {port}\nray_port: {free_port()}\n"
        f"dashboard_port: {free_port()}\ngrpc_port: {free_port()}\ncpu_budget: 2GiB\nmodels:\n  digits-mlp:\n    max_batch: 256\n"
        + "".join(f"  custom-op-{p}:\n    trusted_sha256: [{extensions_sha256()}]\n" for p in ("float32", "int8c", "int8"))
        # float16 names its library in the config instead of on the command line
        + f"  custom-op-float16:\n    trusted_sha256: [{extensions_sha256()}]\n    custom_ops: [{extensions_library()}]\n"
    )
    log = open(work / "up.log", "w")
    proc = subprocess.Popen(FLEET + ["up", "--config", str(config), "--demo", "--foreground"], cwd=work,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=checkout_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fleet up exited {proc.returncode}:\n{(work / 'up.log').read_text()[-3000:]}")
        try:
            if requests.get(url + "/v2/health/ready", timeout=2).status_code == 200 and "Try:" in (work / "up.log").read_text():
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("fleet up did not become ready:\n" + (work / "up.log").read_text()[-3000:])
    yield work, url, config, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
    log.close()


def test_up_prints_ready_to_paste_requests(foreground_fleet):
    work, url, _, _ = foreground_fleet
    text = (work / "up.log").read_text()
    assert f"curl -s -X POST {url}/v2/models/digits-mlp/infer" in text
    # paste the printed example into a shell, as a user would
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "curl -s -X POST" in line)
    command = lines[start].rstrip("\\") + lines[start + 1]
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    import json

    labels = next(o for o in json.loads(out.stdout)["outputs"] if o["name"] == "label")["data"]
    assert labels == [2]
    assert (work / "models" / "digits-mlp.onnx").exists() and (work / "models" / "cnn-small.onnx").exists()


def test_curl_request_matches_scikit_learn(foreground_fleet, digits_test):
    _, url, _, _ = foreground_fleet
    X = digits_test[0][:8]
    import json

    body = json.dumps({"inputs": [{"name": "input", "shape": [8, 64], "datatype": "FP32", "data": X.tolist()}]})
    out = subprocess.run(["curl", "-s", "-X", "POST", f"{url}/v2/models/digits-mlp/infer", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=30)
    labels = next(o for o in json.loads(out.stdout)["outputs"] if o["name"] == "label")["data"]
    assert labels == train_digits_mlp().predict(X).tolist()


def test_status_shows_cpu_device_budget_and_engines(foreground_fleet):
    work, url, _, _ = foreground_fleet
    result = run(["status", "--url", url], work)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fleet cli-test"
    row = lines[2]
    assert "CPU" in row and "cpu" in row and "/2.0 GiB" in row
    assert "digits-mlp:float32" in row and "cnn-small:float32" in row


def test_fleet_infer_equals_onnxruntime_directly(foreground_fleet, digits_test):
    import onnxruntime as ort

    work, url, _, _ = foreground_fleet
    X = digits_test[0][:16]
    np.save(work / "rows.npy", X)
    result = run(["infer", "digits-mlp", "--input", str(work / "rows.npy"), "--output", str(work / "out.npz"), "--url", url], work)
    assert result.returncode == 0, result.stderr
    assert "served by" in result.stderr
    expected = ort.InferenceSession(str(work / "repo" / "digits-mlp" / "1" / "float32" / "onnxruntime-cpu" / "model.onnx")).run(None, {"input": X})
    with np.load(work / "out.npz") as got:
        np.testing.assert_array_equal(got["label"], expected[0])
        np.testing.assert_array_equal(got["probabilities"], expected[1])


def test_models_lists_the_repository(foreground_fleet):
    work, _, config, _ = foreground_fleet
    result = run(["models", "--config", str(config)], work)
    assert result.returncode == 0
    assert "digits-mlp" in result.stdout and "cnn-small" in result.stdout and "ONNX Runtime cpu" in result.stdout


def test_build_models_infer_from_another_directory_act_on_the_running_fleet(foreground_fleet, tmp_path, demo_models,
                                                                           digits_test):
    """The issue's new user: the fleet started in its directory, the commands run in another, with no
    --url, --config or --repository; they find the fleet's repository and URL by asking the fleet."""
    work, url, config, _ = foreground_fleet
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_bytes(Path(demo_models["digits-mlp"]).read_bytes())
    # where `fleet up` started Ray: other Rays may run on this machine, and `auto` takes the newest
    on_fleet = {"RAY_ADDRESS": f"127.0.0.1:{yaml.safe_load(config.read_text())['ray_port']}"}
    built = run(["build", "model.onnx", "--name", "d-elsewhere"], elsewhere, timeout=300, **on_fleet)
    assert built.returncode == 0, built.stderr
    assert f"its repository is {work / 'repo'}" in built.stderr and "built on" in built.stderr
    assert (work / "repo" / "d-elsewhere" / "1").is_dir() and not (elsewhere / "repository").exists()

    models = run(["models"], elsewhere, **on_fleet)
    assert models.returncode == 0, models.stderr
    assert "d-elsewhere" in models.stdout and "digits-mlp" in models.stdout  # the fleet's repository, all of it

    X = digits_test[0][:4]
    np.save(elsewhere / "rows.npy", X)
    inferred = run(["infer", "d-elsewhere", "--input", "rows.npy", "--output", "out.npz"], elsewhere, **on_fleet)
    assert inferred.returncode == 0, inferred.stderr
    assert "served by" in inferred.stderr and url.rsplit(":", 1)[1] != "8000"
    with np.load(elsewhere / "out.npz") as got:
        np.testing.assert_array_equal(got["label"], train_digits_mlp().predict(X))
    status = run(["status"], elsewhere, **on_fleet)
    assert status.returncode == 0 and status.stdout.splitlines()[0] == "fleet cli-test", status.stderr


def test_custom_ops_build_and_serve_in_every_precision_only_where_trusted(foreground_fleet, tmp_path):
    """A model with onnxruntime-extensions' NegPos built with `fleet build --custom-ops` on the running
    local fleet in every precision, served over HTTP, answering as ONNX Runtime does with the library."""
    work, url, config, _ = foreground_fleet
    library = extensions_library()
    source, calib = make_custom_op_mlp(tmp_path / "custom.onnx"), calibration_data(tmp_path / "calib.npz")
    on_fleet = {"RAY_ADDRESS": f"127.0.0.1:{yaml.safe_load(config.read_text())['ray_port']}"}
    for name, precision in (("float32", "float32"), ("float16", "float16"), ("int8c", "int8_calib"), ("int8", "int8"),
                            ("untrusted", "float32")):
        args = ["build", str(source), "--name", f"custom-op-{name}", "--precision", precision, "--config", str(config)]
        args += ["--calib-data", str(calib), "--calib-method", "minmax"] if precision == "int8_calib" else []
        args += [] if name == "float16" else ["--custom-ops", library]
        built = run(args, tmp_path, timeout=300, **on_fleet)
        assert built.returncode == 0, built.stderr
        assert "built on" in built.stderr and "custom ops:" in built.stderr, built.stderr
    rows = custom_op_rows(64, seed=11)
    reference = direct(source, rows, library)
    with FleetClient(url) as client:
        for name, precision in (("float32", "float32"), ("float16", "float16"), ("int8c", "int8"), ("int8", "int8")):
            numbers = within_precision(precision, reference, client.infer(f"custom-op-{name}", {"input": rows})["logits"])
            print(f"local fleet {name}: {numbers}")
        with pytest.raises(Exception, match=r"models\.custom-op-untrusted\.trusted_sha256"):
            client.infer("custom-op-untrusted", {"input": rows})
        builds = {b["model"]: b for b in client.status()["builds"]}
    assert builds["custom-op-float32"]["custom_ops_trusted"] is True and builds["custom-op-untrusted"]["custom_ops_trusted"] is False
    models = run(["models"], tmp_path, **on_fleet)
    lines = {line.split()[0]: line for line in models.stdout.split("custom ops (")[1].splitlines()[1:]}
    assert "NOT trusted" in lines["custom-op-untrusted"] and lines["custom-op-int8"].rstrip().endswith("trusted")


def test_without_a_fleet_the_url_is_not_guessed(tmp_path):
    np.save(tmp_path / "rows.npy", np.zeros((1, 64), np.float32))
    result = run(["infer", "digits-mlp", "--input", "rows.npy"], tmp_path, RAY_ADDRESS="127.0.0.1:9")
    assert result.returncode == 2 and "--url" in result.stderr, result.stderr
    assert "cannot reach Ray's GCS at 127.0.0.1:9" in result.stderr  # named, not a local guess


def test_errors_are_clear_and_exit_nonzero(foreground_fleet):
    work, url, _, _ = foreground_fleet
    np.save(work / "bad.npy", np.zeros((1, 3), np.float32))
    result = run(["infer", "digits-mlp", "--input", str(work / "bad.npy"), "--url", url], work)
    assert result.returncode == 2 and "dimension 1 is 3, expected 64" in result.stderr
    result = run(["status", "--url", "http://127.0.0.1:9"], work)
    assert result.returncode == 2 and "cannot reach the fleet" in result.stderr


def test_ctrl_c_shuts_everything_down(foreground_fleet):
    work, url, _, proc = foreground_fleet
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(90) == 0
    assert "stopped" in (work / "up.log").read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/v2/health/live", timeout=2)


def test_fleet_down_elsewhere_ends_a_foreground_fleet_up_within_seconds(tmp_path):
    """`fleet down` in another terminal: `fleet up --foreground` notices and exits, without the minute
    and more that Serve's app deletion spent retrying against a Ray that was gone."""
    config = tmp_path / "fleet.yaml"
    config.write_text(f"name: cli-down\nrepository: {tmp_path / 'repo'}\nport: {free_port()}\nray_port: {free_port()}\n"
                      f"dashboard_port: {free_port()}\ngrpc_port: {free_port()}\ncpu_budget: 1GiB\n")
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen(FLEET + ["up", "--config", str(config), "--foreground"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=checkout_env())
    try:
        deadline = time.monotonic() + 240
        while "serving; press Ctrl-C" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        down = run(["down"], tmp_path, timeout=180)
        assert down.returncode == 0, down.stderr
        t0 = time.monotonic()
        assert proc.wait(30) == 0
        waited = time.monotonic() - t0
        print(f"\nfleet up --foreground exited {waited:.1f} s after `fleet down` returned")
        assert waited < 10 and "the fleet is gone" in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

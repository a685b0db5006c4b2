"""`fleet build` with every precision mode, end to end on this machine (no Ray)."""

import json

import numpy as np
import pytest

from cluster.cli import main as fleet
from cluster.demo import digits_split
from cluster.repository import Repository


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    X_train, X_test, _, y_test = digits_split()
    d = tmp_path_factory.mktemp("data")
    np.savez(d / "train.npz", input=X_train)
    np.savez(d / "test.npz", input=X_test, labels=y_test)
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_models, digits_data):
    """digits-mlp at float32, float16 and int8 (after int8_calib on the training split)."""
    repo = tmp_path_factory.mktemp("repo")
    common = ["--local", "--repository", str(repo), "--eval-data", str(digits_data / "test.npz")]
    src = str(demo_models["digits-mlp"])
    assert fleet(["build", src, "--name", "digits-mlp", *common]) == 0
    assert fleet(["build", src, "--name", "digits-mlp-fp16", "--precision", "float16", *common]) == 0
    assert fleet(["build", src, "--name", "digits-mlp-int8", "--precision", "int8_calib",
                  "--calib-data", str(digits_data / "train.npz"), *common]) == 0
    return Repository(repo)


def accuracy(repo, model):
    (art,) = repo.artifacts(model)
    return art.manifest


def test_float16_keeps_test_accuracy_within_half_a_point(built):
    fp32, fp16 = accuracy(built, "digits-mlp"), accuracy(built, "digits-mlp-fp16")
    assert fp16.precision == "float16"
    assert fp32.accuracy["test_accuracy"] > 0.95
    assert abs(fp16.accuracy["test_accuracy"] - fp32.accuracy["test_accuracy"]) <= 0.005
    assert fp16.accuracy["rel_l2_error"] <= 1e-2 and fp16.accuracy["check"]["passed"]


def test_int8_after_calibration_within_one_point(built):
    fp32, int8 = accuracy(built, "digits-mlp"), accuracy(built, "digits-mlp-int8")
    assert int8.precision == "int8"
    assert abs(int8.accuracy["test_accuracy"] - fp32.accuracy["test_accuracy"]) <= 0.01
    assert int8.accuracy["top1_agreement"] >= 0.97
    assert int8.build_options["calibration"].endswith("-entropy")
    # the calibration is stored by source sha256: ranges, Q/DQ model, TensorRT cache
    (cal,) = (built.root / "_calibration").iterdir()
    assert cal.name.startswith(int8.source_sha256)
    assert {p.name for p in cal.iterdir()} == {"ranges.json", "model.qdq.onnx", "calibration.cache"}
    assert (cal / "calibration.cache").read_text().startswith("TRT-")


def test_int8_reuses_the_stored_calibration_under_another_name(built, demo_models, digits_data):
    assert fleet(["build", str(demo_models["digits-mlp"]), "--name", "digits-mlp-int8b", "--precision", "int8", "--local",
                  "--repository", str(built.root), "--eval-data", str(digits_data / "test.npz")]) == 0
    assert accuracy(built, "digits-mlp-int8b").artifact_sha256 == accuracy(built, "digits-mlp-int8").artifact_sha256


def test_fleet_models_shows_the_numbers(built, capsys):
    assert fleet(["models", "--repository", str(built.root)]) == 0
    out = capsys.readouterr().out
    for model in ("digits-mlp ", "digits-mlp-fp16", "digits-mlp-int8"):
        line = next(line for line in out.splitlines() if line.startswith(model))
        assert "test_accuracy=0.9" in line
    assert fleet(["models", "--repository", str(built.root), "--json"]) == 0
    assert all("accuracy" in m for m in json.loads(capsys.readouterr().out))


def test_cnn_small_float16_rel_l2(tmp_path, demo_models):
    assert fleet(["build", str(demo_models["cnn-small"]), "--name", "cnn-fp16", "--precision", "float16", "--local",
                  "--repository", str(tmp_path)]) == 0
    m = accuracy(Repository(tmp_path), "cnn-fp16")
    assert m.accuracy["rel_l2_error"] <= 1e-2 and m.accuracy["eval_data"] == "synthetic"


def test_int8_without_calibration_says_what_to_run(tmp_path, demo_models, capsys):
    assert fleet(["build", str(demo_models["cnn-small"]), "--name", "cnn-int8", "--precision", "int8", "--local",
                  "--repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run `fleet build" in err and "--precision int8_calib" in err
    assert not Repository(tmp_path).artifacts()


def test_calibration_data_of_the_wrong_shape_names_input_and_shapes(tmp_path, demo_models, capsys):
    np.savez(tmp_path / "bad.npz", input=np.zeros((10, 63), np.float32))
    assert fleet(["build", str(demo_models["digits-mlp"]), "--name", "x", "--precision", "int8_calib", "--local",
                  "--calib-data", str(tmp_path / "bad.npz"), "--repository", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'input'" in err and "[10, 63]" in err and "[-1, 64]" in err


def test_accuracy_threshold_fails_the_build_unless_accepted(tmp_path, demo_models, digits_data, capsys):
    # calibrate on garbage (all zeros): the int8 model is far from float32
    np.savez(tmp_path / "zeros.npz", input=np.zeros((64, 64), np.float32))
    args = ["build", str(demo_models["digits-mlp"]), "--name", "bad-int8", "--precision", "int8_calib", "--local",
            "--calib-data", str(tmp_path / "zeros.npz"), "--calib-method", "minmax",
            "--eval-data", str(digits_data / "test.npz"), "--repository", str(tmp_path / "r")]
    assert fleet(args) == 1
    assert "loses too much accuracy" in capsys.readouterr().err
    assert not Repository(tmp_path / "r").artifacts()
    assert fleet(args + ["--accept-accuracy-loss"]) == 0
    assert accuracy(Repository(tmp_path / "r"), "bad-int8").accuracy["check"]["accepted_loss"] is True

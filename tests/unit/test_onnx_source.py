"""`fleet build` of a file that is not ONNX, or of a model with operators no runtime has: a clear
error naming the file, every failing node and operator and what to do; exit 2, no traceback."""

import onnx
import pytest
from onnx import TensorProto, helper

from cluster.cli import main as fleet
from workers.build import BuildRequest, build_artifact
from workers.errors import BuildError
from workers.onnx_source import UnsupportedOperators, check_source

from cluster.buildfarm import local_target


def fancy_model(path):
    """Relu, then two operators of a domain nobody registered, one inside an If branch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inner_out = helper.make_tensor_value_info("b2", TensorProto.FLOAT, ["N", 4])
    branch = helper.make_graph([helper.make_node("OtherOp", ["a"], ["b2"], name="hidden", domain="com.example")],
                               "branch", [], [inner_out])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("MyFancyOp", ["a"], ["b"], name="fancy", domain="com.example"),
             helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch, else_branch=branch)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [cond]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, path)
    return path


def test_a_file_that_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "weights.onnx"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert fleet(["build", str(bad), "--name", "m", "--local", "--repository", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "weights.onnx is not an ONNX model" in err and "Traceback" not in err


def test_every_failing_node_is_named_with_what_to_do(tmp_path, capsys):
    path = fancy_model(tmp_path / "fancy.onnx")
    assert fleet(["build", str(path), "--name", "m", "--local", "--repository", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "fancy.onnx has 3 node(s) whose operators ONNX Runtime does not have" in err  # the branch: twice
    assert "node 1 'fancy' (operator com.example::MyFancyOp)" in err
    assert "'hidden' (operator com.example::OtherOp)" in err  # found inside the If's branch too
    assert "--custom-ops" in err and "fallback: onnxruntime" in err and "Traceback" not in err


def test_the_same_answer_from_every_build_path(tmp_path):
    """What the CLI says is what a build on a worker says (the build farm, Triton imports)."""
    path = fancy_model(tmp_path / "fancy.onnx")
    with pytest.raises(UnsupportedOperators, match="MyFancyOp") as direct:
        check_source(path)
    with pytest.raises(BuildError) as built:
        build_artifact(BuildRequest(str(path), "m", local_target()), tmp_path / "out")
    assert built.value.message == direct.value.message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_library_that_provides_the_operators_lets_it_through(tmp_path):
    path = fancy_model(tmp_path / "fancy.onnx")
    assert check_source(path, extra_operators=[("com.example", "MyFancyOp"), ("com.example", "OtherOp")])

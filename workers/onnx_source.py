"""Checking a source model before anything is built from it: is it ONNX, and can ONNX Runtime run every node?

ONNX Runtime names only the first operator it lacks, deep in a load ("com.example:MyFancyOp(-1)
is not a registered function/op"); a user needs every failing node at once, and what to do
about them. Operators come from ONNX Runtime's own registry (the ONNX standard, ai.onnx.ml and
Microsoft's contrib domains), the model's local functions, and the custom-op libraries given
with the build.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from workers.custom_ops import provided_operators
from workers.errors import BuildError

_DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_LISTED = 20


class UnsupportedOperators(BuildError):
    """The model has nodes whose operators no runtime of the fleet has; the message names each."""


@dataclass(frozen=True)
class FailingNode:
    index: int
    name: str
    domain: str
    op_type: str

    def describe(self) -> str:
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        return f"node {self.index} '{self.name or '?'}' (operator {op})"


def load_source(path: str | Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` (its external data not loaded); BuildError when it is not one."""
    path = Path(path)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ValueError ... all mean the same to the user
        raise BuildError(
            f"{path.name} is not an ONNX model ({type(exc).__name__}: {str(exc).strip() or 'protobuf parsing failed'}); "
            f"give the .onnx file your framework exported (torch.onnx.export, tf2onnx, skl2onnx, ...)"
        ) from None


def _known_operators() -> set[tuple[str, str]]:
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    return {(_domain(s.domain), s.name) for s in get_all_operator_schema()}


def _domain(domain: str) -> str:
    return "" if domain in _DEFAULT_DOMAINS else domain


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def failing_nodes(model: onnx.ModelProto, extra_operators: Iterable[tuple[str, str]] = ()) -> list[FailingNode]:
    """Nodes whose (domain, operator) neither ONNX Runtime, the model's functions nor ``extra_operators`` have."""
    known = _known_operators() | {(_domain(f.domain), f.name) for f in model.functions}
    known |= {(_domain(d), op) for d, op in extra_operators}
    return [FailingNode(i, node.name, node.domain, node.op_type) for i, node in enumerate(_nodes(model.graph))
            if (_domain(node.domain), node.op_type) not in known]


def custom_domains(model: onnx.ModelProto) -> set[str]:
    return {node.domain for node in _nodes(model.graph) if _domain(node.domain) not in ("", "ai.onnx.ml", "com.microsoft")}


def check_source(path: str | Path, extra_operators: Iterable[tuple[str, str]] = (),
                 custom_ops: Sequence[str] = ()) -> onnx.ModelProto:
    """The model, when it is ONNX and every node can run (with the custom-op libraries at the paths
    ``custom_ops``); else a BuildError that says what to do."""
    model = load_source(path)
    failing = failing_nodes(model, extra_operators)
    if failing and custom_ops:
        provided = provided_operators(model, {(n.domain, n.op_type) for n in failing}, custom_ops)
        failing = [n for n in failing if (n.domain, n.op_type) not in provided]
    if not failing:
        return model
    name = Path(path).name
    listed = [f"  - {n.describe()}" for n in failing[:MAX_LISTED]]
    if len(failing) > MAX_LISTED:
        listed.append(f"  - ... and {len(failing) - MAX_LISTED} more")
    ops = sorted({f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in failing})
    given = f" and the custom-op libraries given ({', '.join(Path(p).name for p in custom_ops)}) do not provide" \
        if custom_ops else ""
    raise UnsupportedOperators("\n".join([
        f"{name} has {len(failing)} node(s) whose operators ONNX Runtime does not have{given} ({', '.join(ops)}):",
        *listed,
        "What you can do:",
        "  - export the model again with operators ONNX Runtime has (another opset, or the layer written "
        "with standard operators);",
        "  - give the library that implements them: fleet build ... --custom-ops LIB.so (ONNX Runtime custom "
        "ops; TensorRT plugins for TensorRT targets);",
        "  - for a TensorRT target whose parser lacks an operator ONNX Runtime has, set `fallback: onnxruntime` "
        "in the model's config.",
    ]))

"""The real call signatures, properties and enum values of one TensorRT binding wheel.

Read from tests/data/trt_signatures/<label>.txt (made by
scripts/extract_trt_signatures.py from each real binding wheel: pybind11's own
docstrings), so that the fake TensorRT refuses what the real module refuses:

- a call that matches no overload (too many or too few arguments, an unknown or
  positional-only keyword, a float or a Path where TensorRT takes an int or a str, an
  object of another TensorRT class or enum) raises TypeError, as pybind11 does;
- assigning a read-only property, or a method, raises AttributeError;
- enum members carry the real values (TensorRT 11 renumbered BuilderFlag,
  NetworkDefinitionCreationFlag and TacticSource).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNATURES_DIR = Path(__file__).resolve().parent.parent / "data" / "trt_signatures"
_INT_TYPES = {"int", "typing.SupportsInt"}
_STR_TYPES = {"str"}


class MissingRecord(AssertionError):
    """The code reached a TensorRT name whose signature was never extracted: the fake cannot judge the call."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    default: str | None  # the default's text; None when the parameter is required
    positional_only: bool
    keyword_only: bool


@dataclass(frozen=True)
class Signature:
    text: str  # as the docstring has it, e.g. "create_network(self: Builder, flags: int = 0) -> INetworkDefinition"
    params: tuple[Parameter, ...]  # without self

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any], accepts: Callable[[str, Any], bool]) -> list[Any] | None:
        """The arguments in parameter order (defaults filled where a later one is given), or None when they do not fit."""
        if len(args) > len(self.params):
            return None
        bound: dict[str, Any] = {}
        for param, value in zip(self.params, args):
            if param.keyword_only:
                return None
            bound[param.name] = value
        for name, value in kwargs.items():
            named = next((p for p in self.params if p.name == name and not p.positional_only), None)
            if named is None or name in bound:
                return None
            bound[name] = value
        if any(p.default is None and p.name not in bound for p in self.params):
            return None
        if not all(accepts(p.type, bound[p.name]) for p in self.params if p.name in bound):
            return None
        given = [i for i, p in enumerate(self.params) if p.name in bound]
        last = given[-1] if given else -1
        return [bound[p.name] if p.name in bound else _literal(p.default) for p in self.params[: last + 1]]


@dataclass
class SignatureTable:
    label: str
    methods: dict[str, list[Signature]]  # "Runtime.deserialize_cuda_engine" -> its overloads
    properties: dict[str, bool]  # "Runtime.engine_host_code_allowed" -> settable
    enums: dict[str, dict[str, int]]  # "BuilderFlag" -> {"FP16": 0, ...}

    def missing(self, name: str) -> MissingRecord:
        return MissingRecord(
            f"no signature of {name} recorded in {SIGNATURES_DIR.name}/{self.label}.txt: declare the name in "
            f"workers/engines/tensorrt/names.py and run scripts/extract_trt_signatures.py"
        )

    def kind(self, name: str) -> str:
        """'method', 'settable' or 'read-only' (a property); MissingRecord when unknown."""
        if name in self.methods:
            return "method"
        if name in self.properties:
            return "settable" if self.properties[name] else "read-only"
        raise self.missing(name)

    def enum_value(self, owner: str, member: str) -> int:
        if owner not in self.enums:
            raise self.missing(f"{owner}.{member}")
        return self.enums[owner][member]

    def bind(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], accepts: Callable[[str, Any], bool]) -> list[Any]:
        """The arguments of a call to ``name`` as the first matching overload orders them; TypeError as pybind11 when none matches."""
        if name not in self.methods:
            raise self.missing(name)
        overloads = self.methods[name]
        for signature in overloads:
            bound = signature.bind(args, kwargs, accepts)
            if bound is not None:
                return bound
        short = name.rsplit(".", 1)[-1]
        what = "constructor" if short == "__init__" else "function"
        supported = "\n".join(f"    {i}. {s.text}" for i, s in enumerate(overloads, 1))
        invoked = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        raise TypeError(
            f"{short}(): incompatible {what} arguments. The following argument types are supported:\n"
            f"{supported}\n\nInvoked with: {invoked} ({self.label})"
        )


def scalar_accepts(type_text: str, value: Any) -> bool | None:
    """pybind11's int and str casters; None for the types they do not decide."""
    if type_text in _INT_TYPES:  # refuses floats (and str) even when converting
        return not isinstance(value, (float, str, bytes)) and (
            isinstance(value, int) or hasattr(type(value), "__index__") or hasattr(type(value), "__int__")
        )
    if type_text in _STR_TYPES:  # str or bytes only: a pathlib.Path is refused
        return isinstance(value, (str, bytes))
    return None


def load_signatures(label: str) -> SignatureTable:
    lines = (SIGNATURES_DIR / f"{label}.txt").read_text().splitlines()
    table = SignatureTable(label, {}, {}, {})
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        if match := re.fullmatch(r"([\w.]+): property, (settable|read-only)", line):
            table.properties[match.group(1)] = match.group(2) == "settable"
        elif match := re.fullmatch(r"([\w.]+)\.(\w+) = (-?\d+)", line):
            table.enums.setdefault(match.group(1), {})[match.group(2)] = int(match.group(3))
        else:
            name, signature = parse_signature(line)
            table.methods.setdefault(name, []).append(signature)
    return table


def parse_signature(line: str) -> tuple[str, Signature]:
    """('Builder.create_network', Signature) of 'Builder.create_network(self: Builder, flags: int = 0) -> ...'."""
    name, _, rest = line.partition("(")
    depth, end = 1, 0
    for end, char in enumerate(rest):
        depth += char in "([<"
        depth -= char in ")]>"
        if depth == 0:
            break
    params: list[Parameter] = []
    keyword_only = False
    for part in _split_top_level(rest[:end]):
        if part == "*":
            keyword_only = True
            continue
        if part == "/":
            params = [Parameter(p.name, p.type, p.default, True, False) for p in params]
            continue
        head, _, default = part.partition(" = ")
        pname, _, ptype = head.partition(": ")
        if pname.startswith("*"):
            raise ValueError(f"variadic parameter in {line!r}: the fake cannot check it")
        # pybind11 names arguments it was given no py::arg for arg0, arg1 ...: positional only.
        params.append(Parameter(pname, ptype.strip(), default or None, bool(re.fullmatch(r"arg\d+", pname)), keyword_only))
    if "." in name and params and params[0].name == "self":
        params = params[1:]
    short = name.rsplit(".", 1)[-1]
    return name, Signature(f"{short}({rest}", tuple(params))


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([<"
        depth -= char in ")]>"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _literal(text: str | None) -> Any:
    """A default's value where it is a Python literal (0, None, True); the text itself otherwise."""
    try:
        return ast.literal_eval(text or "None")
    except (ValueError, SyntaxError):
        return text

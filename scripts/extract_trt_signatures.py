#!/usr/bin/env python3
"""Extract the call signatures, properties and enum values of the TensorRT names the backend uses.

The fake TensorRT (tests/unit/fake_tensorrt.py) enforces these: a call with the wrong
number of arguments or an unknown keyword raises TypeError, assigning a read-only
property AttributeError, and enum members carry the real values, as on the real
module. The source is the real binding wheel of each version, loaded the way
scripts/extract_trt_names.py loads it (against stub TensorRT libraries; module init
calls none of them), so the signatures are pybind11's own docstrings.

What is recorded, for every name ``workers/engines/tensorrt/names.py`` declares for
that version path, plus the enums the fake hands out values of:

    Runtime.__init__(self: Runtime, logger: ILogger) -> None      a call signature; one line per overload
    ICudaEngine.num_io_tensors: property, read-only               or: property, settable
    BuilderFlag.FP16 = 0                                          an enum member and its value

Module prefixes (``tensorrt_bindings.tensorrt.``) are left out of the signatures.

Usage (needs ``pip``, ``gcc`` and ``nm``, like extract_trt_names.py):

    python scripts/extract_trt_signatures.py                  # all known versions
    python scripts/extract_trt_signatures.py --only 8.6.1     # one
    python scripts/extract_trt_signatures.py --wheel-dir DIR  # reuse downloaded wheels
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "tests" / "data" / "trt_signatures"
# Enums whose members the fake hands out (tensor types, parser error codes) without
# the backend naming a member.
HANDED_OUT_ENUMS = ("DataType", "ErrorCode", "TensorIOMode")

# Runs in a fresh interpreter; argv[1] is JSON [stub libraries, sys.path entry or "",
# package, declared names, handed-out enums]. Prints JSON {"version", "records"}.
_WALKER = r"""
import ctypes, inspect, json, re, sys
stubs, root, package, declared, handed_out = json.loads(sys.argv[1])
for stub in stubs:
    ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)
if root:
    sys.path.insert(0, root)
module = __import__(package)
PREFIX = re.compile(r"\btensorrt(?:_lean)?(?:_bindings)?\.(?:tensorrt(?:_lean)?\.)?")

def resolve(dotted):
    owner, value = None, module
    for part in dotted.split("."):
        owner, value = value, getattr(value, part)
    return owner, value

def is_enum(value):
    return inspect.isclass(value) and isinstance(getattr(value, "__members__", None), dict)

def signatures(dotted, value):
    if inspect.isfunction(value):  # a Python function of the package (nptype)
        return [f"{dotted}{inspect.signature(value)}"]
    owner, _, short = dotted.rpartition(".")
    lines = (value.__doc__ or "").splitlines()
    if len(lines) > 1 and lines[1].strip() == "Overloaded function.":
        found = [m.group(1) for m in (re.match(rf"\d+\. ({re.escape(short)}\(.*)$", line) for line in lines) if m]
    else:
        found = lines[:1] if lines and lines[0].startswith(short + "(") else []
    if not found:
        raise SystemExit(f"{dotted}: no signature in its docstring: {value.__doc__!r:.200}")
    return [(owner + "." if owner else "") + PREFIX.sub("", text) for text in found]

records, enums = [], set(handed_out)
for dotted in sorted(declared):
    if dotted == "__version__":
        continue
    owner, value = resolve(dotted)
    parts = dotted.split(".")
    enums.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if is_enum(resolve(".".join(parts[:i]))[1]))
    if is_enum(value) or is_enum(owner):
        continue  # members recorded below
    if inspect.isclass(value):
        records += signatures(f"{dotted}.__init__", value.__init__)
        continue
    static = inspect.getattr_static(owner, parts[-1]) if inspect.isclass(owner) else None
    if isinstance(static, property):
        records.append(f"{dotted}: property, {'settable' if static.fset is not None else 'read-only'}")
    elif callable(value):
        records += signatures(dotted, value)
for enum in sorted(enums):
    try:
        members = resolve(enum)[1].__members__
    except AttributeError:
        continue  # a handed-out enum this version lacks (the lean runtime has no parser)
    records += [f"{enum}.{name} = {int(member)}" for name, member in members.items()]
print(json.dumps({"version": getattr(module, "__version__", "?"), "records": records}))
"""


def _load_script(name: str) -> ModuleType:
    """A sibling script as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def declared_names(label: str) -> list[str]:
    """What names.py declares for the version path of ``label`` ('lean-11.4.0.106' -> (11, True))."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from workers.engines.tensorrt.names import NAMES_USED

    lean = label.startswith("lean-")
    major = int(label.removeprefix("lean-").split(".")[0])
    return sorted(NAMES_USED[(major, lean)])


def walk(stubs: list[str], root: str, package: str, names: list[str]) -> tuple[str, list[str]]:
    """(version, records) of ``package`` imported in a fresh interpreter.

    From a wheel (``root`` set): isolated from site-packages, so nothing installed here
    leaks in. Without ``root``: the installed package (tests compare it with the data).
    """
    argument = json.dumps([stubs, root, package, names, list(HANDED_OUT_ENUMS)])
    isolation = ["-I", "-S"] if root else []
    result = subprocess.run(
        [sys.executable, *isolation, "-c", _WALKER, argument], check=True, capture_output=True, text=True, timeout=120
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return data["version"], data["records"]


def main() -> int:
    names_script = _load_script("extract_trt_names")
    args, chosen = names_script.command_line(__doc__, OUT_DIR)
    for wheel, wheel_file, work in names_script.each_wheel(chosen, args.wheel_dir, "trt-signatures-"):
        root, stubs = names_script.unpack(wheel, wheel_file, work)
        version, records = walk(stubs, str(root), wheel.package, declared_names(wheel.label))
        header = [
            f"TensorRT Python binding signatures: {version}",
            f"wheel: {wheel_file.name} (pip download --no-deps {wheel.requirement})",
            "extracted by scripts/extract_trt_signatures.py: pybind11 docstring signatures, properties",
            "(settable or read-only) and enum values of the names workers/engines/tensorrt/names.py",
            "declares for this version path; read by tests/unit/fake_tensorrt.py.",
            names_script.extraction_stamp(),
        ]
        path = names_script.write_data_file(args.out, wheel.label, header, records)
        print(f"{wheel.label}: {len(records)} records -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

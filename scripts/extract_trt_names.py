#!/usr/bin/env python3
"""Extract the names each published TensorRT Python binding wheel exports.

TensorRT cannot be installed on our machines (its libraries are not shipped for
them), but the binding wheels are on PyPI: a pybind11 extension that needs only
``libnvinfer*.so`` to load. Its module initialisation calls no TensorRT function,
so we load it against stub libraries that carry the right sonames and define the
handful of C entry points it imports (``createInferBuilder_INTERNAL`` and friends,
each returning NULL, never called), then walk the real module with ``dir()``.
What we record is exactly what ``import tensorrt`` would expose on that version.

Output, one file per version under ``tests/data/trt_names/``: a commented header
saying how it was made, then sorted names, one a line:

    Builder                      (module level)
    Builder.create_network       (class attribute: method, property, enum member)
    ILogger.Severity.ERROR       (attribute of a nested class)

Usage (needs ``pip``, ``gcc`` and ``nm``; runs in a few seconds per wheel):

    python scripts/extract_trt_names.py                  # all known versions
    python scripts/extract_trt_names.py --only 8.6.1     # one
    python scripts/extract_trt_names.py --wheel-dir DIR  # reuse downloaded wheels
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "tests" / "data" / "trt_names"


@dataclass(frozen=True)
class BindingWheel:
    label: str  # the data file's stem
    requirement: str  # what `pip download` fetches
    package: str  # the importable package inside the wheel
    note: str = ""


_SAME_AS_CU13 = "tensorrt-cu13-bindings of this version exported exactly the same names (compared 2026-11-22)."

WHEELS = (
    BindingWheel(
        "8.6.1",
        "tensorrt-bindings==8.6.1",
        "tensorrt_bindings",
        "TensorRT 8.6 shipped one bindings wheel for CUDA 11 and 12 (no -cuXX suffix).",
    ),
    BindingWheel("10.16.1.11", "tensorrt-cu12-bindings==10.16.1.11", "tensorrt_bindings", _SAME_AS_CU13),
    BindingWheel("11.4.0.106", "tensorrt-cu12-bindings==11.4.0.106", "tensorrt_bindings", _SAME_AS_CU13),
    BindingWheel(
        "lean-8.6.1",
        "tensorrt-lean-bindings==8.6.1",
        "tensorrt_lean_bindings",
        "The lean runtime (module tensorrt_lean): deserialize and execute only.",
    ),
    BindingWheel(
        "lean-10.16.1.11",
        "tensorrt-lean-cu12-bindings==10.16.1.11",
        "tensorrt_lean_bindings",
        "The lean runtime (module tensorrt_lean): deserialize and execute only.",
    ),
    BindingWheel(
        "lean-11.4.0.106",
        "tensorrt-lean-cu12-bindings==11.4.0.106",
        "tensorrt_lean_bindings",
        "The lean runtime (module tensorrt_lean): deserialize and execute only.",
    ),
)

# Runs in a fresh interpreter without site-packages (-I -S), so nothing installed here
# (a tensorrt_libs wheel, say) leaks into the names: load the stubs, import, walk.
_WALKER = r"""
import ctypes, inspect, json, sys
stubs, wheel_root, package = json.loads(sys.argv[1])
for stub in stubs:
    ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)
sys.path.insert(0, wheel_root)
module = __import__(package)

def public(obj):
    return [n for n in dir(obj) if not n.startswith("_")]

names = {"__version__"} if hasattr(module, "__version__") else set()
for name in public(module):
    value = getattr(module, name)
    if inspect.ismodule(value):
        continue  # the package's own imports (os, sys, ctypes, its libs wheel), not TensorRT API
    names.add(name)
    if not inspect.isclass(value):
        continue
    for attr in public(value):
        names.add(f"{name}.{attr}")
        nested = getattr(value, attr, None)
        # Nested classes (ILogger.Severity, IOptimizationProfile.*): one more level.
        if inspect.isclass(nested) and nested.__module__ == value.__module__:
            names.update(f"{name}.{attr}.{inner}" for inner in public(nested))
print(json.dumps({"version": getattr(module, "__version__", "?"), "names": sorted(names)}))
"""


def download(requirement: str, into: Path) -> Path:
    """The wheel for this interpreter's CPython on x86-64 Linux (binary only)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", python, "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux2014_x86_64", "-d", str(into), requirement,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return find_wheel(requirement, into)


def find_wheel(requirement: str, directory: Path) -> Path:
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    matches = sorted(directory.glob(f"{stem}-{version}-*.whl"))
    if not matches:
        raise FileNotFoundError(f"no wheel for {requirement} in {directory}")
    return matches[0]


def nv_sonames(extension: Path) -> list[str]:
    """The TensorRT libraries the extension is linked against (its NEEDED entries)."""
    out = subprocess.run(["readelf", "-d", str(extension)], check=True, capture_output=True, text=True).stdout
    return [so for so in re.findall(r"Shared library: \[(.+?)\]", out) if so.startswith("libnv")]


def missing_symbols(extension: Path) -> list[str]:
    """Undefined symbols that nothing already in this process provides (TensorRT's)."""
    out = subprocess.run(
        ["nm", "-D", "--undefined-only", str(extension)], check=True, capture_output=True, text=True
    ).stdout
    process = ctypes.CDLL(None)  # libc, libpython, ... in the global scope
    missing = []
    for line in out.splitlines():
        kind, _, symbol = line.strip().partition(" ")
        if kind != "U" or "@" in symbol or hasattr(process, symbol):
            continue
        missing.append(symbol)
    return missing


def build_stubs(extension: Path, work: Path) -> list[str]:
    """One stub library per needed soname; the first defines every missing symbol."""
    source = work / "stub.c"
    body = "".join(f"void *{symbol}(void) {{ return 0; }}\n" for symbol in missing_symbols(extension))
    source.write_text("/* TensorRT entry points, never called while listing names. */\n" + body)
    empty = work / "empty.c"
    empty.write_text("/* empty */\n")
    stubs = []
    for index, soname in enumerate(nv_sonames(extension)):
        target = work / soname
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(target), f"-Wl,-soname,{soname}",
             str(source if index == 0 else empty)],
            check=True,
        )
        stubs.append(str(target))
    return stubs


def unpack(wheel: BindingWheel, wheel_file: Path, work: Path) -> tuple[Path, list[str]]:
    """The wheel unpacked under ``work`` (the folder to import it from) and stub libraries for its extension."""
    root = work / wheel.label
    with zipfile.ZipFile(wheel_file) as archive:
        archive.extractall(root)
    extensions = sorted((root / wheel.package).glob("*.so"))
    if len(extensions) != 1:
        raise RuntimeError(f"{wheel_file.name}: expected one extension in {wheel.package}/, found {extensions}")
    return root, build_stubs(extensions[0], root)


def extract(wheel: BindingWheel, wheel_file: Path, work: Path) -> tuple[str, list[str]]:
    root, stubs = unpack(wheel, wheel_file, work)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _WALKER, json.dumps([stubs, str(root), wheel.package])],
        check=True, capture_output=True, text=True,
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return data["version"], data["names"]


def extraction_stamp() -> str:
    return f"extracted: {_dt.date.today().isoformat()} with Python {sys.version.split()[0]}"


def write_data_file(out_dir: Path, label: str, header: list[str], lines: list[str]) -> Path:
    """``out_dir/<label>.txt``: the header as '# ' comment lines, then one line per entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{label}.txt"
    path.write_text("".join(f"# {line}\n" for line in header) + "".join(f"{line}\n" for line in lines))
    return path


def write_names(wheel: BindingWheel, wheel_file: Path, version: str, names: list[str], out_dir: Path) -> Path:
    header = [
        f"TensorRT Python binding names: {wheel.package} {version}",
        f"wheel: {wheel_file.name} (pip download --no-deps {wheel.requirement})",
        "extracted by scripts/extract_trt_names.py: the wheel's pybind11 extension loaded",
        "against stub libnvinfer*/libnvonnxparser* sonames (TensorRT's libraries are not",
        "installable here; module init calls none of them), then walked with dir():",
        "module names, Class.attr, Class.Nested.attr (module-valued names such as os,",
        "sys or the plugin submodule left out).",
        extraction_stamp(),
    ]
    if wheel.note:
        header.append(wheel.note)
    return write_data_file(out_dir, wheel.label, header, names)


def command_line(description: str, out_dir: Path) -> tuple[argparse.Namespace, list[BindingWheel]]:
    """The options shared with extract_trt_signatures.py, and the wheels they choose."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out_dir)
    parser.add_argument("--wheel-dir", type=Path, help="use (or download into) this directory")
    parser.add_argument("--only", action="append", help="label to extract (repeatable): " + ", ".join(w.label for w in WHEELS))
    args = parser.parse_args()
    chosen = [w for w in WHEELS if not args.only or w.label in args.only]
    if not chosen:
        parser.error(f"no wheel labelled {args.only}")
    return args, chosen


def each_wheel(chosen: list[BindingWheel], wheel_dir: Path | None, prefix: str) -> Iterator[tuple[BindingWheel, Path, Path]]:
    """(wheel, its file, a scratch folder) for each chosen wheel, downloaded unless ``wheel_dir`` has it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        wheel_dir = wheel_dir or work / "wheels"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        for wheel in chosen:
            try:
                wheel_file = find_wheel(wheel.requirement, wheel_dir)
            except FileNotFoundError:
                wheel_file = download(wheel.requirement, wheel_dir)
            yield wheel, wheel_file, work


def main() -> int:
    args, chosen = command_line(__doc__, OUT_DIR)
    for wheel, wheel_file, work in each_wheel(chosen, args.wheel_dir, "trt-names-"):
        version, names = extract(wheel, wheel_file, work)
        path = write_names(wheel, wheel_file, version, names, args.out)
        print(f"{wheel.label}: {len(names)} names -> {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Custom-op and plugin libraries: native code a model needs beyond what the runtimes have.

A model names its libraries at build time (``fleet build --custom-ops LIB.so``). Each becomes a
``CustomOpLibrary`` in the manifest: its file name, its sha256 (it travels to the hosts by
content, as artifacts do) and which runtimes take it, read from the symbols it exports
without loading it:

- ``onnxruntime``: it exports ``RegisterCustomOps`` (what ``SessionOptions.register_custom_ops_library``
  calls), e.g. onnxruntime-extensions;
- ``tensorrt``: it exports ``getCreators``/``getPluginCreators`` (``IPluginRegistry.load_library``),
  or neither entry point, as a TensorRT 8.x plugin library that registers its creators when loaded.

A library runs arbitrary code in the process that loads it: workers load one only for a model
the fleet config pins by sha256 (``models.<m>.trusted_sha256``, checked by ``workers.trust``).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from workers.errors import BuildError, IncompatibleArtifact

ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
ORT_ENTRY_POINT = "RegisterCustomOps"
TRT_ENTRY_POINTS = ("getCreators", "getPluginCreators")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CustomOpLibrary:
    """One native library a model needs, as the manifest records it."""

    file_name: str
    sha256: str
    kinds: tuple[str, ...]  # ONNXRUNTIME and/or TENSORRT

    def __post_init__(self) -> None:
        if not _FILE_NAME.match(self.file_name) or ".." in self.file_name:
            raise ValueError(f"custom-op library file name {self.file_name!r} is not a plain file name")
        if not _SHA256.match(self.sha256):
            raise ValueError(f"custom-op library {self.file_name} has no valid sha256 ({self.sha256!r})")
        unknown = set(self.kinds) - {ONNXRUNTIME, TENSORRT}
        if unknown or not self.kinds:
            raise ValueError(f"custom-op library {self.file_name}: kinds must be onnxruntime and/or tensorrt, got {self.kinds}")

    def describe(self) -> str:
        return f"{self.file_name} (sha256 {self.sha256[:12]}..., {' and '.join(self.kinds)})"

    def to_dict(self) -> dict:
        return {"file_name": self.file_name, "sha256": self.sha256, "kinds": list(self.kinds)}

    @classmethod
    def from_dict(cls, d: dict) -> "CustomOpLibrary":
        return cls(str(d["file_name"]), str(d["sha256"]), tuple(str(k) for k in d["kinds"]))


@dataclass(frozen=True)
class LibraryFile:
    """A library on this host: the verified file and what the manifest says of it."""

    path: str
    library: CustomOpLibrary


def for_backend(files: Iterable[LibraryFile], kind: str) -> tuple[str, ...]:
    """The paths of the libraries a runtime takes (``onnxruntime`` or ``tensorrt``)."""
    return tuple(f.path for f in files if kind in f.library.kinds)


def describe_library(path: str | Path) -> CustomOpLibrary:
    """The manifest's record of the library at ``path`` (read, never loaded); BuildError when it is
    not a shared library."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"custom-op library {path} does not exist")
    symbols = exported_symbols(path)
    kinds = []
    if ORT_ENTRY_POINT in symbols:
        kinds.append(ONNXRUNTIME)
    if any(s in symbols for s in TRT_ENTRY_POINTS) or not kinds:
        kinds.append(TENSORRT)
    return CustomOpLibrary(path.name, hashlib.sha256(path.read_bytes()).hexdigest(), tuple(kinds))


def exported_symbols(path: str | Path) -> set[str]:
    """Names of the functions and objects a 64-bit little-endian ELF shared library defines in its
    dynamic symbol table. Read from the file: loading it would run its code."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"custom-op library {path.name} is not a 64-bit little-endian ELF shared library (.so)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link]
        str_offset = strtab[4]
        for start in range(offset, offset + size, entsize or 24):
            st_name, _, _, st_shndx = struct.unpack_from("<IBBH", data, start)
            if st_shndx == 0 or st_name == 0:
                continue  # undefined: imported from elsewhere
            end = data.index(b"\0", str_offset + st_name)
            names.add(data[str_offset + st_name:end].decode(errors="replace"))
    return names


def session_options(custom_ops: Sequence[str] = ()) -> ort.SessionOptions:
    """ONNX Runtime session options with the custom-op libraries registered (each one is loaded
    here; it stays loaded while these options, or a session made with them, live)."""
    options = ort.SessionOptions()
    for library in custom_ops:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:  # ONNX Runtime raises its own Fail/RuntimeError types here
            raise IncompatibleArtifact(f"ONNX Runtime could not load the custom-op library {Path(library).name}: {exc}") from exc
    return options


def provided_operators(model: onnx.ModelProto, wanted: Iterable[tuple[str, str]], custom_ops: Sequence[str]) -> set[tuple[str, str]]:
    """Of the (domain, operator) pairs ``wanted``, those the libraries register with ONNX Runtime.

    ONNX Runtime lists no library's operators, so each is probed: a one-node model of it, with the
    model's opsets. "not a registered function/op" means no library has it; any other outcome
    (it loads, or its inputs' types do not fit) means one does."""
    if not custom_ops:
        return set()
    options = session_options(custom_ops)
    options.log_severity_level = 4
    found = set()
    for domain, op_type in sorted(set(wanted)):
        node = onnx.helper.make_node(op_type, ["x"], ["y"], domain=domain)
        graph = onnx.helper.make_graph([node], "probe", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
        probe = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        probe.ir_version = model.ir_version or onnx.IR_VERSION
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - only the "not registered" kind of failure matters here
            if "is not a registered function/op" in str(exc):
                continue
        found.add((domain, op_type))
    return found

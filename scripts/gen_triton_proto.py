"""Regenerate workers/kserve/proto/*_pb2.py from the vendored Triton .proto files.

The .proto files (and their BSD licence, LICENSE beside them) are Triton's, from the
triton-inference-server/common repository (protobuf/). The generated modules are checked
in, so installing the project needs no code generator. Run this after updating the
.proto files:

    python -m venv /tmp/genvenv && /tmp/genvenv/bin/pip install grpcio-tools==1.85.1
    /tmp/genvenv/bin/python scripts/gen_triton_proto.py

grpcio-tools 1.85.1 carries protoc 35.1: its code needs protobuf >= 7.35 at run time,
which Ray 2.60 brings (grpcio-reflection 1.85 needs protobuf 7).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "workers" / "kserve" / "proto"
PACKAGE = "workers.kserve.proto"


def main() -> int:
    from grpc_tools import protoc

    files = ["model_config.proto", "grpc_service.proto"]
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={PROTO_DIR}", *(str(PROTO_DIR / f) for f in files)])
    if code != 0:
        print(f"protoc failed with {code}", file=sys.stderr)
        return code
    for name in files:
        path = PROTO_DIR / name.replace(".proto", "_pb2.py")
        text = path.read_text()
        # protoc writes a top-level import of the dependency: make it the package's own
        text = re.sub(r"^import model_config_pb2 as", f"from {PACKAGE} import model_config_pb2 as", text,
                      flags=re.MULTILINE)
        # the package's own descriptor pool, not protobuf's default one: tritonclient registers
        # the same file names there, perhaps from another version of the .proto files
        text = text.replace("_descriptor_pool.Default().AddSerializedFile(", "POOL.AddSerializedFile(")
        text = text.replace("# @@protoc_insertion_point(imports)", f"# @@protoc_insertion_point(imports)\nfrom {PACKAGE} import POOL")
        path.write_text(text)
    print(f"generated {', '.join(f.replace('.proto', '_pb2.py') for f in files)} in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton's protocol messages: ``model_config.proto`` and ``grpc_service.proto`` (KServe v2 gRPC).

Vendored from triton-inference-server/common (``protobuf/``, BSD licence in ``LICENSE``
here) with the code protoc generated from them (``scripts/gen_triton_proto.py``): the
fleet needs no code generator and no ``tritonclient`` to serve gRPC. The messages live
in this package's own descriptor pool, so that they never clash with the same files
that ``tritonclient.grpc`` registers in protobuf's default pool.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

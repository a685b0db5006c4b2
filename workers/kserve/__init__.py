"""KServe v2 / Open Inference Protocol, shared by every entry point.

- ``codec``: request bodies -> ``InferRequest``, outputs -> response bodies (the
  server's direction);
- ``client_codec``: the other direction, for the Python client and tools;
- ``shm_io``: tensors that lie in registered system shared memory regions;
- ``handler``: ``handle_infer``, the one infer handler the worker's own endpoint and
  the Serve ingress both run, and ``error_answer``, the one error body.

Knows nothing about web frameworks: bytes and headers in, bytes and headers out.
"""

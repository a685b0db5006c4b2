"""Triton model repositories: serving one as it is (``importer``), writing one (``export``).

``mapping`` reads ``config.pbtxt`` with Triton's own message and says what the fleet serves of
it (pure); ``source`` reads a repository from a directory or a URI; ``reshape`` serves an ONNX
model with the inputs and outputs its configuration declares; ``commands`` are the CLI's.
"""

"""TLS for the fleet's clients: whom to trust, and (mutual TLS) which certificate to show.

One description serves every transport: ``requests`` (``verify``/``cert``), aiohttp (an
``ssl.SSLContext``) and gRPC (channel credentials). From the environment for the CLI:
``FLEET_TLS_CA`` (a CA bundle, PEM), ``FLEET_TLS_CERT`` and ``FLEET_TLS_KEY``.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientTls:
    ca: str | None = None  # CA certificates to trust (PEM); None: the system's
    cert: str | None = None  # this client's certificate (PEM), for mutual TLS
    key: str | None = None  # its private key (PEM)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("ClientTls: cert and key go together")

    @classmethod
    def from_env(cls) -> "ClientTls | None":
        env = os.environ
        ca, cert, key = env.get("FLEET_TLS_CA") or None, env.get("FLEET_TLS_CERT") or None, env.get("FLEET_TLS_KEY") or None
        return cls(ca, cert, key) if (ca or cert or key) else None

    def requests_options(self) -> dict:
        return {"verify": self.ca or True, "cert": (self.cert, self.key) if self.cert else None}

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def grpc_credentials(self):
        import grpc

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

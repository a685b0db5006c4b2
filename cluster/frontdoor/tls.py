"""The front door's TLS material: read and checked once, on the head, before anything starts.

HAProxy takes the certificate chain and the key in one PEM file (``bind ... ssl crt``); the
client CA for mutual TLS in another (``ca-file ... verify required``). Both are read here,
checked with Python's ssl (a key that does not match its certificate, a file that is not
PEM: a clear error naming the file), and handed to the front door as bytes, which it writes
into its private directory (mode 600).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from workers.errors import InvalidConfig

from cluster.config import TlsOptions


@dataclass(frozen=True)
class TlsMaterial:
    pem: bytes  # the certificate chain, then the private key
    client_ca: bytes | None = None  # with it, clients must present a certificate it signed

    def write(self, directory: Path) -> tuple[str, str | None]:
        """Write the files HAProxy reads into ``directory``; returns (crt path, ca-file path or None)."""
        crt = directory / "tls.pem"
        crt.touch(mode=0o600)
        crt.write_bytes(self.pem)
        ca = None
        if self.client_ca is not None:
            ca = directory / "client-ca.pem"
            ca.write_bytes(self.client_ca)
        return str(crt), (str(ca) if ca else None)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"tls.{what}: cannot read {path}: {exc.strerror or exc}") from None


def read_tls(options: TlsOptions) -> TlsMaterial | None:
    """The PEM bytes for the front door, checked; None when TLS is off."""
    if not options.enabled:
        return None
    assert options.cert and options.key
    cert, key = _read(options.cert, "cert"), _read(options.key, "key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(options.cert, options.key)
    except ssl.SSLError as exc:
        raise InvalidConfig(f"tls.cert {options.cert} and tls.key {options.key} do not make a usable pair "
                            f"(a key of another certificate, or not PEM): {exc.reason or exc}") from None
    ca = None
    if options.client_ca:
        ca = _read(options.client_ca, "client_ca")
        try:
            context.load_verify_locations(cafile=options.client_ca)
        except ssl.SSLError as exc:
            raise InvalidConfig(f"tls.client_ca {options.client_ca} holds no usable CA certificate (PEM): "
                                f"{exc.reason or exc}") from None
    return TlsMaterial(cert.rstrip(b"\n") + b"\n" + key, ca)

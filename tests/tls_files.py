"""A throwaway certificate authority and a loopback server certificate on
disk, for the tests that run trivnc with real TLS (imported as a plain
module, as fuzz_harness is)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def issue(directory: Path, ca: trustme.CA | None = None) -> TlsFiles:
    """cert.pem and key.pem in `directory` for 127.0.0.1 and localhost,
    signed by `ca` (a new one by default)."""
    ca = ca if ca is not None else trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return TlsFiles(ca, cert, key)

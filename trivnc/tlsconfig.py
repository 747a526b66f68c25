# TLS for the web port (and VeNCrypt): trivnc's state directory, a self-signed
# certificate made on first run and kept there, and the server SSLContext.
from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import write_atomically

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "ensure_self_signed",
    "server_ssl_context",
    "state_dir",
]

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
_VALIDITY = dt.timedelta(days=3650)
# Replace a kept certificate this long before it expires, so a server started
# today does not stop working next week.
_RENEW_BEFORE = dt.timedelta(days=30)


def state_dir() -> Path:
    """$XDG_STATE_HOME/trivnc, or ~/.local/state/trivnc; created mode 0700."""
    base = os.environ.get("XDG_STATE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    path = root / "trivnc"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _host_names() -> list[str]:
    names = ["localhost"]
    with contextlib.suppress(OSError):
        host = socket.gethostname()
        # A SAN DNS name must be ASCII; an odd host name is left out rather
        # than making the certificate unusable.
        if host and host.isascii() and " " not in host and host not in names:
            names.append(host)
    return names


def _cert_is_usable(cert_path: Path, key_path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc - _RENEW_BEFORE:
        return False
    # A certificate whose key was replaced on its own would fail every handshake.
    return cert.public_key() == key.public_key()


def _write_private(path: Path, data: bytes, mode: int) -> None:
    write_atomically(path, data, mode)


def ensure_self_signed(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in `directory`: kept from an earlier run if they
    are still valid and belong together, else made now: an EC P-256 key and a
    certificate for CN=trivnc, valid for about ten years, naming localhost,
    127.0.0.1, ::1 and this host's name. The key file is mode 0600."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if _cert_is_usable(cert_path, key_path):
        return cert_path, key_path

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trivnc")])
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in _host_names()]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    # Backdated a little so a client whose clock is slightly behind accepts it.
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # A self-signed leaf: trusting it must not let it sign other certificates.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a crash in between leaves a mismatched pair, which the next
    # run detects and replaces, never a certificate without its key.
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def server_ssl_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    *,
    alpn_protocols: Sequence[str] | None = None,
) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later with the ssl module's default
    (forward-secret, AEAD) ciphers, no compression, no client certificates.
    Pass `alpn_protocols` (e.g. ["h2", "http/1.1"]) for an HTTP server."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    if alpn_protocols:
        ctx.set_alpn_protocols(list(alpn_protocols))
    return ctx

# VNC password files as TigerVNC's `vncpasswd` and x11vnc's `-storepasswd`
# write them: the password, truncated or NUL-padded to 8 bytes, DES-encrypted
# with a fixed key known to every VNC implementation. This is obfuscation, not
# protection: the file must be readable by its owner only.
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from ..files import write_atomically

_FIXED_KEY = bytes((23, 82, 107, 6, 35, 78, 88, 7))


def _cipher() -> Cipher[modes.ECB]:
    return Cipher(TripleDES(_FIXED_KEY * 3), modes.ECB())


def read_vnc_password_file(path: str | os.PathLike[str]) -> str:
    """The password in a vncpasswd file (the first 8 bytes; the rest, if any,
    is TigerVNC's view-only password and is ignored)."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a VNC password file (under 8 bytes)")
    decryptor = _cipher().decryptor()
    plain = decryptor.update(data[:8]) + decryptor.finalize()
    return plain.rstrip(b"\0").decode("latin-1")


def write_vnc_password_file(path: str | os.PathLike[str], password: str) -> None:
    """Write a vncpasswd-compatible file, mode 0600, atomically."""
    raw = password.encode("latin-1")[:8].ljust(8, b"\0")
    encryptor = _cipher().encryptor()
    data = encryptor.update(raw) + encryptor.finalize()
    write_atomically(Path(path), data, 0o600)

# VNC Authentication (RFC 6143 section 7.2.2, with errata 4951; rfbproto "VNC
# Authentication"): the client DES-encrypts a 16-byte challenge with the
# password, truncated or NUL-padded to 8 bytes, each key byte bit-reversed.
from __future__ import annotations

import hmac

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

CHALLENGE_SIZE = 16

# Bit-reversed value of every byte: DES takes the key's parity bit as the
# lowest bit, VNC's password bytes the other way round.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def vnc_auth_key(password: str | bytes) -> bytes:
    raw = password.encode("latin-1", "replace") if isinstance(password, str) else password
    return raw[:8].ljust(8, b"\0").translate(_REVERSED)


def vnc_auth_response(password: str | bytes, challenge: bytes) -> bytes:
    """The 16 bytes a client answers `challenge` with."""
    key = vnc_auth_key(password)
    # Single DES through the decrepit TripleDES with K1 = K2 = K3, since
    # cryptography deprecates 8-byte keys.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def check_vnc_auth(password: str | bytes, challenge: bytes, response: bytes) -> bool:
    """Constant-time comparison of the client's response with the expected one."""
    return hmac.compare_digest(vnc_auth_response(password, challenge), response)

# The CopyRect encoding, RFC 6143 section 7.7.2 (rfbproto "CopyRect Encoding").
# The payload is only the source position; the client copies the pixels it
# already has. Whoever decides to send it must know that the client's copy of
# the source area is current, and must not use it inside the area of a
# non-incremental request (protocol.md B.4).
from __future__ import annotations

import struct
from typing import Final

from ..rfb.constants import Encoding
from .base import Payload

COPY_RECT: Final = Encoding.COPY_RECT

_SOURCE = struct.Struct(">HH")


def encode_copyrect(src_x: int, src_y: int) -> Payload:
    """U16 src-x-position, U16 src-y-position."""
    if not (0 <= src_x <= 0xFFFF and 0 <= src_y <= 0xFFFF):
        raise ValueError(f"CopyRect source ({src_x}, {src_y}) is outside the U16 range")
    return [_SOURCE.pack(src_x, src_y)]

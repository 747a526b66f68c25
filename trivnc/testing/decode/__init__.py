"""Independent decoders for every encoding trivnc writes, used by the test
client and by users' test suites. They decode into a BGRX framebuffer
(height, width, 4) so that results compare directly with trivnc's frames."""

from __future__ import annotations

from ...geometry import Rect
from ...rfb.constants import Encoding
from .basic import (
    decode_copyrect,
    decode_hextile,
    decode_raw,
    decode_rre,
    decode_zlib,
    decode_zrle,
)
from .reader import Needs, Truncated, read, run_on_bytes
from .tight import decode_tight
from .types import DecodeState, Framebuffer

__all__ = [
    "DecodeState",
    "Framebuffer",
    "Needs",
    "Truncated",
    "decode_rect",
    "read",
    "run_on_bytes",
]


def decode_rect(state: DecodeState, fb: Framebuffer, rect: Rect, encoding: int) -> Needs[None]:
    """Decode one rect's payload into `fb` (which must contain `rect`)."""
    if encoding == Encoding.RAW:
        yield from decode_raw(state, fb, rect)
    elif encoding == Encoding.COPY_RECT:
        yield from decode_copyrect(state, fb, rect)
    elif encoding == Encoding.RRE:
        yield from decode_rre(state, fb, rect)
    elif encoding == Encoding.HEXTILE:
        yield from decode_hextile(state, fb, rect)
    elif encoding == Encoding.ZLIB:
        yield from decode_zlib(state, fb, rect)
    elif encoding == Encoding.ZRLE:
        yield from decode_zrle(state, fb, rect)
    elif encoding == Encoding.TIGHT:
        yield from decode_tight(state, fb, rect, png=False)
    elif encoding == Encoding.TIGHT_PNG:
        yield from decode_tight(state, fb, rect, png=True)
    else:
        raise ValueError(f"no decoder for encoding {encoding}")

# The Raw encoding, RFC 6143 section 7.7.1 (rfbproto "Raw Encoding"). Every client
# must understand it, so it is the encoding of last resort and the baseline
# that the other encoders' sizes are measured against.
from __future__ import annotations

from ..rfb.constants import Encoding
from ..rfb.pixelformat import PixelFormat
from .base import Payload, Pixels


class RawEncoder:
    """width x height PIXELs in row order. Stateless: one instance may serve
    every connection."""

    encoding = Encoding.RAW

    def encode(self, pixels: Pixels, pf: PixelFormat) -> Payload:
        # encode_pixels returns a contiguous array, so tobytes() is one copy.
        return [pf.encode_pixels(pixels).tobytes()]

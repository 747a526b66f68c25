# The interface every rectangle encoder implements. Encoders are pure: numpy
# pixels in (a BGRX view of the rect, shape (h, w, 4), uint8, possibly a strided
# view into a larger frame), payload bytes out. The rect header (x, y, w, h,
# encoding) is written by the protocol layer, not here. Encoders that keep
# zlib streams (Zlib, ZRLE, Tight) are objects owned by one connection; the
# rest are stateless and may be shared between connections.
from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..rfb.pixelformat import PixelFormat

Pixels = npt.NDArray[np.uint8]
Payload = list[bytes]


class RectEncoder(Protocol):
    """Encodes one rectangle of pixels for one client pixel format."""

    @property
    def encoding(self) -> int:
        """The encoding number written in the rect header."""
        ...

    def encode(self, pixels: Pixels, pf: PixelFormat) -> Payload:
        """Return the rect's payload, as chunks that are sent back to back."""
        ...

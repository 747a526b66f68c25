from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ...rfb.pixelformat import BGRX, PixelFormat

#: The client's picture of the desktop: BGRX, shape (height, width, 4), uint8.
Framebuffer = npt.NDArray[np.uint8]


def _tight_streams() -> list[zlib._Decompress]:
    return [zlib.decompressobj() for _ in range(4)]


@dataclass
class DecodeState:
    """What a decoding client keeps between rects: its pixel format and the
    zlib streams that Zlib, ZRLE and Tight continue across rects."""

    pf: PixelFormat = BGRX
    zlib_stream: zlib._Decompress = field(default_factory=zlib.decompressobj)
    zrle_stream: zlib._Decompress = field(default_factory=zlib.decompressobj)
    tight_streams: list[zlib._Decompress] = field(default_factory=_tight_streams)
    #: Draw JPEG and WebP images smaller than their rect stretched over it,
    #: as KasmVNC's web client does (video-mode scaling).
    scale_images: bool = False
    #: Images drawn stretched so, counted for tests.
    scaled_rects: int = 0
    #: Tight rects that carried a JPEG/WebP (lossy) payload, counted for tests.
    lossy_rects: int = 0
    #: Tight sub-encodings seen, by name ("fill", "jpeg", "palette", ...).
    tight_kinds: dict[str, int] = field(default_factory=dict)

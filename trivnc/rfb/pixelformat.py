# PIXEL_FORMAT (RFC 6143 section 7.4) and the conversion of trivnc's internal
# frame, BGRX bytes in memory (X11's 32 bpp little-endian ZPixmap, depth 24),
# into whatever true-colour format a client sets with SetPixelFormat.
#
# Conversion is vectorised with numpy. The common cases, 32 bpp with 8-bit
# channels at byte-aligned shifts (what every browser and most viewers ask
# for), are a byte shuffle; everything else goes through integer arithmetic.
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import RemoteProtocolError

U8Array = npt.NDArray[np.uint8]
#: Pixel values; numpy's stubs type uint32 arithmetic loosely, hence integer.
Values = npt.NDArray[np.integer[Any]]

_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")


@dataclass(frozen=True)
class PixelFormat:
    """A client's pixel format. Validated at construction (colour maps refused)."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    def __post_init__(self) -> None:
        if self.bits_per_pixel not in (8, 16, 32):
            raise RemoteProtocolError(f"unsupported bits-per-pixel {self.bits_per_pixel}")
        if not self.true_colour:
            raise RemoteProtocolError(
                "colour-map pixel formats are not supported; use a true-colour format"
            )
        for name in ("red", "green", "blue"):
            cmax: int = getattr(self, f"{name}_max")
            shift: int = getattr(self, f"{name}_shift")
            if cmax == 0 or cmax & (cmax + 1):
                raise RemoteProtocolError(f"{name}-max {cmax} is not 2**n - 1")
            if shift + cmax.bit_length() > self.bits_per_pixel:
                raise RemoteProtocolError(
                    f"{name} channel (max {cmax}, shift {shift}) does not fit "
                    f"in {self.bits_per_pixel} bits"
                )

    # -- wire form -------------------------------------------------------------

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        """Parse the 16-byte PIXEL_FORMAT; raises RemoteProtocolError if invalid."""
        bpp, depth, be, tc, rmax, gmax, bmax, rs, gs, bs = _PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rs, gs, bs)

    def pack(self) -> bytes:
        return _PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )

    # -- properties used by encoders ---------------------------------------------

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    @cached_property
    def _dtype(self) -> np.dtype[np.unsignedinteger]:
        order = ">" if self.big_endian else "<"
        return np.dtype(f"{order}u{self.bytes_per_pixel}")

    @cached_property
    def _byte_shuffle(self) -> tuple[int, int, int, int] | None:
        """For 32 bpp with 8-bit channels at byte shifts: which BGRX byte lands
        at each output byte (3 = the zero pad), else None."""
        if self.bits_per_pixel != 32:
            return None
        if (self.red_max, self.green_max, self.blue_max) != (255, 255, 255):
            return None
        shifts = (self.blue_shift, self.green_shift, self.red_shift)  # BGRX channel order
        if any(s % 8 for s in shifts) or len(set(shifts)) != 3:
            return None
        out = [3, 3, 3, 3]
        for channel, shift in enumerate(shifts):
            byte = shift // 8
            out[3 - byte if self.big_endian else byte] = channel
        return (out[0], out[1], out[2], out[3])

    @cached_property
    def is_rgb888(self) -> bool:
        """True colour, 32 bpp, depth 24, 8 bits per channel: Tight's 3-byte
        TPIXEL and ZRLE's 3-byte CPIXEL apply."""
        return (
            self.bits_per_pixel == 32
            and self.depth == 24
            and (self.red_max, self.green_max, self.blue_max) == (255, 255, 255)
        )

    # -- conversion ------------------------------------------------------------

    def pixel_values(self, bgrx: U8Array) -> Values:
        """Each pixel's numeric value in this format, shape (h, w), uint32."""
        b = bgrx[..., 0].astype(np.uint32)
        g = bgrx[..., 1].astype(np.uint32)
        r = bgrx[..., 2].astype(np.uint32)
        value = _scale_down(r, self.red_max) << self.red_shift
        value |= _scale_down(g, self.green_max) << self.green_shift
        value |= _scale_down(b, self.blue_max) << self.blue_shift
        return value

    def encode_pixels(self, bgrx: U8Array) -> U8Array:
        """BGRX pixels (h, w, 4) -> wire pixels (h, w, bytes_per_pixel), contiguous."""
        shuffle = self._byte_shuffle
        if shuffle is not None:
            if shuffle == (0, 1, 2, 3):
                # The internal format itself: the pad byte is "unused bits",
                # which clients ignore, so no copy unless the view is strided.
                return np.ascontiguousarray(bgrx)
            padded = np.zeros((*bgrx.shape[:2], 4), np.uint8)
            for dst, src in enumerate(shuffle):
                if src != 3:
                    padded[..., dst] = bgrx[..., src]
            return padded
        values = self.pixel_values(bgrx).astype(self._dtype)
        return values.view(np.uint8).reshape(bgrx.shape[0], bgrx.shape[1], self.bytes_per_pixel)

    def decode_values(
        self, wire: bytes | U8Array, height: int, width: int
    ) -> npt.NDArray[np.uint32]:
        """Wire pixels -> numeric pixel values, shape (height, width)."""
        flat = (
            np.frombuffer(wire, self._dtype)
            if isinstance(wire, bytes)
            else (np.ascontiguousarray(wire).reshape(-1).view(self._dtype))
        )
        return flat.reshape(height, width).astype(np.uint32)

    def values_to_bgrx(self, values: Values) -> U8Array:
        """Numeric pixel values -> BGRX with channels scaled back to 8 bits."""
        out = np.zeros((*values.shape, 4), np.uint8)
        out[..., 2] = _scale_up((values >> self.red_shift) & self.red_max, self.red_max)
        out[..., 1] = _scale_up((values >> self.green_shift) & self.green_max, self.green_max)
        out[..., 0] = _scale_up((values >> self.blue_shift) & self.blue_max, self.blue_max)
        return out

    def decode_pixels(self, wire: bytes | U8Array, height: int, width: int) -> U8Array:
        """Wire pixels -> BGRX (height, width, 4)."""
        return self.values_to_bgrx(self.decode_values(wire, height, width))


def _scale_down(channel: Values, cmax: int) -> Values:
    if cmax == 255:
        return channel
    return (channel * cmax + 127) // 255


def _scale_up(channel: Values, cmax: int) -> U8Array:
    if cmax == 255:
        return channel.astype(np.uint8)
    return ((channel * 255 + cmax // 2) // cmax).astype(np.uint8)


#: trivnc's internal format: BGRX in memory, as X11 delivers depth-24 pixels.
BGRX = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)
#: What noVNC, vncdotool and vncsnapshot ask for: RGBX in memory.
RGBX = PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)
RGB565 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
BGR233 = PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)

# Decoders for the standard encodings: RFC 6143 sections 7.7.1 Raw, 7.7.2
# CopyRect, 7.7.3 RRE, 7.7.4 Hextile, 7.7.6 ZRLE, and rfbproto "zlib Encoding".
#
# They are written from the spec text, not from trivnc's encoders, and they
# are strict: anything the spec forbids or leaves undefined (a Hextile tile
# that leans on a background or foreground that may not be carried over, a
# subrect outside its tile, an unused ZRLE subencoding, a run past the end of
# a tile, leftover bytes) raises RemoteProtocolError. A round trip through
# them therefore checks an encoder against the protocol, not only against
# itself. Speed is secondary: runs are walked in Python.
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ...geometry import Rect
from ...rfb.constants import HextileMask
from ...rfb.errors import RemoteProtocolError
from ...rfb.pixelformat import PixelFormat
from .reader import Needs, read, read_u8, read_u32
from .types import DecodeState, Framebuffer

#: Called with each tile's rect (framebuffer coordinates) and its subencoding
#: byte (Hextile mask, ZRLE subencoding), for tests that check encoder choices.
TileHook = Callable[[Rect, int], None]

Pixel = npt.NDArray[np.uint8]


def _check_inside(fb: Framebuffer, rect: Rect, what: str) -> None:
    height, width = fb.shape[:2]
    if rect.x < 0 or rect.y < 0 or rect.right > width or rect.bottom > height:
        raise RemoteProtocolError(f"{what} {rect} is outside the {width}x{height} framebuffer")


class _PixelCache:
    """PIXEL bytes -> BGRX, memoised: RRE and Hextile repeat a few colours."""

    def __init__(self, pf: PixelFormat) -> None:
        self.pf = pf
        self._seen: dict[bytes, Pixel] = {}

    def __call__(self, wire: bytes) -> Pixel:
        pixel = self._seen.get(wire)
        if pixel is None:
            pixel = self.pf.decode_pixels(wire, 1, 1)[0, 0]
            self._seen[wire] = pixel
        return pixel


# -- Raw, CopyRect ----------------------------------------------------------------


def decode_raw(state: DecodeState, fb: Framebuffer, rect: Rect) -> Needs[None]:
    _check_inside(fb, rect, "Raw rect")
    pf = state.pf
    data = yield from read(rect.w * rect.h * pf.bytes_per_pixel)
    fb[rect.slices()] = pf.decode_pixels(data, rect.h, rect.w)


def decode_copyrect(state: DecodeState, fb: Framebuffer, rect: Rect) -> Needs[None]:
    _check_inside(fb, rect, "CopyRect destination")
    src_x, src_y = struct.unpack(">HH", (yield from read(4)))
    src = Rect(src_x, src_y, rect.w, rect.h)
    _check_inside(fb, src, "CopyRect source")
    # The areas may overlap (scrolling): copy out before writing.
    fb[rect.slices()] = fb[src.slices()].copy()


# -- RRE ------------------------------------------------------------------------


def decode_rre(state: DecodeState, fb: Framebuffer, rect: Rect) -> Needs[None]:
    _check_inside(fb, rect, "RRE rect")
    bpp = state.pf.bytes_per_pixel
    pixel = _PixelCache(state.pf)
    nsub = yield from read_u32()
    background = yield from read(bpp)
    area = fb[rect.slices()]
    area[...] = pixel(background)
    # Each subrect is read as it comes: nothing is allocated from nsub.
    for _ in range(nsub):
        data = yield from read(bpp + 8)
        x, y, w, h = struct.unpack(">HHHH", data[bpp:])
        if x + w > rect.w or y + h > rect.h:
            raise RemoteProtocolError(
                f"RRE subrect {(x, y, w, h)} outside a {rect.w}x{rect.h} rect"
            )
        area[y : y + h, x : x + w] = pixel(data[:bpp])


# -- Hextile --------------------------------------------------------------------

# A plain int: `~` of an IntFlag keeps only defined bits, which is 0 here.
_HEXTILE_KNOWN = int(
    HextileMask.RAW
    | HextileMask.BACKGROUND_SPECIFIED
    | HextileMask.FOREGROUND_SPECIFIED
    | HextileMask.ANY_SUBRECTS
    | HextileMask.SUBRECTS_COLOURED
)


def decode_hextile(
    state: DecodeState, fb: Framebuffer, rect: Rect, *, on_tile: TileHook | None = None
) -> Needs[None]:
    _check_inside(fb, rect, "Hextile rect")
    pf = state.pf
    bpp = pf.bytes_per_pixel
    pixel = _PixelCache(pf)
    # None = "may not be used": at the start of the rect, after a raw tile,
    # and (foreground only) after a tile with SubrectsColoured set.
    background: Pixel | None = None
    foreground: Pixel | None = None
    for ty in range(0, rect.h, 16):
        th = min(16, rect.h - ty)
        for tx in range(0, rect.w, 16):
            tw = min(16, rect.w - tx)
            tile = fb[rect.y + ty : rect.y + ty + th, rect.x + tx : rect.x + tx + tw]
            mask = yield from read_u8()
            if on_tile is not None:
                on_tile(Rect(rect.x + tx, rect.y + ty, tw, th), mask)
            if mask & HextileMask.RAW:
                data = yield from read(tw * th * bpp)
                tile[...] = pf.decode_pixels(data, th, tw)
                background = foreground = None
                continue
            if mask & ~_HEXTILE_KNOWN:
                raise RemoteProtocolError(f"Hextile mask {mask:#x} has unknown bits")
            if mask & HextileMask.BACKGROUND_SPECIFIED:
                background = pixel((yield from read(bpp)))
            elif background is None:
                raise RemoteProtocolError(
                    "Hextile tile without BackgroundSpecified has no background to carry over"
                )
            coloured = bool(mask & HextileMask.SUBRECTS_COLOURED)
            if mask & HextileMask.FOREGROUND_SPECIFIED:
                if coloured:
                    raise RemoteProtocolError(
                        "Hextile ForegroundSpecified and SubrectsColoured are both set"
                    )
                foreground = pixel((yield from read(bpp)))
            tile[...] = background
            if mask & HextileMask.ANY_SUBRECTS:
                count = yield from read_u8()
                if coloured:
                    mono = background  # unused: each subrect brings its colour
                elif foreground is None:
                    raise RemoteProtocolError(
                        "Hextile subrects in the foreground colour, but no foreground may be "
                        "carried over"
                    )
                else:
                    mono = foreground
                size = bpp + 2 if coloured else 2
                data = yield from read(count * size)
                for i in range(count):
                    sub = data[i * size : (i + 1) * size]
                    colour = pixel(sub[:bpp]) if coloured else mono
                    xy, wh = sub[-2], sub[-1]
                    x, y, w, h = xy >> 4, xy & 15, (wh >> 4) + 1, (wh & 15) + 1
                    if x + w > tw or y + h > th:
                        raise RemoteProtocolError(
                            f"Hextile subrect {(x, y, w, h)} outside a {tw}x{th} tile"
                        )
                    tile[y : y + h, x : x + w] = colour
            if coloured:
                foreground = None


# -- zlib -----------------------------------------------------------------------


def _inflate(stream: zlib._Decompress, data: bytes, limit: int, what: str) -> bytes:
    """One rect's worth of a persistent stream, refusing more than `limit`."""
    if stream.eof:
        raise RemoteProtocolError(f"{what} zlib stream was finished by an earlier rect")
    try:
        out = stream.decompress(data, limit)
        # At the limit, the rest of the input may be only the sync-flush
        # marker; anything that inflates to more bytes is too much.
        while stream.unconsumed_tail:
            if stream.decompress(stream.unconsumed_tail, 1):
                raise RemoteProtocolError(f"{what} data inflates to more than {limit} bytes")
    except zlib.error as exc:
        raise RemoteProtocolError(f"{what} zlib data is corrupt: {exc}") from exc
    if stream.eof:
        raise RemoteProtocolError(f"{what} rect ended the persistent zlib stream")
    return out


def _compressed_bound(size: int) -> int:
    """More than deflate can expand `size` bytes to, even stored, plus flushes."""
    return size + size // 100 + 4096


def decode_zlib(state: DecodeState, fb: Framebuffer, rect: Rect) -> Needs[None]:
    _check_inside(fb, rect, "zlib rect")
    pf = state.pf
    expected = rect.w * rect.h * pf.bytes_per_pixel
    length = yield from read_u32()
    if length > _compressed_bound(expected):
        raise RemoteProtocolError(f"zlib rect of {length} bytes for {expected} bytes of pixels")
    raw = _inflate(state.zlib_stream, (yield from read(length)), expected, "zlib")
    if len(raw) != expected:
        raise RemoteProtocolError(f"zlib rect inflated to {len(raw)} bytes, not {expected}")
    fb[rect.slices()] = pf.decode_pixels(raw, rect.h, rect.w)


# -- ZRLE -----------------------------------------------------------------------


class _CPixels:
    """RFC 6143 7.7.6 CPIXEL: three bytes when true colour, 32 bpp, depth <= 24
    and the colour bits fit in the three least significant bytes (preferred)
    or the three most significant ones; else a whole PIXEL."""

    def __init__(self, pf: PixelFormat) -> None:
        self.pf = pf
        used = (
            (pf.red_max << pf.red_shift)
            | (pf.green_max << pf.green_shift)
            | (pf.blue_max << pf.blue_shift)
        )
        self.shift = 0
        self.size = pf.bytes_per_pixel
        if pf.true_colour and pf.bits_per_pixel == 32 and pf.depth <= 24:
            if used <= 0xFFFFFF:
                self.size = 3
            elif used & 0xFF == 0:
                self.size, self.shift = 3, 8

    def to_bgrx(self, data: bytes) -> Pixel:
        """n CPIXELs -> (n, 4) BGRX."""
        if self.size != 3:
            pixels: Pixel = self.pf.decode_pixels(data, 1, len(data) // self.size)[0]
            return pixels
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.uint32)
        # The three bytes keep the wire's byte order.
        if self.pf.big_endian:
            value = (b[:, 0] << 16) | (b[:, 1] << 8) | b[:, 2]
        else:
            value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return self.pf.values_to_bgrx(value << self.shift)


class _Cursor:
    """Reads the inflated ZRLE tile stream; running out is a protocol error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RemoteProtocolError("ZRLE data ends inside a tile")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def run_length(self) -> int:
        # One more than the sum of the bytes; 255 means another byte follows.
        length = 1
        while True:
            b = self.byte()
            length += b
            if b != 255:
                return length


def _zrle_tile(cur: _Cursor, cpix: _CPixels, sub: int, tw: int, th: int) -> Pixel:
    """One tile's pixels, (th, tw, 4) BGRX."""
    n = tw * th
    cb = cpix.size
    if sub == 0:
        return cpix.to_bgrx(cur.take(n * cb)).reshape(th, tw, 4)
    if sub == 1:
        return np.broadcast_to(cpix.to_bgrx(cur.take(cb)), (th, tw, 4))
    if 2 <= sub <= 16:
        palette = cpix.to_bgrx(cur.take(sub * cb))
        bits = 1 if sub == 2 else 2 if sub <= 4 else 4
        row_bytes = (tw * bits + 7) // 8
        packed = np.frombuffer(cur.take(row_bytes * th), np.uint8).reshape(th, row_bytes)
        # Bits MSB first; each index is `bits` consecutive bits of its row.
        flat_bits = np.unpackbits(packed, axis=1)[:, : tw * bits].reshape(th, tw, bits)
        weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
        index = (flat_bits * weights).sum(axis=2)
        if index.max() >= sub:
            raise RemoteProtocolError(f"ZRLE packed index beyond a palette of {sub}")
        indexed: Pixel = palette[index]
        return indexed
    if sub == 128:
        colours: list[bytes] = []
        lengths: list[int] = []
        left = n
        while left > 0:
            colours.append(cur.take(cb))
            lengths.append(cur.run_length())
            left -= lengths[-1]
        if left < 0:
            raise RemoteProtocolError("ZRLE plain RLE run goes past the end of its tile")
        values = cpix.to_bgrx(b"".join(colours))
        return np.repeat(values, lengths, axis=0).reshape(th, tw, 4)
    if sub >= 130:
        size = sub - 128
        palette = cpix.to_bgrx(cur.take(size * cb))
        indices: list[int] = []
        lengths = []
        left = n
        while left > 0:
            index = cur.byte()
            length = cur.run_length() if index & 128 else 1
            index &= 127
            if index >= size:
                raise RemoteProtocolError(f"ZRLE palette RLE index {index} of {size}")
            indices.append(index)
            lengths.append(length)
            left -= length
        if left < 0:
            raise RemoteProtocolError("ZRLE palette RLE run goes past the end of its tile")
        return np.repeat(palette[indices], lengths, axis=0).reshape(th, tw, 4)
    raise RemoteProtocolError(f"ZRLE subencoding {sub} is unused")


def decode_zrle(
    state: DecodeState, fb: Framebuffer, rect: Rect, *, on_tile: TileHook | None = None
) -> Needs[None]:
    _check_inside(fb, rect, "ZRLE rect")
    cpix = _CPixels(state.pf)
    ntiles = -(-rect.w // 64) * -(-rect.h // 64)
    # The largest tile stream a valid rect can have: a one-byte run length per
    # pixel in plain RLE, plus a full palette per tile. Nothing past it.
    limit = rect.w * rect.h * (cpix.size + 2) + ntiles * (1 + 127 * cpix.size)
    length = yield from read_u32()
    if length > _compressed_bound(limit):
        raise RemoteProtocolError(f"ZRLE rect of {length} bytes for a {rect.w}x{rect.h} rect")
    cur = _Cursor(_inflate(state.zrle_stream, (yield from read(length)), limit, "ZRLE"))
    for ty in range(0, rect.h, 64):
        th = min(64, rect.h - ty)
        for tx in range(0, rect.w, 64):
            tw = min(64, rect.w - tx)
            sub = cur.byte()
            if on_tile is not None:
                on_tile(Rect(rect.x + tx, rect.y + ty, tw, th), sub)
            fb[rect.y + ty : rect.y + ty + th, rect.x + tx : rect.x + tx + tw] = _zrle_tile(
                cur, cpix, sub, tw, th
            )
    if cur.pos != len(cur.data):
        raise RemoteProtocolError(f"ZRLE rect has {len(cur.data) - cur.pos} bytes after its tiles")

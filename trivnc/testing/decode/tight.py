# Decoder for Tight (rfbproto "Tight Encoding") and TightPNG (rfbproto "Tight
# PNG Encoding"), with "Tight Encoding Without Zlib" and KasmVNC's WebP (0xB0)
# and QOI (0xC0) compression types (KasmVNC TightConstants.h, noVNC
# core/decoders/tight.js).
#
# Written from the spec, not from trivnc's encoder, and strict: a palette of
# fewer than two colours, an index past the palette, zlib data that inflates
# to more or less than the rect needs, an image whose size is not the rect's,
# basic compression inside TightPNG, or PNG inside Tight all raise
# RemoteProtocolError. Image sizes are read from the headers before anything
# is decoded, so a hostile header cannot make the decoder allocate much.
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

import imagecodecs
import numpy as np
import numpy.typing as npt

from ...geometry import Rect
from ...rfb.constants import TightControl, TightFilter
from ...rfb.errors import RemoteProtocolError
from ...rfb.pixelformat import PixelFormat
from .reader import Needs, read, read_u8
from .types import DecodeState, Framebuffer

#: rfbproto: "the width of any Tight-encoded rectangle cannot exceed 2048".
MAX_WIDTH = 2048
#: Filtered data under this many bytes is sent without zlib.
MIN_TO_COMPRESS = 12

_BASIC_NO_ZLIB = 0xA  # high nibble 1010
_BASIC_NO_ZLIB_FILTER = 0xE  # high nibble 1110

_IMAGE_KINDS = frozenset({"jpeg", "png", "webp", "qoi"})

U8Array = npt.NDArray[np.uint8]


def decode_tight(state: DecodeState, fb: Framebuffer, rect: Rect, *, png: bool) -> Needs[None]:
    """Decode one Tight (png=False) or TightPNG (png=True) rect into fb."""
    height, width = fb.shape[:2]
    if rect.x < 0 or rect.y < 0 or rect.right > width or rect.bottom > height:
        raise RemoteProtocolError(f"Tight rect {rect} is outside the {width}x{height} framebuffer")
    if rect.w > MAX_WIDTH:
        raise RemoteProtocolError(f"Tight rect {rect.w} wide: at most {MAX_WIDTH} allowed")
    ctl = yield from read_u8()
    # NOTE1 of rfbproto: reset before decoding, whatever the compression type.
    for i in range(4):
        if ctl & (1 << i):
            state.tight_streams[i] = zlib.decompressobj()
    kind = ctl >> 4
    if kind == TightControl.FILL >> 4:
        out = yield from _fill(state.pf, rect)
        name = "fill"
    elif kind == TightControl.JPEG >> 4:
        if state.pf.bits_per_pixel not in (16, 32):
            raise RemoteProtocolError("Tight JPEG needs a 16 or 32 bpp pixel format")
        data = yield from _read_compact_data()
        out = _image(
            _jpeg_size(data), rect, lambda: imagecodecs.jpeg8_decode(data), "JPEG", state
        )
        name = "jpeg"
        state.lossy_rects += 1
    elif kind == TightControl.PNG >> 4 and png:
        data = yield from _read_compact_data()
        out = _image(_png_size(data), rect, lambda: imagecodecs.png_decode(data), "PNG")
        name = "png"
    elif kind == TightControl.WEBP >> 4:
        data = yield from _read_compact_data()
        out = _image(
            _webp_size(data), rect, lambda: imagecodecs.webp_decode(data), "WebP", state
        )
        name = "webp"
        state.lossy_rects += 1
    elif kind == TightControl.QOI >> 4:
        data = yield from _read_compact_data()
        out = _image(_qoi_size(data), rect, lambda: imagecodecs.qoi_decode(data), "QOI")
        name = "qoi"
    elif kind < 8 or kind in (_BASIC_NO_ZLIB, _BASIC_NO_ZLIB_FILTER):
        if png:
            raise RemoteProtocolError(f"TightPNG has no basic compression (ctl {ctl:#04x})")
        out, name = yield from _basic(state, rect, kind)
    else:
        where = "TightPNG" if png else "Tight"
        raise RemoteProtocolError(f"invalid {where} compression control {ctl:#04x}")
    if name in _IMAGE_KINDS and not state.pf.is_rgb888:
        # The client stores the image's RGB in its own format, losing bits.
        out = state.pf.values_to_bgrx(state.pf.pixel_values(out))
    state.tight_kinds[name] = state.tight_kinds.get(name, 0) + 1
    fb[rect.slices()] = out


# -- lengths and pixels ------------------------------------------------------------


def read_compact_length() -> Needs[int]:
    """1-3 bytes: 7 bits each, least significant first, 0x80 = more; the
    third byte is a full 8 bits. At most 4194303."""
    b = yield from read_u8()
    value = b & 0x7F
    if b & 0x80:
        b = yield from read_u8()
        value |= (b & 0x7F) << 7
        if b & 0x80:
            b = yield from read_u8()
            value |= b << 14
    return value


def _read_compact_data() -> Needs[bytes]:
    n = yield from read_compact_length()
    return (yield from read(n))


def _tpixel_size(pf: PixelFormat) -> int:
    # rfbproto TPIXEL: 3 bytes R, G, B for true colour 32 bpp depth 24 with
    # 8-bit channels, else a PIXEL.
    return 3 if pf.is_rgb888 else pf.bytes_per_pixel


def _tpixels_to_bgrx(pf: PixelFormat, data: bytes, h: int, w: int) -> U8Array:
    if pf.is_rgb888:
        rgb = np.frombuffer(data, np.uint8).reshape(h, w, 3)
        out = np.zeros((h, w, 4), np.uint8)
        out[..., 0] = rgb[..., 2]
        out[..., 1] = rgb[..., 1]
        out[..., 2] = rgb[..., 0]
        return out
    return pf.decode_pixels(data, h, w)


def _fill(pf: PixelFormat, rect: Rect) -> Needs[U8Array]:
    colour = _tpixels_to_bgrx(pf, (yield from read(_tpixel_size(pf))), 1, 1)
    return np.broadcast_to(colour, (rect.h, rect.w, 4))


# -- basic compression -------------------------------------------------------------


def _basic(state: DecodeState, rect: Rect, kind: int) -> Needs[tuple[U8Array, str]]:
    pf = state.pf
    if kind < 8:
        stream: int | None = kind & 0x3
        explicit = bool(kind & 0x4)
    else:
        stream, explicit = None, kind == _BASIC_NO_ZLIB_FILTER
    filter_id = (yield from read_u8()) if explicit else TightFilter.COPY
    tp = _tpixel_size(pf)
    h, w = rect.h, rect.w
    if filter_id == TightFilter.COPY:
        data = yield from _filtered_data(state, stream, w * h * tp)
        return _tpixels_to_bgrx(pf, data, h, w), "copy"
    if filter_id == TightFilter.PALETTE:
        n = (yield from read_u8()) + 1
        if n < 2:
            raise RemoteProtocolError("a Tight palette has 2 to 256 colours, got 1")
        palette = _tpixels_to_bgrx(pf, (yield from read(n * tp)), 1, n)[0]
        if n == 2:
            row = (w + 7) // 8
            bits = yield from _filtered_data(state, stream, row * h)
            packed = np.frombuffer(bits, np.uint8).reshape(h, row)
            indices = np.unpackbits(packed, axis=1)[:, :w]  # MSB = leftmost
        else:
            raw = yield from _filtered_data(state, stream, w * h)
            indices = np.frombuffer(raw, np.uint8).reshape(h, w)
            if int(indices.max()) >= n:
                raise RemoteProtocolError(f"palette index {indices.max()} of {n} colours")
        return palette[indices], "palette"
    if filter_id == TightFilter.GRADIENT:
        if pf.bits_per_pixel not in (16, 32):
            raise RemoteProtocolError("the Tight gradient filter needs 16 or 32 bpp")
        data = yield from _filtered_data(state, stream, w * h * tp)
        return _ungradient(pf, data, h, w), "gradient"
    raise RemoteProtocolError(f"unknown Tight filter {filter_id}")


def _filtered_data(state: DecodeState, stream: int | None, size: int) -> Needs[bytes]:
    """size bytes of filtered data: raw under 12 bytes, else compact length
    plus zlib data from the stream (or plain data without zlib)."""
    if size < MIN_TO_COMPRESS:
        return (yield from read(size))
    n = yield from read_compact_length()
    data = yield from read(n)
    if stream is None:
        if n != size:
            raise RemoteProtocolError(f"no-zlib Tight data of {n} bytes, expected {size}")
        return data
    inflater = state.tight_streams[stream]
    try:
        out = inflater.decompress(data, size)
        # Input may remain once `size` bytes are out (the sync-flush marker,
        # which yields nothing), and output may be pending inside zlib: ask
        # for one more byte; getting one means the rect's data ran over.
        if inflater.decompress(inflater.unconsumed_tail, 1) or inflater.unconsumed_tail:
            raise RemoteProtocolError(f"Tight zlib data inflates past {size} bytes")
    except zlib.error as exc:
        raise RemoteProtocolError(f"bad zlib data in Tight stream {stream}: {exc}") from exc
    if len(out) != size:
        raise RemoteProtocolError(f"Tight zlib data gave {len(out)} bytes, expected {size}")
    return out


def _ungradient(pf: PixelFormat, data: bytes, h: int, w: int) -> U8Array:
    """Undo rfbproto's GradientFilter: V = D + clamp(left + up - upleft) per
    component, modulo MAX + 1, with zeros outside the rect. Each anti-diagonal
    depends only on the previous ones, so it is computed in one numpy step."""
    if pf.is_rgb888:
        residual = np.frombuffer(data, np.uint8).reshape(h, w, 3).astype(np.int32)
        maxes = np.array([255, 255, 255], np.int32)
    else:
        values = pf.decode_values(data, h, w)
        shifts = (pf.red_shift, pf.green_shift, pf.blue_shift)
        maxes = np.array([pf.red_max, pf.green_max, pf.blue_max], np.int32)
        residual = np.stack(
            [((values >> shifts[c]) & int(maxes[c])).astype(np.int32) for c in range(3)], -1
        )
    v = np.zeros((h + 1, w + 1, 3), np.int32)  # row 0 and column 0: outside
    for d in range(h + w - 1):
        i = np.arange(max(0, d - w + 1), min(h, d + 1))
        j = d - i
        prediction = v[i + 1, j] + v[i, j + 1] - v[i, j]
        np.clip(prediction, 0, maxes, out=prediction)
        v[i + 1, j + 1] = (residual[i, j] + prediction) & maxes
    components = v[1:, 1:]
    if pf.is_rgb888:
        out = np.zeros((h, w, 4), np.uint8)
        out[..., 2] = components[..., 0]
        out[..., 1] = components[..., 1]
        out[..., 0] = components[..., 2]
        return out
    value = np.zeros((h, w), np.uint32)
    for c, shift in enumerate((pf.red_shift, pf.green_shift, pf.blue_shift)):
        value |= components[..., c].astype(np.uint32) << shift
    return pf.values_to_bgrx(value)


# -- image payloads ------------------------------------------------------------------


def _image(
    size: tuple[int, int],
    rect: Rect,
    decode: Callable[[], Any],
    what: str,
    stretch: DecodeState | None = None,
) -> U8Array:
    """Check the header's (width, height) against the rect, then decode and
    turn the RGB / grey image into BGRX. With `stretch` (a state whose
    scale_images is on), a smaller image is stretched over the rect."""
    scaled = stretch is not None and stretch.scale_images and size != (rect.w, rect.h)
    if scaled and 0 < size[0] <= rect.w and 0 < size[1] <= rect.h:
        assert stretch is not None
        stretch.scaled_rects += 1
        small = _image(size, Rect(0, 0, *size), decode, what)
        ys = np.arange(rect.h) * size[1] // rect.h
        xs = np.arange(rect.w) * size[0] // rect.w
        return small[ys][:, xs]
    if size != (rect.w, rect.h):
        raise RemoteProtocolError(f"{what} image is {size[0]}x{size[1]}, rect is {rect.w}x{rect.h}")
    try:
        image = np.asarray(decode())
    except Exception as exc:  # imagecodecs raises its own error per codec
        raise RemoteProtocolError(f"undecodable {what} data: {exc}") from exc
    if image.dtype != np.uint8:
        raise RemoteProtocolError(f"{what} image has {image.dtype} samples")
    if image.ndim == 2:
        image = image[..., None].repeat(3, axis=2)
    if image.shape[:2] != (rect.h, rect.w) or image.shape[2] not in (3, 4):
        raise RemoteProtocolError(f"{what} image has shape {image.shape}")
    out = np.zeros((rect.h, rect.w, 4), np.uint8)
    out[..., 0] = image[..., 2]
    out[..., 1] = image[..., 1]
    out[..., 2] = image[..., 0]
    return out


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first SOFn marker."""
    if data[:2] != b"\xff\xd8":
        raise RemoteProtocolError("JPEG data does not start with SOI")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise RemoteProtocolError("JPEG marker expected")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise RemoteProtocolError("JPEG data without a frame header")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise RemoteProtocolError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _qoi_size(data: bytes) -> tuple[int, int]:
    if len(data) < 14 + 8 or data[:4] != b"qoif":
        raise RemoteProtocolError("not a QOI file")
    width, height = struct.unpack(">II", data[4:12])
    if data[12] not in (3, 4) or data[13] not in (0, 1):
        raise RemoteProtocolError(f"QOI header channels {data[12]} colorspace {data[13]}")
    return width, height


def _webp_size(data: bytes) -> tuple[int, int]:
    """Canvas size from the RIFF container's first chunk (VP8, VP8L or VP8X)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise RemoteProtocolError("not a WebP file")
    chunk = data[12:16]
    body = data[20:]
    if chunk == b"VP8 ":
        # Frame tag (3 bytes), start code 9d 01 2a, then 14-bit width, height.
        if body[3:6] != b"\x9d\x01\x2a":
            raise RemoteProtocolError("bad VP8 start code")
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if body[0] != 0x2F:
            raise RemoteProtocolError("bad VP8L signature")
        bits = int.from_bytes(body[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
    raise RemoteProtocolError(f"unknown WebP chunk {chunk!r}")

# Server-to-client messages (RFC 6143 section 7.6; rfbproto "Server to Client
# Messages", "Pseudo-encodings"; KasmVNC SMsgWriter.cxx for the Kasm dialect).
# Small pure functions: arguments in, bytes out. Framebuffer payloads stay
# lists of chunks so JPEG and zlib output are never copied to be framed.
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from ..geometry import Rect
from .constants import (
    ClipboardFlags,
    DesktopSizeReason,
    DesktopSizeStatus,
    Encoding,
    PseudoEncoding,
    ServerMessage,
    XvpCode,
)
from .errors import LocalProtocolError
from .events import Screen
from .pixelformat import PixelFormat

_RECT = struct.Struct(">HHHHi")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
MAX_RECTS = 0xFFFE  # 0xFFFF means "until LastRect"
LAST_RECT_MARKER = 0xFFFF


def framebuffer_update_header(nrects: int | None) -> bytes:
    """FramebufferUpdate header; `None` = unknown count, ended by LastRect."""
    if nrects is None:
        nrects = LAST_RECT_MARKER
    elif not 0 <= nrects <= MAX_RECTS:
        raise LocalProtocolError(f"{nrects} rects do not fit one FramebufferUpdate")
    return bytes((ServerMessage.FRAMEBUFFER_UPDATE, 0)) + _U16.pack(nrects)


def rect_header(rect: Rect, encoding: int) -> bytes:
    x, y, w, h = rect
    if not (0 <= x <= 0xFFFF and 0 <= y <= 0xFFFF and 0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF):
        raise LocalProtocolError(f"rect {rect} out of the U16 range")
    return _RECT.pack(x, y, w, h, encoding)


def last_rect() -> bytes:
    return _RECT.pack(0, 0, 0, 0, PseudoEncoding.LAST_RECT)


# -- pseudo-rects (each returns header + data; count it as one rect) --------------


def desktop_size_rect(width: int, height: int) -> bytes:
    return rect_header(Rect(0, 0, width, height), PseudoEncoding.DESKTOP_SIZE)


def extended_desktop_size_rect(
    width: int,
    height: int,
    screens: Sequence[Screen],
    reason: DesktopSizeReason = DesktopSizeReason.SERVER,
    status: DesktopSizeStatus = DesktopSizeStatus.OK,
) -> bytes:
    """ExtendedDesktopSize: x = reason, y = status (rfbproto [L4283])."""
    if len(screens) > 255:
        raise LocalProtocolError("too many screens")
    header = _RECT.pack(reason, status, width, height, PseudoEncoding.EXTENDED_DESKTOP_SIZE)
    body = [bytes((len(screens), 0, 0, 0))]
    body += [struct.pack(">IHHHHI", s.id, s.x, s.y, s.w, s.h, s.flags) for s in screens]
    return header + b"".join(body)


def desktop_name_rect(name: str) -> bytes:
    data = name.encode()
    return _RECT.pack(0, 0, 0, 0, PseudoEncoding.DESKTOP_NAME) + _U32.pack(len(data)) + data


def empty_pseudo_rect(encoding: int) -> bytes:
    """Confirmation of QEMU extended keys (-258), ExtendedMouseButtons (-316)
    and similar capabilities: a rect with no data."""
    return _RECT.pack(0, 0, 0, 0, encoding)


def led_state_rect(state: int) -> bytes:
    return _RECT.pack(0, 0, 0, 0, PseudoEncoding.QEMU_LED_STATE) + bytes((state & 7,))


def cursor_rect(pf: PixelFormat, hotspot: tuple[int, int], bgra: npt.NDArray[np.uint8]) -> bytes:
    """Cursor pseudo-encoding (RFC 6143 section 7.8.1): pixels in the client's
    format plus a 1-bit mask (alpha >= 128), MSB first, rows padded to bytes."""
    h, w = bgra.shape[:2]
    header = rect_header(Rect(hotspot[0], hotspot[1], w, h), PseudoEncoding.CURSOR)
    if w == 0 or h == 0:
        return header
    pixels = pf.encode_pixels(bgra).tobytes()
    mask = np.packbits(bgra[..., 3] >= 128, axis=1).tobytes()
    return header + pixels + mask


def alpha_cursor_rect(hotspot: tuple[int, int], rgba_premultiplied: npt.NDArray[np.uint8]) -> bytes:
    """Cursor With Alpha (-314) with Raw data: RGBA, premultiplied, 4 bytes per pixel."""
    h, w = rgba_premultiplied.shape[:2]
    header = rect_header(Rect(hotspot[0], hotspot[1], w, h), PseudoEncoding.CURSOR_WITH_ALPHA)
    return (
        header
        + struct.pack(">i", Encoding.RAW)
        + np.ascontiguousarray(rgba_premultiplied).tobytes()
    )


def vmware_alpha_cursor_rect(hotspot: tuple[int, int], rgba: npt.NDArray[np.uint8]) -> bytes:
    """VMware cursor, type 1 (alpha): U8 type, U8 pad, then w*h RGBA."""
    h, w = rgba.shape[:2]
    header = rect_header(Rect(hotspot[0], hotspot[1], w, h), PseudoEncoding.VMWARE_CURSOR)
    return header + b"\x01\x00" + np.ascontiguousarray(rgba).tobytes()


def copy_rect(rect: Rect, src_x: int, src_y: int) -> bytes:
    return rect_header(rect, Encoding.COPY_RECT) + _U16.pack(src_x) + _U16.pack(src_y)


# -- other messages ---------------------------------------------------------------


def bell() -> bytes:
    return bytes((ServerMessage.BELL,))


def server_cut_text(text: str) -> bytes:
    """Old-style ServerCutText: Latin-1; characters outside it become '?'."""
    data = text.replace("\r\n", "\n").encode("latin-1", "replace")
    return bytes((ServerMessage.SERVER_CUT_TEXT, 0, 0, 0)) + _U32.pack(len(data)) + data


def _extended_cut_text(flags: int, payload: bytes) -> bytes:
    return (
        bytes((ServerMessage.SERVER_CUT_TEXT, 0, 0, 0))
        + struct.pack(">i", -(4 + len(payload)))
        + _U32.pack(flags)
        + payload
    )


def clipboard_caps(max_sizes: dict[int, int], actions: int) -> bytes:
    """Extended Clipboard caps: the formats and actions we handle, with one
    U32 size limit per format, in bit order."""
    formats = 0
    sizes = []
    for bit in range(16):
        if (1 << bit) in max_sizes:
            formats |= 1 << bit
            sizes.append(_U32.pack(max_sizes[1 << bit]))
    return _extended_cut_text(ClipboardFlags.CAPS | actions | formats, b"".join(sizes))


def clipboard_notify(formats: int) -> bytes:
    return _extended_cut_text(ClipboardFlags.NOTIFY | formats, b"")


def clipboard_request(formats: int) -> bytes:
    return _extended_cut_text(ClipboardFlags.REQUEST | formats, b"")


def clipboard_provide(items: dict[int, bytes]) -> bytes:
    """Extended Clipboard provide: a zlib stream of (U32 size, data) per format,
    in bit order."""
    formats = 0
    parts = []
    for bit in range(16):
        if (1 << bit) in items:
            formats |= 1 << bit
            data = items[1 << bit]
            parts += [_U32.pack(len(data)), data]
    return _extended_cut_text(ClipboardFlags.PROVIDE | formats, zlib.compress(b"".join(parts)))


def clipboard_text_payload(text: str) -> bytes:
    """Text as Extended Clipboard carries it: UTF-8, CRLF line ends, NUL-terminated."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode() + b"\0"


def end_of_continuous_updates() -> bytes:
    return bytes((ServerMessage.END_OF_CONTINUOUS_UPDATES,))


def server_fence(flags: int, payload: bytes) -> bytes:
    if len(payload) > 64:
        raise LocalProtocolError("fence payload over 64 bytes")
    return (
        bytes((ServerMessage.SERVER_FENCE, 0, 0, 0))
        + _U32.pack(flags)
        + bytes((len(payload),))
        + payload
    )


def xvp(code: XvpCode, version: int = 1) -> bytes:
    return bytes((ServerMessage.XVP, 0, version, code))


# -- KasmVNC dialect -------------------------------------------------------------


def _kasm_text(message: ServerMessage, text: str) -> bytes:
    data = text.encode()
    return bytes((message, 0, 0, 0)) + _U32.pack(len(data)) + data


def kasm_stats(text: str) -> bytes:
    """178: bottleneck stats, e.g. "[ 9.5, 9.8, 10.0, 10.0 ]"."""
    return _kasm_text(ServerMessage.KASM_STATS, text)


def kasm_request_frame_stats() -> bytes:
    """179: sent right before the update whose processing the client times."""
    return bytes((ServerMessage.KASM_REQUEST_FRAME_STATS,))


def kasm_binary_clipboard(items: Iterable[tuple[int, str, bytes]]) -> bytes:
    """180: U8 n; n x (U32 id, U8 mimelen, mime, U32 len, data)."""
    items = list(items)
    if len(items) > 255:
        raise LocalProtocolError("too many clipboard items")
    out = [bytes((ServerMessage.KASM_BINARY_CLIPBOARD, len(items)))]
    for item_id, mime, data in items:
        mime_b = mime.encode()
        if len(mime_b) > 255:
            raise LocalProtocolError("mime type too long")
        out += [_U32.pack(item_id), bytes((len(mime_b),)), mime_b, _U32.pack(len(data)), data]
    return b"".join(out)


def kasm_video_encoders(encoders: Sequence[tuple[int, int, int, Sequence[int]]]) -> bytes:
    """184: U8 n; n x (S32 encoding, S32 qmin, S32 qmax, U8 npresets, presets)."""
    out = [bytes((ServerMessage.KASM_VIDEO_ENCODERS, len(encoders)))]
    for encoding, qmin, qmax, presets in encoders:
        out.append(struct.pack(">iiiB", encoding, qmin, qmax, len(presets)))
        out += [struct.pack(">i", p) for p in presets]
    return b"".join(out)


def kasm_server_disconnect(reason: str, graceful: bool = True) -> bytes:
    """186 (only to clients that sent -1885)."""
    data = reason.encode()
    return (
        bytes((ServerMessage.KASM_SERVER_DISCONNECT, int(graceful), 0, 0, 0))
        + _U32.pack(len(data))
        + data
    )


def kasm_user_added(username: str) -> bytes:
    data = username.encode()
    return bytes((ServerMessage.KASM_USER_ADDED,)) + _U32.pack(len(data)) + data


def kasm_user_removed(username: str) -> bytes:
    data = username.encode()
    return bytes((ServerMessage.KASM_USER_REMOVED,)) + _U32.pack(len(data)) + data

# Tests of trivnc's decoding test client (trivnc.testing.client, .aclient)
# against server byte streams built here by hand from RFC 6143 section 7 and
# rfbproto's message layouts, and KasmVNC's (protocol.md B.7). Nothing here
# uses trivnc's server: the client is the independent check of it.
from __future__ import annotations

import ssl
import struct
import warnings
import zlib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from itertools import pairwise

import pytest
import trio
import trio.testing
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trivnc.geometry import Rect
from trivnc.rfb.constants import ClipboardFlags, Encoding, ProtocolVersion, PseudoEncoding
from trivnc.rfb.errors import LocalProtocolError, RemoteProtocolError
from trivnc.rfb.pixelformat import RGB565
from trivnc.testing.aclient import (
    ConnectionClosedError,
    HandshakeError,
    open_test_client,
    wrap_stream,
)
from trivnc.testing.client import (
    NEED_DATA,
    Bell,
    ClientConnection,
    ClipboardCaps,
    ClipboardNotify,
    ClipboardPeek,
    ClipboardProvide,
    ClipboardRequest,
    ConnectionClosed,
    CursorPosition,
    CursorShape,
    DesktopName,
    DesktopSize,
    EndOfContinuousUpdates,
    Event,
    ExtendedDesktopSize,
    ExtendedKeyEventConfirmed,
    ExtendedMouseButtonsConfirmed,
    FramebufferUpdate,
    HandshakeFailed,
    KasmBinaryClipboard,
    KasmClipboardItem,
    KasmRequestFrameStats,
    KasmServerDisconnect,
    KasmStats,
    KasmUserAdded,
    KasmUserRemoved,
    KasmVideoEncoder,
    KasmVideoEncoders,
    LedState,
    NeedData,
    Screen,
    SecurityTypes,
    ServerCutText,
    ServerFence,
    ServerInit,
    StartTLS,
    VeNCryptSubtypes,
    VersionAgreed,
    Xvp,
    encode_clipboard_text,
    keysym_for_char,
    vnc_auth_response,
)

# -- server bytes, written from the spec ---------------------------------------------


def u8(v: int) -> bytes:
    return struct.pack(">B", v)


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def s32(v: int) -> bytes:
    return struct.pack(">i", v)


# PIXEL_FORMAT (RFC 6143 7.4): bpp, depth, big-endian, true-colour, 3 x U16 max,
# 3 x U8 shift, 3 padding. This one is BGRX in memory (little-endian 0x00RRGGBB).
PF_BGRX = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
VERSION_38 = b"RFB 003.008\n"


def server_init(width: int = 4, height: int = 3, name: bytes = b"desk") -> bytes:
    return u16(width) + u16(height) + PF_BGRX + u32(len(name)) + name


def handshake_none(width: int = 4, height: int = 3, name: bytes = b"desk") -> bytes:
    """3.8, security None: types, SecurityResult OK, ServerInit."""
    return VERSION_38 + u8(1) + u8(1) + u32(0) + server_init(width, height, name)


def rect(x: int, y: int, w: int, h: int, encoding: int, data: bytes = b"") -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding) + data


def update(*rects: bytes, count: int | None = None) -> bytes:
    n = len(rects) if count is None else count
    return u8(0) + u8(0) + u16(n) + b"".join(rects)


def bgrx(r: int, g: int, b: int) -> bytes:
    return bytes((b, g, r, 0))


def encoded_rects() -> tuple[bytes, dict[tuple[int, int], tuple[int, int, int]]]:
    """RRE, Hextile, zlib and two ZRLE rects (one zlib stream across both, as
    RFC 6143 7.7.6 requires) for a 4x3 BGRX framebuffer, built from the
    spec's layouts, and the (x, y) -> (r, g, b) they paint."""
    red, green, blue, grey = (255, 0, 0), (0, 255, 0), (0, 0, 255), (7, 8, 9)
    # RRE (7.7.3): U32 count, background PIXEL, count x (PIXEL, U16 x, y, w, h).
    rre = u32(1) + bgrx(*red) + bgrx(*green) + u16(1) + u16(1) + u16(1) + u16(1)
    # Hextile (7.7.4), one 2x2 tile: background, foreground, one subrect at
    # (0, 1) of size 1x1 in the foreground colour.
    hextile = u8(2 | 4 | 8) + bgrx(*blue) + bgrx(*grey) + u8(1) + u8(0x01) + u8(0x00)
    # zlib: U32 length + a sync-flushed chunk of one persistent stream.
    zlib_stream = zlib.compressobj()
    raw = bgrx(*green) + bgrx(*blue)
    zdata = zlib_stream.compress(raw) + zlib_stream.flush(zlib.Z_SYNC_FLUSH)
    # ZRLE (7.7.6): CPIXELs are the 3 low bytes of this little-endian format.
    zrle_stream = zlib.compressobj()
    solid = u8(1) + bytes((9, 8, 7))  # subencoding 1: one CPIXEL, r=7 g=8 b=9
    z1 = zrle_stream.compress(solid) + zrle_stream.flush(zlib.Z_SYNC_FLUSH)
    raw_tile = u8(0) + bytes((3, 2, 1))  # subencoding 0: raw CPIXELs, r=1 g=2 b=3
    z2 = zrle_stream.compress(raw_tile) + zrle_stream.flush(zlib.Z_SYNC_FLUSH)
    data = (
        rect(0, 0, 2, 2, Encoding.RRE, rre)
        + rect(2, 0, 2, 2, Encoding.HEXTILE, hextile)
        + rect(0, 2, 2, 1, Encoding.ZLIB, u32(len(zdata)) + zdata)
        + rect(2, 2, 2, 1, Encoding.ZRLE, u32(len(z1)) + z1)
        + rect(3, 2, 1, 1, Encoding.ZRLE, u32(len(z2)) + z2)
    )
    painted = {
        (0, 0): red, (1, 0): red, (0, 1): red, (1, 1): green,
        (2, 0): blue, (3, 0): blue, (2, 1): grey, (3, 1): blue,
        (0, 2): green, (1, 2): blue, (2, 2): (7, 8, 9), (3, 2): (1, 2, 3),
    }
    return data, painted


def compact_length(n: int) -> bytes:
    """rfbproto "Tight Encoding": 7 bits per byte, least significant first."""
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append(n >> 14)
    return bytes(out)


def tight_rects() -> tuple[bytes, dict[tuple[int, int], tuple[int, int, int]]]:
    """Tight rects for a 4x3 BGRX (so 32 bpp, depth 24: 3-byte R, G, B TPIXELs)
    framebuffer: a Fill, and basic copy-filter rects on zlib stream 0, the
    first under 12 bytes (sent raw), the second zlib-compressed."""
    fill = u8(0x80) + bytes((10, 20, 30))
    small = u8(0x00) + bytes((1, 2, 3, 4, 5, 6))  # 2x1: 6 bytes, no zlib
    stream0 = zlib.compressobj()
    pixels = bytes(range(40, 64))  # 4x2 TPIXELs: 24 bytes
    packed = stream0.compress(pixels) + stream0.flush(zlib.Z_SYNC_FLUSH)
    big = u8(0x00) + compact_length(len(packed)) + packed
    data = (
        rect(0, 0, 2, 1, Encoding.TIGHT, fill)
        + rect(2, 0, 2, 1, Encoding.TIGHT, small)
        + rect(0, 1, 4, 2, Encoding.TIGHT, big)
    )
    painted = {(0, 0): (10, 20, 30), (1, 0): (10, 20, 30), (2, 0): (1, 2, 3), (3, 0): (4, 5, 6)}
    for i in range(8):
        painted[(i % 4, 1 + i // 4)] = (40 + 3 * i, 41 + 3 * i, 42 + 3 * i)
    return data, painted


def cut_text_extended(flags: int, body: bytes = b"") -> bytes:
    payload = u32(flags) + body
    return u8(3) + bytes(3) + s32(-len(payload)) + payload


def feed(conn: ClientConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return conn.events()


ALL_PSEUDO = (
    PseudoEncoding.DESKTOP_SIZE,
    PseudoEncoding.EXTENDED_DESKTOP_SIZE,
    PseudoEncoding.LAST_RECT,
    PseudoEncoding.DESKTOP_NAME,
    PseudoEncoding.CURSOR,
    PseudoEncoding.X_CURSOR,
    PseudoEncoding.CURSOR_WITH_ALPHA,
    PseudoEncoding.VMWARE_CURSOR,
    PseudoEncoding.VMWARE_CURSOR_POSITION,
    PseudoEncoding.QEMU_EXTENDED_KEY_EVENT,
    PseudoEncoding.QEMU_LED_STATE,
    PseudoEncoding.EXTENDED_MOUSE_BUTTONS,
    PseudoEncoding.FENCE,
    PseudoEncoding.CONTINUOUS_UPDATES,
    PseudoEncoding.XVP,
    PseudoEncoding.EXTENDED_CLIPBOARD,
    PseudoEncoding.KASM_DISCONNECT_NOTIFY,
)
ENCODINGS = (
    Encoding.TIGHT,
    Encoding.ZRLE,
    Encoding.ZLIB,
    Encoding.HEXTILE,
    Encoding.RRE,
    Encoding.COPY_RECT,
    Encoding.RAW,
    *ALL_PSEUDO,
)


def established(
    *,
    encodings: Sequence[int] = ENCODINGS,
    dialect: str = "standard",
    width: int = 4,
    height: int = 3,
) -> ClientConnection:
    conn = ClientConnection(dialect="kasm" if dialect == "kasm" else "standard")
    events = feed(conn, handshake_none(width, height))
    assert isinstance(events[-1], ServerInit)
    conn.data_to_send()
    conn.set_encodings(encodings)
    return conn


# -- VNC Authentication ----------------------------------------------------------------


def reference_vnc_des(key_text: bytes, block: bytes) -> bytes:
    """DES-ECB with the VNC key convention, bit reversal written out longhand."""
    key = bytearray(key_text[:8].ljust(8, b"\0"))
    for i, byte in enumerate(key):
        reversed_byte = 0
        for bit in range(8):
            if byte & (1 << bit):
                reversed_byte |= 1 << (7 - bit)
        key[i] = reversed_byte
    encryptor = Cipher(TripleDES(bytes(key) * 3), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


# Published values: VNC servers store a password DES-encrypted under the fixed
# key 17 52 6B 06 23 4E 58 07 with the same key convention as VNC
# Authentication ("password" -> DBD83CFD727A1458 in RealVNC/TightVNC configs).
FIXED_KEY = bytes((23, 82, 107, 6, 35, 78, 88, 7))


@pytest.mark.parametrize(
    ("plain", "expected"),
    [
        (b"password", "dbd83cfd727a1458"),
        (b"bar", "9ca3f3686574f277"),
        (b"12345678", "f0e43164f6c2e373"),
    ],
)
def test_vnc_des_published_vectors(plain: bytes, expected: str) -> None:
    block = plain.ljust(8, b"\0")
    assert vnc_auth_response(FIXED_KEY, block * 2).hex() == expected * 2


@pytest.mark.parametrize("password", ["", "a", "secret", "password", "longer than eight"])
@pytest.mark.parametrize("challenge", [bytes(16), bytes(range(16)), b"\xff" * 16])
def test_vnc_auth_response_matches_longhand(password: str, challenge: bytes) -> None:
    assert vnc_auth_response(password, challenge) == reference_vnc_des(
        password.encode(), challenge
    )


def test_vnc_auth_response_matches_vncdotool() -> None:
    rfb = pytest.importorskip("vncdotool.rfb")
    challenge = bytes(range(0, 160, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its TripleDES import path is deprecated
        theirs = rfb.des_encrypt(rfb._vnc_des("s3cr3t"), challenge)
    assert vnc_auth_response("s3cr3t", challenge) == theirs


# -- handshake ---------------------------------------------------------------------------


def test_handshake_38_none() -> None:
    conn = ClientConnection()
    events = feed(conn, handshake_none(name="Ünïcode".encode()))
    assert events == [
        VersionAgreed("RFB 003.008", ProtocolVersion.V3_8),
        SecurityTypes((1,), 1),
        ServerInit(4, 3, conn.pixel_format, "Ünïcode"),
    ]
    assert conn.data_to_send() == b"RFB 003.008\n" + b"\x01" + b"\x01"
    assert conn.framebuffer.shape == (3, 4, 4)
    assert conn.pixel_format.pack() == PF_BGRX


def test_handshake_37_none_has_no_security_result() -> None:
    conn = ClientConnection()
    events = feed(conn, b"RFB 003.007\n" + u8(2) + u8(2) + u8(1) + server_init())
    assert events[0] == VersionAgreed("RFB 003.007", ProtocolVersion.V3_7)
    assert events[1] == SecurityTypes((2, 1), 1)  # no password: None is the only choice
    assert isinstance(events[2], ServerInit)
    assert conn.data_to_send() == b"RFB 003.007\n" + b"\x01" + b"\x01"


def test_handshake_33_server_picks_type() -> None:
    conn = ClientConnection(shared=False)
    events = feed(conn, b"RFB 003.003\n" + u32(1) + server_init())
    assert [type(e) for e in events] == [VersionAgreed, SecurityTypes, ServerInit]
    assert conn.data_to_send() == b"RFB 003.003\n" + b"\x00"


def test_handshake_33_client_against_38_server() -> None:
    conn = ClientConnection(version=ProtocolVersion.V3_3)
    events = feed(conn, VERSION_38 + u32(1) + server_init())
    assert events[0] == VersionAgreed("RFB 003.008", ProtocolVersion.V3_3)
    assert isinstance(events[-1], ServerInit)
    assert conn.data_to_send().startswith(b"RFB 003.003\n")


def test_handshake_33_refusal_with_reason() -> None:
    conn = ClientConnection()
    events = feed(conn, b"RFB 003.003\n" + u32(0) + u32(7) + b"go away")
    assert events == [
        VersionAgreed("RFB 003.003", ProtocolVersion.V3_3),
        HandshakeFailed("security-types", "go away"),
    ]
    with pytest.raises(RemoteProtocolError, match="after refusing"):
        feed(conn, b"x")


def test_handshake_vnc_auth_38() -> None:
    challenge = bytes(range(100, 116))
    conn = ClientConnection(vnc_password="secret")
    events = feed(conn, VERSION_38 + u8(2) + u8(1) + u8(2) + challenge + u32(0) + server_init())
    assert events[1] == SecurityTypes((1, 2), 2)
    assert isinstance(events[-1], ServerInit)
    expected = reference_vnc_des(b"secret", challenge)
    assert conn.data_to_send() == VERSION_38 + b"\x02" + expected + b"\x01"


def test_handshake_vnc_auth_failure_38_reason() -> None:
    conn = ClientConnection(password="wrong")
    events = feed(conn, VERSION_38 + u8(1) + u8(2) + bytes(16) + u32(1) + u32(8) + b"bad pass")
    assert events[-1] == HandshakeFailed("security-result", "bad pass", 1)
    assert feed(conn, b"") == [ConnectionClosed()]


def test_handshake_vnc_auth_failure_37_has_no_reason() -> None:
    conn = ClientConnection(vnc_password="wrong")
    events = feed(conn, b"RFB 003.007\n" + u8(1) + u8(2) + bytes(16) + u32(1))
    assert events[-1] == HandshakeFailed("security-result", "authentication failed", 1)


def test_handshake_no_security_types_reason() -> None:
    conn = ClientConnection()
    events = feed(conn, VERSION_38 + u8(0) + u32(4) + b"full")
    assert events[-1] == HandshakeFailed("security-types", "full")


def test_handshake_nothing_acceptable() -> None:
    conn = ClientConnection()  # no password, server insists on VNC auth
    events = feed(conn, VERSION_38 + u8(1) + u8(2))
    assert isinstance(events[-1], HandshakeFailed)
    assert conn.data_to_send() == VERSION_38  # no choice sent


def test_handshake_vencrypt_plain() -> None:
    conn = ClientConnection(username="user", password="pw")
    server = (
        VERSION_38 + u8(1) + u8(19)  # VeNCrypt
        + u8(0) + u8(2)  # version 0.2
        + u8(0)  # ack
        + u8(1) + u32(256)  # subtypes: Plain
        + u32(0)  # SecurityResult
        + server_init()
    )
    events = feed(conn, server)
    assert events[1] == SecurityTypes((19,), 19)
    assert events[2] == VeNCryptSubtypes((256,), 256)
    assert isinstance(events[3], ServerInit)
    creds = u32(4) + u32(2) + b"user" + b"pw"
    assert conn.data_to_send() == VERSION_38 + u8(19) + b"\x00\x02" + u32(256) + creds + b"\x01"


@pytest.mark.parametrize("subtype", [259, 262])
def test_handshake_vencrypt_tls_pauses_for_starttls(subtype: int) -> None:
    conn = ClientConnection(username="u", password="p")
    before_tls = (
        VERSION_38 + u8(1) + u8(19) + u8(0) + u8(2) + u8(0) + u8(2) + u32(256) + u32(subtype)
        + u8(1)  # TLS ack: 1 means go
    )
    events = feed(conn, before_tls)
    assert events[-1] == StartTLS(subtype)
    assert events[-1].x509 == (subtype == 262)
    # Everything so far goes out in the clear; the credentials must not yet.
    assert conn.data_to_send() == VERSION_38 + u8(19) + b"\x00\x02" + u32(subtype)
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == u32(1) + u32(1) + b"u" + b"p"
    events = feed(conn, u32(0) + server_init())
    assert isinstance(events[-1], ServerInit)


def test_handshake_vencrypt_tls_refused() -> None:
    conn = ClientConnection(username="u", password="p")
    events = feed(conn, VERSION_38 + u8(1) + u8(19) + u8(0) + u8(2) + u8(0) + u8(1) + u32(259)
                  + u8(0))
    assert events[-1] == HandshakeFailed("vencrypt", "server refused VeNCrypt subtype 259")


def test_handshake_data_before_tls_is_an_error() -> None:
    conn = ClientConnection(username="u", password="p")
    conn.receive_data(
        VERSION_38 + u8(1) + u8(19) + u8(0) + u8(2) + u8(0) + u8(1) + u32(259) + u8(1) + b"x"
    )
    with pytest.raises(RemoteProtocolError, match="before the TLS handshake"):
        conn.events()


@pytest.mark.parametrize(
    "version", [b"RFB 003.003\n", b"RFB 003.005\n", b"RFB 003.889\n"]
)
def test_old_versions_speak_33(version: bytes) -> None:
    conn = ClientConnection()
    events = feed(conn, version)
    assert events[0] == VersionAgreed(version[:11].decode(), ProtocolVersion.V3_3)


@pytest.mark.parametrize("version", [b"RFB 004.001\n", b"RFB 005.000\n", b"RFB 003.010\n"])
def test_newer_versions_speak_38(version: bytes) -> None:
    conn = ClientConnection()
    assert feed(conn, version)[0] == VersionAgreed(version[:11].decode(), ProtocolVersion.V3_8)


@pytest.mark.parametrize("garbage", [b"HTTP/1.1 200", b"RFB 002.000\n", b"RFB 003.00x\n"])
def test_bad_version_line(garbage: bytes) -> None:
    conn = ClientConnection()
    with pytest.raises(RemoteProtocolError):
        feed(conn, garbage)


def test_eof_during_handshake() -> None:
    conn = ClientConnection()
    conn.receive_data(VERSION_38 + u8(1))
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="handshake"):
        conn.events()


def test_server_init_bounds() -> None:
    conn = ClientConnection()
    with pytest.raises(RemoteProtocolError, match="desktop name"):
        feed(conn, VERSION_38 + u8(1) + u8(1) + u32(0) + u16(4) + u16(3) + PF_BGRX
             + u32(2 << 20))
    conn = ClientConnection(max_framebuffer_pixels=100)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        feed(conn, handshake_none(20, 20))


def test_colour_map_server_format_is_refused() -> None:
    conn = ClientConnection()
    pf = struct.pack(">BBBBHHHBBB3x", 8, 8, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(RemoteProtocolError, match="colour-map"):
        feed(conn, VERSION_38 + u8(1) + u8(1) + u32(0) + u16(4) + u16(3) + pf + u32(0))


# -- framebuffer updates -----------------------------------------------------------------


def test_raw_update_fills_framebuffer() -> None:
    conn = established()
    pixels = bgrx(255, 0, 0) + bgrx(0, 255, 0) + bgrx(0, 0, 255) + bgrx(1, 2, 3)
    events = feed(conn, update(rect(1, 1, 2, 2, Encoding.RAW, pixels)))
    assert events == [FramebufferUpdate(((Rect(1, 1, 2, 2), Encoding.RAW),))]
    fb = conn.framebuffer
    assert fb[1, 1, :3].tolist() == [0, 0, 255]  # BGRX: red
    assert fb[1, 2, :3].tolist() == [0, 255, 0]
    assert fb[2, 1, :3].tolist() == [255, 0, 0]
    assert fb[2, 2, :3].tolist() == [3, 2, 1]
    assert fb[0].sum() == 0


def test_raw_update_in_rgb565() -> None:
    conn = established()
    out = conn.set_pixel_format(RGB565)
    assert out == u8(0) + bytes(3) + struct.pack(">BBBBHHHBBB3x", 16, 16, 0, 1, 31, 63, 31,
                                                  11, 5, 0)
    white, red = struct.pack("<H", 0xFFFF), struct.pack("<H", 0xF800)
    feed(conn, update(rect(0, 0, 2, 1, Encoding.RAW, white + red)))
    assert conn.framebuffer[0, 0, :3].tolist() == [255, 255, 255]
    assert conn.framebuffer[0, 1, :3].tolist() == [0, 0, 255]


def test_standard_encodings_through_the_shared_decoders() -> None:
    conn = established()
    data, painted = encoded_rects()
    (event,) = feed(conn, update(data, count=5))
    assert isinstance(event, FramebufferUpdate)
    assert [e for _, e in event.rects] == [2, 5, 6, 16, 16]
    for (x, y), (r, g, b) in painted.items():
        assert conn.framebuffer[y, x, :3].tolist() == [b, g, r], (x, y)


def test_tight_through_the_shared_decoder() -> None:
    conn = established()
    data, painted = tight_rects()
    feed(conn, update(data, count=3))
    for (x, y), (r, g, b) in painted.items():
        assert conn.framebuffer[y, x, :3].tolist() == [b, g, r], (x, y)


def test_decoder_errors_become_remote_protocol_errors() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="ZRLE"):
        feed(conn, update(rect(0, 0, 1, 1, Encoding.ZRLE, u32(3) + b"bad")))


def test_last_rect_ends_update() -> None:
    conn = established()
    events = feed(
        conn,
        update(
            rect(0, 0, 1, 1, Encoding.RAW, bgrx(9, 9, 9)),
            rect(0, 0, 0, 0, PseudoEncoding.LAST_RECT),
            count=0xFFFF,
        )
        + u8(2),  # a Bell right after proves the parser stopped at LastRect
    )
    assert events == [
        FramebufferUpdate(((Rect(0, 0, 1, 1), Encoding.RAW),), last_rect=True),
        Bell(),
    ]


def test_empty_update() -> None:
    conn = established()
    assert feed(conn, update()) == [FramebufferUpdate(())]


def test_copyrect() -> None:
    conn = established()
    feed(conn, update(rect(0, 0, 1, 1, Encoding.RAW, bgrx(1, 2, 3))))
    feed(conn, update(rect(3, 2, 1, 1, Encoding.COPY_RECT, u16(0) + u16(0))))
    assert conn.framebuffer[2, 3, :3].tolist() == [3, 2, 1]


def test_unadvertised_encoding_is_an_error() -> None:
    conn = established(encodings=(Encoding.RAW,))
    with pytest.raises(RemoteProtocolError, match="without the client advertising"):
        feed(conn, update(rect(0, 0, 1, 1, Encoding.HEXTILE, b"\x01" + bgrx(0, 0, 0))))
    # The error is sticky, as in h11.
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_unadvertised_pseudo_encoding_is_an_error() -> None:
    conn = established(encodings=(Encoding.RAW,))
    with pytest.raises(RemoteProtocolError, match="LastRect"):
        feed(conn, update(rect(0, 0, 0, 0, PseudoEncoding.LAST_RECT), count=0xFFFF))


def test_rect_outside_framebuffer() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="outside"):
        feed(conn, update(rect(3, 0, 2, 1, Encoding.RAW, bytes(8))))


def test_desktop_size_resizes() -> None:
    conn = established()
    events = feed(conn, update(rect(0, 0, 10, 7, PseudoEncoding.DESKTOP_SIZE)))
    assert events == [
        DesktopSize(10, 7),
        FramebufferUpdate(((Rect(0, 0, 10, 7), PseudoEncoding.DESKTOP_SIZE),)),
    ]
    assert conn.size == (10, 7)
    assert conn.framebuffer.shape == (7, 10, 4)


def test_extended_desktop_size() -> None:
    conn = established()
    screens = struct.pack(">IHHHHI", 7, 0, 0, 8, 5, 0) + struct.pack(">IHHHHI", 9, 8, 0, 4, 5, 1)
    data = u8(2) + bytes(3) + screens
    events = feed(conn, update(rect(0, 0, 12, 5, PseudoEncoding.EXTENDED_DESKTOP_SIZE, data)))
    expected_screens = (Screen(7, 0, 0, 8, 5, 0), Screen(9, 8, 0, 4, 5, 1))
    assert events[0] == ExtendedDesktopSize(0, 0, 12, 5, expected_screens)
    assert conn.size == (12, 5)
    assert conn.screens == expected_screens
    # Now SetDesktopSize is allowed, with rfbproto's layout.
    assert conn.set_desktop_size(12, 5, expected_screens) == (
        u8(251) + u8(0) + u16(12) + u16(5) + u8(2) + u8(0) + screens
    )


def test_extended_desktop_size_failure_does_not_resize() -> None:
    conn = established()
    data = u8(0) + bytes(3)
    events = feed(conn, update(rect(1, 3, 0, 0, PseudoEncoding.EXTENDED_DESKTOP_SIZE, data)))
    assert events[0] == ExtendedDesktopSize(1, 3, 0, 0, ())
    assert conn.size == (4, 3)


def test_extended_desktop_size_with_pixels_is_an_error() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="must not change framebuffer data"):
        feed(conn, update(
            rect(0, 0, 4, 3, PseudoEncoding.EXTENDED_DESKTOP_SIZE, u8(0) + bytes(3)),
            rect(0, 0, 1, 1, Encoding.RAW, bgrx(0, 0, 0)),
        ))


def test_set_desktop_size_needs_extended_desktop_size_first() -> None:
    conn = established()
    with pytest.raises(LocalProtocolError):
        conn.set_desktop_size(10, 10, [Screen(1, 0, 0, 10, 10)])


def test_desktop_name() -> None:
    conn = established()
    name = "Bureau ☃".encode()
    data = u32(len(name)) + name
    events = feed(conn, update(rect(0, 0, 0, 0, PseudoEncoding.DESKTOP_NAME, data)))
    assert events[0] == DesktopName("Bureau ☃")
    assert conn.name == "Bureau ☃"


def test_desktop_name_rect_must_be_zero() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="DesktopName"):
        feed(conn, update(rect(1, 0, 0, 0, PseudoEncoding.DESKTOP_NAME, u32(0))))


def test_cursor_pixels_and_mask() -> None:
    conn = established()
    pixels = bgrx(255, 0, 0) + bgrx(0, 255, 0) + bgrx(0, 0, 255) + bgrx(10, 20, 30)
    mask = bytes([0b1000_0000, 0b1100_0000])  # one byte per row, MSB = leftmost
    events = feed(conn, update(rect(1, 0, 2, 2, PseudoEncoding.CURSOR, pixels + mask)))
    cursor = events[0]
    assert isinstance(cursor, CursorShape)
    assert (cursor.hotspot_x, cursor.hotspot_y, cursor.width, cursor.height) == (1, 0, 2, 2)
    assert cursor.image().tolist() == [
        [[255, 0, 0, 255], [0, 0, 0, 0]],
        [[0, 0, 255, 255], [10, 20, 30, 255]],
    ]
    assert conn.cursor == cursor


def test_x_cursor() -> None:
    conn = established()
    colours = bytes((255, 255, 255, 0, 0, 0))  # primary white, secondary black
    bitmap = bytes([0b0100_0000])
    mask = bytes([0b1100_0000])
    events = feed(conn, update(rect(0, 0, 2, 1, PseudoEncoding.X_CURSOR, colours + bitmap + mask)))
    assert isinstance(events[0], CursorShape)
    assert events[0].image().tolist() == [[[0, 0, 0, 255], [255, 255, 255, 255]]]


def test_cursor_with_alpha_raw() -> None:
    conn = established()
    rgba = bytes((10, 20, 30, 40, 0, 0, 0, 0))
    events = feed(
        conn, update(rect(0, 1, 2, 1, PseudoEncoding.CURSOR_WITH_ALPHA, s32(Encoding.RAW) + rgba))
    )
    assert events[0] == CursorShape(PseudoEncoding.CURSOR_WITH_ALPHA, 0, 1, 2, 1, rgba)


def test_cursor_too_large() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="cursor"):
        feed(conn, update(rect(0, 0, 2000, 2000, PseudoEncoding.CURSOR)))


def test_vmware_cursors() -> None:
    conn = established()
    alpha = bytes(range(8))
    events = feed(
        conn,
        update(rect(1, 1, 2, 1, PseudoEncoding.VMWARE_CURSOR, u8(1) + u8(0) + alpha)),
    )
    assert events[0] == CursorShape(PseudoEncoding.VMWARE_CURSOR, 1, 1, 2, 1, alpha)
    # Classic: AND 0 paints XOR's colour, AND all-ones with XOR 0 is transparent.
    and_mask = bgrx(0, 0, 0) + b"\xff\xff\xff\xff"
    xor_mask = bgrx(1, 2, 3) + bgrx(0, 0, 0)
    events = feed(
        conn,
        update(rect(0, 0, 2, 1, PseudoEncoding.VMWARE_CURSOR, u8(0) + u8(0) + and_mask + xor_mask)),
    )
    assert isinstance(events[0], CursorShape)
    assert events[0].image().tolist() == [[[1, 2, 3, 255], [0, 0, 0, 0]]]


def test_small_pseudo_rects() -> None:
    conn = established()
    events = feed(
        conn,
        update(
            rect(5, 6, 0, 0, PseudoEncoding.VMWARE_CURSOR_POSITION),
            rect(0, 0, 0, 0, PseudoEncoding.QEMU_EXTENDED_KEY_EVENT),
            rect(0, 0, 0, 0, PseudoEncoding.EXTENDED_MOUSE_BUTTONS),
            rect(0, 0, 0, 0, PseudoEncoding.QEMU_LED_STATE, u8(0b101)),
        ),
    )
    assert events[:4] == [
        CursorPosition(5, 6),
        ExtendedKeyEventConfirmed(),
        ExtendedMouseButtonsConfirmed(),
        LedState(5),
    ]
    assert isinstance(events[3], LedState)
    assert events[3].caps_lock and events[3].scroll_lock and not events[3].num_lock
    assert conn.extended_key_events and conn.extended_mouse_buttons


# -- other server messages ---------------------------------------------------------------


def test_bell_cut_text_end_of_cu_fence_xvp() -> None:
    conn = established()
    events = feed(
        conn,
        u8(2)
        + u8(3) + bytes(3) + u32(5) + "héllo".encode("latin-1")
        + u8(150)
        + u8(248) + bytes(3) + u32(0x8000_0003) + u8(3) + b"abc"
        + u8(250) + u8(0) + u8(1) + u8(1),
    )
    assert events == [
        Bell(),
        ServerCutText("héllo"),
        EndOfContinuousUpdates(),
        ServerFence(0x8000_0003, b"abc"),
        Xvp(1, 1),
    ]
    assert conn.continuous_updates and conn.fence and conn.xvp_version == 1


def test_fence_reply_clears_request_and_unknown_bits() -> None:
    conn = established()
    (event,) = feed(conn, u8(248) + bytes(3) + u32(0x8000_0025) + u8(2) + b"id")
    assert isinstance(event, ServerFence)
    assert conn.fence_reply(event) == u8(248) + bytes(3) + u32(0x0000_0005) + u8(2) + b"id"
    with pytest.raises(LocalProtocolError):
        conn.fence_reply(ServerFence(1, b""))


def test_fence_payload_bound() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="fence payload"):
        feed(conn, u8(248) + bytes(3) + u32(0) + u8(65) + bytes(65))


def test_cut_text_bound() -> None:
    conn = established(encodings=(Encoding.RAW,))
    with pytest.raises(RemoteProtocolError, match="cut text"):
        feed(conn, u8(3) + bytes(3) + u32(0xFFFF_FFF0))


def test_extended_clipboard_caps_and_actions() -> None:
    conn = established()
    text, html = ClipboardFlags.TEXT, ClipboardFlags.HTML
    events = feed(
        conn,
        cut_text_extended(ClipboardFlags.CAPS | ClipboardFlags.PROVIDE | text | html,
                          u32(1024) + u32(0))
        + cut_text_extended(ClipboardFlags.REQUEST | text)
        + cut_text_extended(ClipboardFlags.PEEK)
        + cut_text_extended(ClipboardFlags.NOTIFY | text | html),
    )
    assert events == [
        ClipboardCaps(ClipboardFlags.CAPS | ClipboardFlags.PROVIDE | 5, ((1, 1024), (4, 0))),
        ClipboardRequest(1),
        ClipboardPeek(),
        ClipboardNotify(5),
    ]


def test_extended_clipboard_provide() -> None:
    conn = established()
    text = "héllo\r\nwörld".encode() + b"\0"
    html = b"<b>hi</b>"
    inner = u32(len(text)) + text + u32(len(html)) + html
    flags = ClipboardFlags.PROVIDE | ClipboardFlags.TEXT | ClipboardFlags.HTML
    (event,) = feed(conn, cut_text_extended(flags, zlib.compress(inner)))
    assert isinstance(event, ClipboardProvide)
    assert event.data == ((1, text), (4, html))
    assert event.text == "héllo\nwörld"


@pytest.mark.parametrize(
    ("flags", "inner", "match"),
    [
        (ClipboardFlags.PROVIDE | 1, u32(3) + b"abc", "NUL"),
        (ClipboardFlags.PROVIDE | 1, u32(9) + b"abc\0", "truncated"),
        (ClipboardFlags.PROVIDE | 1, u32(1) + b"\0" + b"xx", "stray"),
        (ClipboardFlags.PROVIDE | 3, u32(1) + b"\0", "ended before"),
    ],
)
def test_extended_clipboard_provide_errors(flags: int, inner: bytes, match: str) -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match=match):
        feed(conn, cut_text_extended(flags, zlib.compress(inner)))


def test_extended_clipboard_two_actions_is_an_error() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="exactly one"):
        feed(conn, cut_text_extended(ClipboardFlags.REQUEST | ClipboardFlags.NOTIFY | 1))


def test_extended_clipboard_zip_bomb_is_bounded() -> None:
    conn = established()
    bomb = zlib.compress(bytes(70 << 20), 9)
    with pytest.raises(RemoteProtocolError, match="size limit"):
        feed(conn, cut_text_extended(ClipboardFlags.PROVIDE | 1, bomb))


def test_negative_cut_text_without_extended_clipboard() -> None:
    conn = established(encodings=(Encoding.RAW,))
    with pytest.raises(RemoteProtocolError):
        feed(conn, cut_text_extended(ClipboardFlags.PEEK))


def test_colour_map_entries_are_refused() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="SetColourMapEntries"):
        feed(conn, u8(1) + u8(0) + u16(0) + u16(1) + bytes(6))


def test_unknown_message_and_kasm_types_in_standard_dialect() -> None:
    conn = established()
    with pytest.raises(RemoteProtocolError, match="unknown server message type 178"):
        feed(conn, u8(178) + bytes(3) + u32(0))


def test_eof_at_boundary_and_mid_message() -> None:
    conn = established()
    assert feed(conn, u8(2) + b"") == [Bell()]
    assert feed(conn, b"") == [ConnectionClosed()]
    conn = established()
    conn.receive_data(u8(3) + bytes(3))
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        conn.events()


# -- KasmVNC server messages --------------------------------------------------------------


def test_kasm_server_messages() -> None:
    conn = established(dialect="kasm")
    stats = b"[ 9.5, 10.0, 10.0, 10.0 ]"
    events = feed(
        conn,
        u8(178) + bytes(3) + u32(len(stats)) + stats
        + u8(179)
        + u8(180) + u8(2)
        + u32(7) + u8(10) + b"text/plain" + u32(2) + b"hi"
        + u32(8) + u8(9) + b"image/png" + u32(3) + b"PNG"
        + u8(184) + u8(2)
        + s32(-1030) + s32(0) + s32(63) + u8(2) + s32(1) + s32(2)
        + s32(-1025) + s32(0) + s32(9) + u8(0)
        + u8(186) + u8(1) + bytes(3) + u32(3) + b"bye"
        + u8(253) + u32(5) + b"alice"
        + u8(254) + u32(3) + b"bob",
    )
    assert events == [
        KasmStats(stats.decode()),
        KasmRequestFrameStats(),
        KasmBinaryClipboard(
            (KasmClipboardItem(7, "text/plain", b"hi"), KasmClipboardItem(8, "image/png", b"PNG"))
        ),
        KasmVideoEncoders(
            (KasmVideoEncoder(-1030, 0, 63, (1, 2)), KasmVideoEncoder(-1025, 0, 9, ()))
        ),
        KasmServerDisconnect(True, "bye"),
        KasmUserAdded("alice"),
        KasmUserRemoved("bob"),
    ]


def test_kasm_disconnect_needs_the_pseudo_encoding() -> None:
    conn = established(dialect="kasm", encodings=(Encoding.RAW,))
    with pytest.raises(RemoteProtocolError, match="disconnect"):
        feed(conn, u8(186) + u8(0) + bytes(3) + u32(0))


def test_kasm_text_bound() -> None:
    conn = established(dialect="kasm")
    with pytest.raises(RemoteProtocolError, match="user name"):
        feed(conn, u8(253) + u32(2 << 20))


# -- client messages ---------------------------------------------------------------------


def test_standard_client_messages() -> None:
    conn = established()
    assert conn.set_encodings([Encoding.RAW, 0xC0A1E5CE, -239]) == (
        u8(2) + u8(0) + u16(3) + s32(0) + s32(-0x3F5E1A32) + s32(-239)
    )
    assert conn.framebuffer_update_request(False) == (
        u8(3) + u8(0) + u16(0) + u16(0) + u16(4) + u16(3)
    )
    assert conn.framebuffer_update_request(True, Rect(1, 2, 3, 1)) == (
        u8(3) + u8(1) + u16(1) + u16(2) + u16(3) + u16(1)
    )
    assert conn.key_event(0xFF0D, True) == u8(4) + u8(1) + bytes(2) + u32(0xFF0D)
    assert conn.pointer_event(10, 20, 0b101) == u8(5) + u8(5) + u16(10) + u16(20)
    assert conn.pointer_event(1, 2, 0x80) == u8(5) + u8(0x80) + u16(1) + u16(2)  # back: 6 bytes
    assert conn.client_cut_text("héllo") == u8(6) + bytes(3) + u32(5) + "héllo".encode("latin-1")
    with pytest.raises(LocalProtocolError):
        conn.client_cut_text("☃")
    with pytest.raises(LocalProtocolError):
        conn.pointer_event(70000, 0)
    with pytest.raises(LocalProtocolError):
        conn.pointer_event(0, 0, scroll_y=1)


def test_extended_messages_need_confirmation() -> None:
    conn = established()
    with pytest.raises(LocalProtocolError):
        conn.pointer_event(0, 0, 0x100)  # forward button
    with pytest.raises(LocalProtocolError):
        conn.qemu_key_event(0x61, 0x1E, True)
    with pytest.raises(LocalProtocolError):
        conn.enable_continuous_updates(True)
    with pytest.raises(LocalProtocolError):
        conn.client_fence(0x8000_0000)
    with pytest.raises(LocalProtocolError):
        conn.xvp(2)
    with pytest.raises(LocalProtocolError):
        conn.clipboard_peek()
    with pytest.raises(LocalProtocolError):
        conn.kasm_keep_alive()
    feed(
        conn,
        update(
            rect(0, 0, 0, 0, PseudoEncoding.QEMU_EXTENDED_KEY_EVENT),
            rect(0, 0, 0, 0, PseudoEncoding.EXTENDED_MOUSE_BUTTONS),
        )
        + u8(150)
        + u8(248) + bytes(3) + u32(0) + u8(0)
        + u8(250) + u8(0) + u8(1) + u8(1)
        + cut_text_extended(ClipboardFlags.CAPS | ClipboardFlags.PROVIDE | 1, u32(100)),
    )
    # Buttons 8 (back) and 9 (forward): extended form, marker bit + extra byte.
    assert conn.pointer_event(3, 4, 0x181) == u8(5) + u8(0x81) + u16(3) + u16(4) + u8(0b11)
    assert conn.qemu_key_event(0x61, 0x1E, True) == (
        u8(255) + u8(0) + u16(1) + u32(0x61) + u32(0x1E)
    )
    assert conn.enable_continuous_updates(True, Rect(0, 0, 2, 2)) == (
        u8(150) + u8(1) + u16(0) + u16(0) + u16(2) + u16(2)
    )
    assert conn.client_fence(0x8000_0001, b"p") == (
        u8(248) + bytes(3) + u32(0x8000_0001) + u8(1) + b"p"
    )
    assert conn.xvp(3) == u8(250) + u8(0) + u8(1) + u8(3)
    assert conn.clipboard_peek() == u8(6) + bytes(3) + s32(-4) + u32(ClipboardFlags.PEEK)
    caps = conn.clipboard_caps({ClipboardFlags.TEXT: 0, ClipboardFlags.HTML: 5})
    flags = ClipboardFlags.CAPS | 0x1E00_0000 | 5
    assert caps == u8(6) + bytes(3) + s32(-12) + u32(flags) + u32(0) + u32(5)


def test_clipboard_provide_round_trips_through_the_parser() -> None:
    conn = established()
    feed(conn, cut_text_extended(ClipboardFlags.CAPS | ClipboardFlags.PROVIDE | 1, u32(100)))
    message = conn.clipboard_provide({ClipboardFlags.TEXT: encode_clipboard_text("a\nb")})
    assert message[0] == 6
    # Read back as if the server had sent it (same layout in both directions).
    (event,) = feed(conn, u8(3) + message[1:])
    assert isinstance(event, ClipboardProvide)
    assert event.data == ((1, b"a\r\nb\0"),)
    assert event.text == "a\nb"


def test_kasm_client_messages() -> None:
    conn = established(dialect="kasm")
    assert conn.pointer_event(300, 200, 0x101, scroll_x=-3, scroll_y=120) == (
        struct.pack(">BHHHhh", 5, 0x101, 300, 200, -3, 120)
    )
    assert len(conn.pointer_event(0, 0)) == 11
    assert conn.kasm_request_stats() == u8(178) + bytes(3)
    assert conn.kasm_frame_stats(60, 0) == u8(179) + bytes(3) + u32(60) + u32(0)
    assert conn.kasm_binary_clipboard([("text/plain", b"hey")]) == (
        u8(180) + u8(1) + u8(10) + b"text/plain" + u32(3) + b"hey"
    )
    assert conn.kasm_video_encoders_request([-1030, -1025]) == (
        u8(184) + u8(2) + s32(-1030) + s32(-1025)
    )
    assert conn.kasm_keep_alive() == u8(185)
    assert conn.kasm_set_max_video_resolution(1920, 1080) == u8(252) + u16(1920) + u16(1080)


def test_messages_before_server_init() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError):
        conn.key_event(0x61, True)


def test_keysyms() -> None:
    assert keysym_for_char("a") == 0x61
    assert keysym_for_char("é") == 0xE9
    assert keysym_for_char("\n") == 0xFF0D
    assert keysym_for_char("☃") == 0x0100_2603


# -- any split of the stream gives the same events -----------------------------------------

CHALLENGE = bytes(range(16))


def _long_server_stream() -> bytes:
    text = "clip ☃\r\n".encode() + b"\0"
    screens = struct.pack(">IHHHHI", 1, 0, 0, 6, 4, 0)
    stats = b"[ 1.0, 2.0, 3.0, 4.0 ]"
    return (
        VERSION_38 + u8(2) + u8(1) + u8(2) + CHALLENGE + u32(0) + server_init(4, 3, b"split")
        + update(
            rect(0, 0, 4, 3, Encoding.RAW, b"".join(bgrx(i, 2 * i, 3 * i) for i in range(12))),
            encoded_rects()[0],
            tight_rects()[0],
            count=9,
        )
        # from here the client has switched to RGB565 (see _drive)
        + update(
            rect(0, 0, 2, 1, Encoding.RAW, struct.pack("<HH", 0xF800, 0x07E0)),
            rect(0, 0, 0, 0, PseudoEncoding.DESKTOP_NAME, u32(5) + b"named"),
            rect(2, 2, 2, 1, PseudoEncoding.CURSOR, struct.pack("<HH", 0x001F, 0xFFFF) + b"\xc0"),
            rect(0, 0, 0, 0, PseudoEncoding.LAST_RECT),
            count=0xFFFF,
        )
        + u8(2)
        + u8(3) + bytes(3) + u32(3) + b"old"
        + cut_text_extended(ClipboardFlags.CAPS | ClipboardFlags.PROVIDE | 1, u32(4096))
        + cut_text_extended(ClipboardFlags.PROVIDE | 1, zlib.compress(u32(len(text)) + text))
        + u8(248) + bytes(3) + u32(0x8000_0001) + u8(4) + b"ping"
        + u8(150)
        + update(rect(0, 0, 6, 4, PseudoEncoding.EXTENDED_DESKTOP_SIZE, u8(1) + bytes(3) + screens))
        + update(rect(5, 3, 1, 1, Encoding.RAW, struct.pack("<H", 0xFFFF)))
        + update(rect(0, 0, 0, 0, PseudoEncoding.QEMU_LED_STATE, u8(2)))
        + u8(178) + bytes(3) + u32(len(stats)) + stats
        + u8(253) + u32(3) + b"eve"
    )


STREAM = _long_server_stream()


def _drive(chunks: Sequence[bytes]) -> tuple[list[Event], bytes, bytes]:
    conn = ClientConnection(vnc_password="pw", dialect="kasm")
    events: list[Event] = []
    sent = b""
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            sent += conn.data_to_send()
            if event is NEED_DATA:
                break
            assert not isinstance(event, NeedData)
            events.append(event)
            if isinstance(event, ServerInit):
                sent += conn.set_encodings(ENCODINGS)
            elif isinstance(event, FramebufferUpdate) and len(events) == 4:
                sent += conn.set_pixel_format(RGB565)
            if isinstance(event, ConnectionClosed):
                break
    return events, sent, conn.framebuffer.tobytes()


REFERENCE = _drive([STREAM])


def test_reference_stream_events() -> None:
    events, sent, _ = REFERENCE
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "VersionAgreed", "SecurityTypes", "ServerInit", "FramebufferUpdate",
        "DesktopName", "CursorShape", "FramebufferUpdate",
        "Bell", "ServerCutText", "ClipboardCaps", "ClipboardProvide", "ServerFence",
        "EndOfContinuousUpdates", "ExtendedDesktopSize", "FramebufferUpdate", "FramebufferUpdate",
        "LedState", "FramebufferUpdate", "KasmStats", "KasmUserAdded", "ConnectionClosed",
    ]
    assert sent.startswith(VERSION_38 + u8(2) + reference_vnc_des(b"pw", CHALLENGE) + u8(1))


def test_one_byte_at_a_time() -> None:
    assert _drive([STREAM[i : i + 1] for i in range(len(STREAM))]) == REFERENCE


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(STREAM)]
    # An empty chunk would mean EOF to receive_data, so cuts are distinct.
    chunks = [STREAM[a:b] for a, b in pairwise(points) if b > a]
    assert _drive(chunks) == REFERENCE


# -- the trio client against a scripted server --------------------------------------------


async def recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError(f"wanted {n} bytes, got {len(data)}")
        data += chunk
    return data


async def serve_handshake(stream: trio.abc.Stream, n_encodings: int, width: int = 4,
                          height: int = 3) -> None:
    await stream.send_all(VERSION_38 + u8(1) + u8(1))
    assert await recv_exactly(stream, 13) == VERSION_38 + u8(1)
    await stream.send_all(u32(0))
    assert await recv_exactly(stream, 1) == u8(1)  # ClientInit: shared
    await stream.send_all(server_init(width, height))
    head = await recv_exactly(stream, 4)
    assert head == u8(2) + u8(0) + u16(n_encodings)
    await recv_exactly(stream, 4 * n_encodings)


ServerScript = Callable[[trio.abc.Stream], Awaitable[None]]


async def run_with_server(nursery: trio.Nursery, script: ServerScript) -> trio.abc.Stream:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(script, server_end)
    return client_end


async def test_aclient_screenshot_waits_for_full_coverage() -> None:
    encodings = (Encoding.RAW, PseudoEncoding.EXTENDED_DESKTOP_SIZE)
    top = b"".join(bgrx(1, 2, 3) for _ in range(4))
    bottom = b"".join(bgrx(7, 8, 9) for _ in range(8))

    async def server(stream: trio.abc.Stream) -> None:
        await serve_handshake(stream, len(encodings))
        request = await recv_exactly(stream, 10)
        assert request == u8(3) + u8(0) + u16(0) + u16(0) + u16(4) + u16(3)
        # rfbproto: the EDS reply comes alone, then the pixels (here in two updates).
        await stream.send_all(
            update(rect(0, 0, 4, 3, PseudoEncoding.EXTENDED_DESKTOP_SIZE, u8(0) + bytes(3)))
            + update(rect(0, 0, 4, 1, Encoding.RAW, top))
        )
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(update(rect(0, 1, 4, 2, Encoding.RAW, bottom)))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        async with wrap_stream(stream, encodings=encodings) as client:
            assert client.size == (4, 3)
            assert client.name == "desk"
            assert [type(e) for e in client.handshake_events] == [
                VersionAgreed, SecurityTypes, ServerInit
            ]
            shot = await client.screenshot(timeout=5)
            assert shot[0].tolist() == [[3, 2, 1, 0]] * 4
            assert shot[2].tolist() == [[9, 8, 7, 0]] * 4
            assert isinstance(await client.wait_for(ExtendedDesktopSize, 1), ExtendedDesktopSize)
        nursery.cancel_scope.cancel()


async def test_aclient_input_fence_and_next_update() -> None:
    encodings = (Encoding.RAW, PseudoEncoding.FENCE)
    got: dict[str, bytes] = {}

    async def server(stream: trio.abc.Stream) -> None:
        await serve_handshake(stream, len(encodings))
        await stream.send_all(u8(248) + bytes(3) + u32(0x8000_0011) + u8(1) + b"f")
        got["fence"] = await recv_exactly(stream, 10)
        got["keys"] = await recv_exactly(stream, 32)  # "ab": 2 x (down, up) KeyEvents
        got["click"] = await recv_exactly(stream, 18)
        got["cut"] = await recv_exactly(stream, 10)
        got["request"] = await recv_exactly(stream, 10)
        await stream.send_all(update(rect(0, 0, 1, 1, Encoding.RAW, bgrx(5, 5, 5))))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        async with wrap_stream(stream, encodings=encodings) as client:
            fence = await client.wait_for(ServerFence, 5)
            assert fence.payload == b"f"
            await client.type_text("ab")
            await client.click(2, 1, button=3)
            await client.cut_text("hi")
            await client.request_update(incremental=True)
            upd = await client.next_update(timeout=5)
            assert upd.rects == ((Rect(0, 0, 1, 1), Encoding.RAW),)
            assert client.framebuffer[0, 0, :3].tolist() == [5, 5, 5]
        nursery.cancel_scope.cancel()

    assert got["fence"] == u8(248) + bytes(3) + u32(0x0000_0001) + u8(1) + b"f"
    key = struct.Struct(">BB2xI")
    assert got["keys"] == b"".join(
        key.pack(4, 1, sym) + key.pack(4, 0, sym) for sym in (0x61, 0x62)
    )
    assert got["click"] == (
        struct.pack(">BBHH", 5, 0, 2, 1) + struct.pack(">BBHH", 5, 4, 2, 1)
        + struct.pack(">BBHH", 5, 0, 2, 1)
    )
    assert got["cut"] == u8(6) + bytes(3) + u32(2) + b"hi"
    assert got["request"] == u8(3) + u8(1) + u16(0) + u16(0) + u16(4) + u16(3)


async def test_aclient_protocol_error_reaches_waiter() -> None:
    async def server(stream: trio.abc.Stream) -> None:
        await serve_handshake(stream, 1)
        await stream.send_all(u8(99))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        async with wrap_stream(stream, encodings=(Encoding.RAW,)) as client:
            with pytest.raises(RemoteProtocolError, match="type 99"):
                await client.wait_for(Bell, 5)
        nursery.cancel_scope.cancel()


async def test_aclient_unobserved_protocol_error_fails_on_exit() -> None:
    async def server(stream: trio.abc.Stream) -> None:
        await serve_handshake(stream, 1)
        await stream.send_all(u8(99))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        with pytest.raises(RemoteProtocolError, match="type 99"):
            async with wrap_stream(stream, encodings=(Encoding.RAW,)):
                await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_aclient_body_exception_is_not_wrapped() -> None:
    async def server(stream: trio.abc.Stream) -> None:
        await serve_handshake(stream, 1)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        with pytest.raises(KeyError):
            async with wrap_stream(stream, encodings=(Encoding.RAW,)):
                raise KeyError("from the body")
        nursery.cancel_scope.cancel()


async def test_aclient_connection_closed() -> None:
    async def server(stream: trio.abc.Stream) -> None:
        await serve_handshake(stream, 1)
        await stream.send_all(u8(2))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        async with wrap_stream(stream, encodings=(Encoding.RAW,)) as client:
            assert await client.wait_for(Bell, 5) == Bell()
            assert await client.wait_for(ConnectionClosed, 5) == ConnectionClosed()
            with pytest.raises(ConnectionClosedError):
                await client.wait_for(Bell, 5)
        with pytest.raises(trio.ClosedResourceError):
            await client.send(b"late")  # fails at once, no writer to wait for


async def test_aclient_handshake_refused() -> None:
    async def server(stream: trio.abc.Stream) -> None:
        await stream.send_all(VERSION_38 + u8(1) + u8(2) + bytes(16))
        await recv_exactly(stream, 12 + 1 + 16)
        await stream.send_all(u32(1) + u32(5) + b"nope!")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        with pytest.raises(HandshakeError, match="nope!"):
            async with wrap_stream(stream, vnc_password="x"):
                pass


async def test_aclient_kasm_setup_order() -> None:
    encodings = (Encoding.RAW,)
    got: dict[str, bytes] = {}

    async def server(stream: trio.abc.Stream) -> None:
        await stream.send_all(VERSION_38 + u8(1) + u8(1))
        await recv_exactly(stream, 13)
        await stream.send_all(u32(0))
        await recv_exactly(stream, 1)
        await stream.send_all(server_init())
        got["setup"] = await recv_exactly(stream, 20 + 6 + 8)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        async with wrap_stream(
            stream, dialect="kasm", pixel_format=RGB565, encodings=encodings,
            kasm_video_encoders=[-1025],
        ):
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    setup = got["setup"]
    assert setup[0] == 0 and setup[4:20] == RGB565.pack()
    assert setup[20:26] == u8(184) + u8(1) + s32(-1025)
    assert setup[26:] == u8(2) + u8(0) + u16(1) + s32(0)


async def test_aclient_vencrypt_x509plain_over_real_tls() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    got: dict[str, bytes] = {}

    async def server(stream: trio.abc.Stream) -> None:
        await stream.send_all(VERSION_38 + u8(1) + u8(19))
        assert await recv_exactly(stream, 13) == VERSION_38 + u8(19)
        await stream.send_all(u8(0) + u8(2))
        assert await recv_exactly(stream, 2) == b"\x00\x02"
        await stream.send_all(u8(0) + u8(2) + u32(259) + u32(262))
        assert await recv_exactly(stream, 4) == u32(262)
        await stream.send_all(u8(1))
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls.do_handshake()
        lengths = await recv_exactly(tls, 8)
        ulen, plen = struct.unpack(">II", lengths)
        got["creds"] = await recv_exactly(tls, ulen + plen)
        await tls.send_all(u32(0))
        assert await recv_exactly(tls, 1) == u8(1)
        await tls.send_all(server_init())
        await recv_exactly(tls, 8)  # SetEncodings with one encoding
        await tls.send_all(u8(2))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        stream = await run_with_server(nursery, server)
        async with wrap_stream(
            stream, username="ann", password="sésame", ssl_context=client_ctx,
            server_hostname="localhost", encodings=(Encoding.RAW,),
        ) as client:
            assert isinstance(client.stream, trio.SSLStream)
            assert await client.wait_for(Bell, 5) == Bell()
            assert StartTLS(262) in client.handshake_events
        nursery.cancel_scope.cancel()
    assert got["creds"] == b"ann" + "sésame".encode()


async def test_open_test_client_over_tcp() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await serve_handshake(stream, 1)
        await stream.send_all(update(rect(0, 0, 1, 1, Encoding.RAW, bgrx(4, 5, 6))))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_test_client("127.0.0.1", port, encodings=(Encoding.RAW,)) as client:
            arrived, upd = await client.next_update_with_time(timeout=5)
            assert arrived <= trio.current_time()
            assert upd.pixel_rects == ((Rect(0, 0, 1, 1), Encoding.RAW),)
            assert client.framebuffer[0, 0, :3].tolist() == [6, 5, 4]
        nursery.cancel_scope.cancel()

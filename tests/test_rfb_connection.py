"""The server state machine, driven byte by byte as a client would drive it.

Client bytes here are written out by hand from RFC 6143 / rfbproto, not with
trivnc's own writers, so a shared misunderstanding cannot hide."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trivnc.geometry import Rect
from trivnc.rfb import events as ev
from trivnc.rfb.auth import vnc_auth_response
from trivnc.rfb.connection import (
    NEED_DATA,
    Dialect,
    Limits,
    SecurityConfig,
    ServerConnection,
    State,
)
from trivnc.rfb.constants import VeNCryptSubtype
from trivnc.rfb.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from trivnc.rfb.pixelformat import RGB565, PixelFormat

ZERO_CHALLENGE = bytes(16)


def drain(conn: ServerConnection) -> list[ev.Event]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, ev.Event)
        out.append(event)
    return out


def new(**kw: object) -> ServerConnection:
    security = kw.pop("security", SecurityConfig(allow_none=True))
    assert isinstance(security, SecurityConfig)
    return ServerConnection(security, random_bytes=bytes, **kw)  # type: ignore[arg-type]


def connected(dialect: Dialect = Dialect.STANDARD, **kw: object) -> ServerConnection:
    """A connection through the handshake to the normal phase (3.8, None)."""
    conn = new(dialect=dialect, **kw)
    conn.receive_data(b"RFB 003.008\n\x01\x01")
    events = drain(conn)
    assert isinstance(events[-1], ev.ClientInit)
    conn.send_server_init(640, 480, "test")
    conn.data_to_send()
    return conn


# -- handshake ---------------------------------------------------------------------


def test_38_none_handshake_bytes() -> None:
    conn = new()
    assert conn.data_to_send() == b"RFB 003.008\n"
    conn.receive_data(b"RFB 003.008\n")
    assert drain(conn) == []
    assert conn.data_to_send() == b"\x01\x01"  # one type: None
    conn.receive_data(b"\x01")
    assert drain(conn) == [ev.AuthenticationSucceeded(1, None)]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"  # 3.8 sends SecurityResult OK after None
    conn.receive_data(b"\x00")
    assert drain(conn) == [ev.ClientInit(shared=False)]
    conn.send_server_init(1280, 720, "désk")
    init = conn.data_to_send()
    width, height = struct.unpack(">HH", init[:4])
    assert (width, height) == (1280, 720)
    pf = PixelFormat.unpack(init[4:20])
    assert (pf.bits_per_pixel, pf.depth, pf.red_shift, pf.green_shift, pf.blue_shift) == (
        32,
        24,
        16,
        8,
        0,
    )
    (name_len,) = struct.unpack(">I", init[20:24])
    assert init[24:].decode() == "désk" and name_len == len("désk".encode())
    assert conn.state is State.NORMAL


def test_37_none_skips_security_result() -> None:
    conn = new()
    conn.receive_data(b"RFB 003.007\n\x01")
    assert drain(conn) == [ev.AuthenticationSucceeded(1, None)]
    assert conn.data_to_send() == b"RFB 003.008\n\x01\x01"
    conn.receive_data(b"\x01")
    assert drain(conn) == [ev.ClientInit(shared=True)]


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (b"003.003", 3),
        (b"003.005", 3),
        (b"003.006", 3),
        (b"003.007", 7),
        (b"003.008", 8),
        (b"003.889", 8),
    ],
)
def test_odd_versions_map_like_kasmvnc(version: bytes, expected: int) -> None:
    conn = new()
    conn.receive_data(b"RFB " + version + b"\n")
    drain(conn)
    assert conn.version == expected


@pytest.mark.parametrize(
    "data", [b"RFB 004.000\n", b"RFB 003.00x\n", b"HTTP/1.1 200", b"RFB 003.008 "]
)
def test_bad_versions_are_refused(data: bytes) -> None:
    conn = new()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    # Sticky: every later call raises too.
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"x")


def test_33_server_picks_vnc_auth() -> None:
    conn = new(security=SecurityConfig(allow_none=True, vnc_password="pw"))
    conn.data_to_send()
    conn.receive_data(b"RFB 003.003\n")
    assert drain(conn) == []
    assert conn.data_to_send() == b"\x00\x00\x00\x02" + ZERO_CHALLENGE
    conn.receive_data(vnc_auth_response("pw", ZERO_CHALLENGE))
    assert drain(conn) == [ev.AuthenticationSucceeded(2, None)]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"


def test_33_none_has_no_security_result() -> None:
    conn = new()
    conn.data_to_send()
    conn.receive_data(b"RFB 003.003\n\x01")
    assert drain(conn) == [ev.AuthenticationSucceeded(1, None), ev.ClientInit(shared=True)]
    assert conn.data_to_send() == b"\x00\x00\x00\x01"


def test_33_refused_when_only_vencrypt() -> None:
    conn = new(security=SecurityConfig(vencrypt_subtypes=(VeNCryptSubtype.TLS_PLAIN,)))
    conn.data_to_send()
    conn.receive_data(b"RFB 003.003\n")
    with pytest.raises(RemoteProtocolError, match=r"3\.7"):
        conn.next_event()
    out = conn.data_to_send()
    assert out[:4] == b"\x00\x00\x00\x00"
    (length,) = struct.unpack(">I", out[4:8])
    assert b"VeNCrypt" in out[8 : 8 + length]


@pytest.mark.parametrize("version", [b"003.003", b"003.007", b"003.008"])
def test_vnc_auth_wrong_password(version: bytes) -> None:
    conn = new(security=SecurityConfig(vnc_password="right"))
    conn.receive_data(b"RFB " + version + b"\n")
    drain(conn)
    if version != b"003.003":
        conn.receive_data(b"\x02")
        drain(conn)
    conn.data_to_send()
    conn.receive_data(vnc_auth_response("wrong", ZERO_CHALLENGE))
    with pytest.raises(AuthenticationFailed):
        conn.next_event()
    out = conn.data_to_send()
    assert out[:4] == b"\x00\x00\x00\x01"
    if version == b"003.008":
        assert out[8:] == b"authentication failed"
    else:
        assert out == b"\x00\x00\x00\x01"  # no reason before 3.8
    assert conn.state is State.ERROR


def test_vnc_auth_uses_only_eight_password_bytes() -> None:
    conn = new(security=SecurityConfig(vnc_password="12345678-ignored"))
    conn.receive_data(b"RFB 003.008\n\x02")
    drain(conn)
    conn.receive_data(vnc_auth_response("12345678", ZERO_CHALLENGE))
    assert drain(conn) == [ev.AuthenticationSucceeded(2, None)]


def test_client_choosing_unoffered_type_fails() -> None:
    conn = new(security=SecurityConfig(vnc_password="pw"))
    conn.receive_data(b"RFB 003.008\n\x01")
    with pytest.raises(RemoteProtocolError, match="not offered"):
        conn.next_event()


def _vencrypt_to_subtype(subtypes: tuple[VeNCryptSubtype, ...]) -> ServerConnection:
    conn = new(security=SecurityConfig(vencrypt_subtypes=subtypes))
    conn.data_to_send()
    conn.receive_data(b"RFB 003.008\n\x13")
    assert drain(conn) == []
    assert conn.data_to_send() == b"\x01\x13\x00\x02"  # [VeNCrypt], then version 0.2
    conn.receive_data(b"\x00\x02")
    assert drain(conn) == []
    expected = b"\x00" + bytes((len(subtypes),)) + b"".join(struct.pack(">I", s) for s in subtypes)
    assert conn.data_to_send() == expected
    return conn


def _plain(user: bytes, password: bytes) -> bytes:
    return struct.pack(">II", len(user), len(password)) + user + password


def test_vencrypt_plain_accept() -> None:
    conn = _vencrypt_to_subtype((VeNCryptSubtype.PLAIN,))
    conn.receive_data(struct.pack(">I", 256) + _plain("älice".encode(), b"s3cret"))
    assert drain(conn) == [ev.CredentialsReceived("älice", "s3cret")]
    conn.accept_credentials()
    assert drain(conn) == [ev.AuthenticationSucceeded(19, "älice")]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"
    assert conn.username == "älice"


def test_vencrypt_plain_reject_sends_reason() -> None:
    conn = _vencrypt_to_subtype((VeNCryptSubtype.PLAIN,))
    conn.receive_data(struct.pack(">I", 256) + _plain(b"bob", b"nope"))
    drain(conn)
    exc = conn.reject_credentials("wrong password")
    assert isinstance(exc, AuthenticationFailed)
    assert conn.data_to_send() == b"\x00\x00\x00\x01" + struct.pack(">I", 14) + b"wrong password"
    with pytest.raises(AuthenticationFailed):
        conn.next_event()


def test_vencrypt_tls_plain_hands_tls_to_io_layer() -> None:
    conn = _vencrypt_to_subtype((VeNCryptSubtype.X509_PLAIN, VeNCryptSubtype.TLS_PLAIN))
    conn.receive_data(struct.pack(">I", 262))
    assert drain(conn) == [ev.StartTLS(x509=True)]
    assert conn.data_to_send() == b"\x01"
    with pytest.raises(LocalProtocolError):
        conn.accept_credentials()  # not yet: TLS first
    conn.tls_established()
    assert conn.over_tls
    conn.receive_data(_plain(b"u", b"p"))
    assert drain(conn) == [ev.CredentialsReceived("u", "p")]


@pytest.mark.parametrize(
    "creds",
    [
        struct.pack(">II", 5000, 1) + b"x",  # overlong username, refused before it arrives
        _plain(b"\xff\xfe", b"pw"),  # not UTF-8
    ],
)
def test_vencrypt_bad_credentials(creds: bytes) -> None:
    conn = _vencrypt_to_subtype((VeNCryptSubtype.PLAIN,))
    conn.receive_data(struct.pack(">I", 256) + creds)
    with pytest.raises(AuthenticationFailed):
        drain(conn)


def test_vencrypt_wrong_version_and_subtype() -> None:
    conn = new(security=SecurityConfig(vencrypt_subtypes=(VeNCryptSubtype.PLAIN,)))
    conn.receive_data(b"RFB 003.008\n\x13\x00\x01")
    with pytest.raises(RemoteProtocolError, match="VeNCrypt version"):
        drain(conn)
    conn = _vencrypt_to_subtype((VeNCryptSubtype.PLAIN,))
    conn.receive_data(struct.pack(">I", 259))
    with pytest.raises(RemoteProtocolError, match="not offered"):
        drain(conn)


def test_methods_in_wrong_state_are_local_errors() -> None:
    conn = new()
    with pytest.raises(LocalProtocolError):
        conn.send_server_init(1, 1, "x")
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


# -- normal phase ------------------------------------------------------------------


def pixel_format_msg(pf: PixelFormat) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack(
        ">BBBBHHHBBB3x",
        pf.bits_per_pixel,
        pf.depth,
        pf.big_endian,
        pf.true_colour,
        pf.red_max,
        pf.green_max,
        pf.blue_max,
        pf.red_shift,
        pf.green_shift,
        pf.blue_shift,
    )


def test_standard_messages() -> None:
    conn = connected()
    stream = b"".join(
        [
            pixel_format_msg(RGB565),
            b"\x02\x00\x00\x02" + struct.pack(">ii", 16, -223),
            b"\x03\x00" + struct.pack(">HHHH", 1, 2, 3, 4),
            b"\x04\x01\x00\x00" + struct.pack(">I", 0xFF0D),
            b"\x05\x81" + struct.pack(">HH", 10, 20),
            b"\x06\x00\x00\x00" + struct.pack(">I", 3) + "é!x".encode("latin-1"),
            b"\xfa\x00\x01\x03",
            b"\xfb\x00"
            + struct.pack(">HHB", 800, 600, 1)
            + b"\x00"
            + struct.pack(">IHHHHI", 7, 0, 0, 800, 600, 0),
            b"\xff\x00" + struct.pack(">HII", 1, 0x61, 0x1E),
        ]
    )
    conn.receive_data(stream)
    assert drain(conn) == [
        ev.SetPixelFormat(RGB565),
        ev.SetEncodings((16, -223)),
        ev.FramebufferUpdateRequest(False, Rect(1, 2, 3, 4)),
        ev.KeyEvent(0xFF0D, True),
        ev.PointerEvent(10, 20, 0x81),  # bit 7 is plain "back" until extended buttons are confirmed
        ev.ClientCutText("é!x"),
        ev.XvpRequest(1, 3),
        ev.SetDesktopSize(800, 600, (ev.Screen(7, 0, 0, 800, 600, 0),)),
        ev.QEMUKeyEvent(0x61, 0x1E, True),
    ]
    assert conn.pixel_format == RGB565
    assert conn.capabilities.desktop_size
    assert conn.capabilities.preferred == (16, 0)


def test_colour_map_pixel_format_refused() -> None:
    conn = connected()
    bad = bytearray(pixel_format_msg(RGB565))
    bad[7] = 0  # true-colour flag off
    conn.receive_data(bytes(bad))
    with pytest.raises(RemoteProtocolError, match="colour-map"):
        conn.next_event()


def test_extended_mouse_buttons_after_confirmation() -> None:
    conn = connected()
    conn.extended_mouse_buttons = True
    conn.receive_data(
        b"\x05\x81" + struct.pack(">HH", 1, 2) + b"\x03" + b"\x05\x01" + struct.pack(">HH", 3, 4)
    )
    assert drain(conn) == [ev.PointerEvent(1, 2, 0x01 | 0x180), ev.PointerEvent(3, 4, 1)]


def test_kasm_dialect_pointer_and_messages() -> None:
    conn = connected(Dialect.KASM)
    clip = (
        b"\xb4\x02"
        + b"\x0atext/plain"
        + struct.pack(">I", 2)
        + b"hi"
        + b"\x09image/png"
        + struct.pack(">I", 0)
    )
    conn.receive_data(
        b"\x05"
        + struct.pack(">HHHhh", 0x101, 5, 6, -3, 2)
        + b"\xb2\x00\x00\x00"
        + b"\xb3\x00\x00\x00"
        + struct.pack(">II", 60, 4)
        + clip
        + b"\xb8\x02"
        + struct.pack(">ii", 7, -1024)
        + b"\xb9"
        + b"\xfc"
        + struct.pack(">HH", 1920, 1080)
        + b"\x06\x00\x00\x00"
        + struct.pack(">I", 2)
        + b"ok"  # old cut text: ignored
        + b"\xbd\x00\x00\x00"
        + struct.pack(">I", 9)
    )
    assert drain(conn) == [
        ev.PointerEvent(5, 6, 0x101, -3, 2),
        ev.KasmRequestStats(),
        ev.KasmFrameStats(60, 4),
        ev.KasmBinaryClipboard((("text/plain", b"hi"), ("image/png", b""))),
        ev.KasmVideoEncodersRequest((7, -1024)),
        ev.KasmKeepAlive(),
        ev.KasmSetMaxVideoResolution(1920, 1080),
        ev.KasmUnsupported(189),
    ]


@pytest.mark.parametrize("msg_type", [178, 179, 180, 184, 185, 252, 7, 99])
def test_kasm_and_unknown_messages_refused_in_standard_dialect(msg_type: int) -> None:
    conn = connected()
    conn.receive_data(bytes((msg_type,)) + bytes(16))
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        conn.next_event()


def test_fence_request_is_answered_at_once() -> None:
    conn = connected()
    conn.receive_data(b"\x02\x00\x00\x01" + struct.pack(">i", -312))
    drain(conn)
    assert conn.data_to_send() == b"\xf8\x00\x00\x00\x80\x00\x00\x00\x00"  # our first fence
    flags = 0x80000000 | 0x40 | 0x3  # request + an unknown bit + block before/after
    conn.receive_data(b"\xf8\x00\x00\x00" + struct.pack(">IB", flags, 3) + b"abc")
    assert drain(conn) == [ev.ClientFence(flags, b"abc")]
    assert conn.data_to_send() == b"\xf8\x00\x00\x00" + struct.pack(">IB", 0x3, 3) + b"abc"


def test_fence_payload_over_64_refused() -> None:
    conn = connected()
    conn.receive_data(b"\xf8\x00\x00\x00" + struct.pack(">IB", 0, 65))
    with pytest.raises(RemoteProtocolError, match="64"):
        conn.next_event()


def test_continuous_updates() -> None:
    conn = connected()
    conn.receive_data(b"\x96\x01" + struct.pack(">HHHH", 0, 0, 10, 10))
    with pytest.raises(RemoteProtocolError, match="pseudo-encoding"):
        conn.next_event()
    conn = connected()
    conn.receive_data(b"\x02\x00\x00\x01" + struct.pack(">i", -313))
    drain(conn)
    assert conn.data_to_send() == b"\x96"  # EndOfContinuousUpdates on first sight
    conn.receive_data(b"\x96\x01" + struct.pack(">HHHH", 0, 0, 10, 10))
    assert drain(conn) == [ev.EnableContinuousUpdates(True, Rect(0, 0, 10, 10))]
    assert conn.continuous_updates == Rect(0, 0, 10, 10)
    assert conn.data_to_send() == b""
    conn.receive_data(b"\x96\x00" + struct.pack(">HHHH", 0, 0, 0, 0))
    drain(conn)
    assert conn.continuous_updates is None
    assert conn.data_to_send() == b"\x96"


def _ext_cut(flags: int, body: bytes) -> bytes:
    return b"\x06\x00\x00\x00" + struct.pack(">iI", -(4 + len(body)), flags) + body


def test_extended_clipboard() -> None:
    conn = connected()
    conn.receive_data(b"\x02\x00\x00\x01" + struct.pack(">I", 0xC0A1E5CE))
    drain(conn)
    caps = conn.data_to_send()
    assert caps[:4] == b"\x03\x00\x00\x00"
    (length,) = struct.unpack(">i", caps[4:8])
    (flags,) = struct.unpack(">I", caps[8:12])
    assert length == -8 and flags & 0x01000000 and flags & 1  # caps, text
    text = "line1\r\nłine2\0".encode()
    provide = zlib.compress(struct.pack(">I", len(text)) + text)
    conn.receive_data(
        _ext_cut(0x01000000 | 0x1, struct.pack(">I", 4096))
        + _ext_cut(0x02000000 | 0x1, b"")
        + _ext_cut(0x08000000 | 0x1, b"")
        + _ext_cut(0x10000000 | 0x1, provide)
    )
    events = drain(conn)
    assert events[0] == ev.ClipboardCaps(0x01000000 & 0x1F000000, {1: 4096})
    assert events[1] == ev.ClipboardRequest(1)
    assert events[2] == ev.ClipboardNotify(1)
    assert isinstance(events[3], ev.ClipboardProvide) and events[3].text == "line1\nłine2"


def test_clipboard_bomb_refused() -> None:
    conn = connected(limits=Limits(max_cut_text=1000))
    conn.receive_data(b"\x02\x00\x00\x01" + struct.pack(">I", 0xC0A1E5CE))
    drain(conn)
    bomb = zlib.compress(struct.pack(">I", 10**6) + bytes(10**6))
    assert len(bomb) < 1000
    conn.receive_data(_ext_cut(0x10000000 | 0x1, bomb))
    with pytest.raises(RemoteProtocolError, match="beyond the limit"):
        conn.next_event()


@pytest.mark.parametrize(
    "message",
    [
        b"\x06\x00\x00\x00" + struct.pack(">I", 0x7FFFFFFF),  # cut text: 2 GiB declared
        b"\x06\x00\x00\x00" + struct.pack(">i", -100),  # extended without negotiation
        b"\x02\x00\xff\xff",  # 65535 encodings
    ],
)
def test_declared_lengths_are_bounded_before_data_arrives(message: bytes) -> None:
    conn = connected(limits=Limits(max_cut_text=1 << 20))
    conn.receive_data(message)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_kasm_clipboard_bounds() -> None:
    conn = connected(Dialect.KASM, limits=Limits(max_cut_text=100))
    conn.receive_data(b"\xb4\x01\x04text" + struct.pack(">I", 101))
    with pytest.raises(RemoteProtocolError, match="limit"):
        conn.next_event()


# -- properties over arbitrary input ------------------------------------------------

SESSION = b"".join(
    [
        b"RFB 003.008\n\x02",
        vnc_auth_response("pw", ZERO_CHALLENGE),
        b"\x01",
        pixel_format_msg(RGB565),
        b"\x02\x00\x00\x03" + struct.pack(">iii", 7, -312, -313),
        b"\x03\x01" + struct.pack(">HHHH", 0, 0, 640, 480),
        b"\xf8\x00\x00\x00" + struct.pack(">IB", 0x80000001, 2) + b"id",
        b"\x04\x00\x00\x00" + struct.pack(">I", 0x41),
        b"\x05\x00" + struct.pack(">HH", 7, 8),
        b"\x06\x00\x00\x00" + struct.pack(">I", 5) + b"hello",
        b"\x96\x00" + struct.pack(">HHHH", 0, 0, 0, 0),
    ]
)


def run_split(chunks: list[bytes]) -> tuple[list[ev.Event], bytes]:
    conn = new(security=SecurityConfig(vnc_password="pw"))
    events: list[ev.Event] = []
    out = bytearray()
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
        if conn.state is State.SERVER_INIT_PENDING:
            conn.send_server_init(640, 480, "x")
            events += drain(conn)
        out += conn.data_to_send()
    return events, bytes(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(SESSION)), max_size=20))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [SESSION[a:b] for a, b in zip([0, *points], [*points, len(SESSION)], strict=True)]
    assert run_split(chunks) == run_split([SESSION])


@pytest.mark.parametrize("dialect", list(Dialect))
@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(dialect: Dialect, data: bytes) -> None:
    conn = connected(
        dialect, security=SecurityConfig(allow_none=True), limits=Limits(max_cut_text=4096)
    )
    try:
        conn.receive_data(data)
        drain(conn)
    except ProtocolError:
        assert conn.state is State.ERROR
    assert len(conn.data_to_send()) < 10_000


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_handshake_bytes_only_raise_protocol_errors(data: bytes) -> None:
    conn = new(
        security=SecurityConfig(vnc_password="pw", vencrypt_subtypes=(VeNCryptSubtype.PLAIN,))
    )
    try:
        conn.receive_data(b"RFB 003.008\n" + data)
        for event in drain(conn):
            if isinstance(event, ev.CredentialsReceived):
                conn.reject_credentials()
    except ProtocolError:
        pass

"""The fuzzing harness for the RFB server state machine, shared by the fuzz
tests (`test_fuzz_protocol.py`, `test_fuzz_regression.py`), the network fuzz
test and the coverage-guided entry point (`fuzz_protocol.py`).

`drive()` plays one client byte stream into a `ServerConnection` the way the
I/O layer does (feed a chunk, pull events until NEED_DATA, answer the events
that need the application, send the replies) and checks after every step:

- nothing but `ProtocolError` escapes, and once raised it is sticky: the state
  stays ERROR and every later call raises the same error;
- unparsed input never exceeds the largest message `Limits` allow plus one
  received chunk (the buffer's storage, with its lazy compaction, at most
  twice that), so a peer cannot make the server hoard bytes;
- no event carries more than `Limits` allow, and Kasm-only events come out
  only in the Kasm dialect;
- replies stay within a small factor of what the client sent;
- events never outnumber the bytes that produced them (no parse loop).

Client bytes are built by hand from RFC 6143, rfbproto and KasmVNC's message
layouts, not with trivnc's writers."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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
from trivnc.rfb.constants import PseudoEncoding, SecurityType, VeNCryptSubtype
from trivnc.rfb.errors import ProtocolError

PASSWORD = "secret"
#: The harness's `random_bytes`: a zero challenge, so that VNC authentication
#: responses can be written into a stored byte stream.
CHALLENGE = bytes(16)
GOOD_VNC_RESPONSE = vnc_auth_response(PASSWORD, CHALLENGE)
SERVER_SIZE = (640, 480)

SECURITY_CONFIGS: dict[str, SecurityConfig] = {
    # RFB 3.3 gets VNC authentication here (the server picks).
    "all": SecurityConfig(
        allow_none=True,
        vnc_password=PASSWORD,
        vencrypt_subtypes=(
            VeNCryptSubtype.X509_PLAIN,
            VeNCryptSubtype.TLS_PLAIN,
            VeNCryptSubtype.PLAIN,
        ),
    ),
    "none": SecurityConfig(allow_none=True),
    "vnc": SecurityConfig(vnc_password=PASSWORD),
    # RFB 3.3 is refused here.
    "vencrypt": SecurityConfig(
        vencrypt_subtypes=(VeNCryptSubtype.X509_PLAIN, VeNCryptSubtype.PLAIN)
    ),
}

#: Small bounds, so that random length fields cross them often and the
#: buffering bound below means something.
SMALL_LIMITS = Limits(
    max_cut_text=4096, max_encodings=64, max_username=64, max_password=64, max_clipboard_items=4
)
DEFAULT_LIMITS = Limits()
#: Nothing at all: every length-bearing message is over the limit.
ZERO_LIMITS = Limits(
    max_cut_text=0, max_encodings=0, max_username=0, max_password=0, max_clipboard_items=0
)

#: Events only the Kasm dialect may produce, and the ones it must not.
KASM_ONLY = ev.KASM_EVENTS
STANDARD_ONLY = (ev.ClientCutText,)

#: Replies may be at most this many times what the client sent (plus the
#: fixed handshake replies): an Extended Clipboard caps reply to an 8-byte
#: SetEncodings is 16 bytes, a fence reply as long as the request.
REPLY_FACTOR = 3
REPLY_SLACK = 4096


def max_message_size(limits: Limits) -> int:
    """The longest client message (or handshake step) a connection with these
    limits may wait for, from the message layouts rather than the parser."""
    u8 = 255
    return max(
        12,  # ProtocolVersion
        16,  # VNC authentication response
        8 + limits.max_username + limits.max_password,  # VeNCrypt Plain
        20,  # SetPixelFormat
        4 + 4 * limits.max_encodings,  # SetEncodings
        8 + limits.max_cut_text,  # ClientCutText, Extended Clipboard
        9 + 64,  # ClientFence
        8 + 16 * u8,  # SetDesktopSize: U8 screen count
        12,  # QEMU extended key event
        2 + limits.max_clipboard_items * (1 + u8 + 4) + limits.max_cut_text,  # Kasm 180
        3 + limits.max_cut_text,  # Kasm 181
        2 + u8,  # Kasm 182
        6 + u8 + limits.max_cut_text,  # Kasm 183
        2 + 4 * u8,  # Kasm 184
    )


# -- client messages, written out by hand --------------------------------------------


def set_pixel_format(pf: bytes) -> bytes:
    assert len(pf) == 16
    return b"\x00\x00\x00\x00" + pf


def set_encodings(encodings: Sequence[int]) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings)


def update_request(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, incremental, x, y, w, h)


def key_event(down: bool, keysym: int) -> bytes:
    return struct.pack(">BBxxI", 4, down, keysym)


def pointer_event(mask: int, x: int, y: int) -> bytes:
    return struct.pack(">BBHH", 5, mask, x, y)


def extended_pointer_event(mask: int, x: int, y: int, more: int) -> bytes:
    """7 bytes once ExtendedMouseButtons is on: bit 7 says a byte follows."""
    return struct.pack(">BBHHB", 5, mask | 0x80, x, y, more)


def kasm_pointer_event(mask: int, x: int, y: int, sx: int, sy: int) -> bytes:
    return struct.pack(">BHHHhh", 5, mask, x, y, sx, sy)


def cut_text(text: bytes) -> bytes:
    return struct.pack(">Bxxxi", 6, len(text)) + text


def extended_clipboard(flags: int, body: bytes = b"") -> bytes:
    """Extended Clipboard: ClientCutText with a negative length."""
    return struct.pack(">BxxxiI", 6, -(4 + len(body)), flags) + body


def clipboard_provide(items: dict[int, bytes]) -> bytes:
    flags = 1 << 28
    raw = b""
    for bit in range(16):
        if (1 << bit) in items:
            flags |= 1 << bit
            data = items[1 << bit]
            raw += struct.pack(">I", len(data)) + data
    return extended_clipboard(flags, zlib.compress(raw))


def enable_continuous_updates(enable: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 150, enable, x, y, w, h)


def fence(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxIB", 248, flags, len(payload)) + payload


def xvp(version: int, code: int) -> bytes:
    return struct.pack(">BxBB", 250, version, code)


def set_desktop_size(
    w: int, h: int, screens: Sequence[tuple[int, int, int, int, int, int]]
) -> bytes:
    out = struct.pack(">BxHHBx", 251, w, h, len(screens))
    return out + b"".join(struct.pack(">IHHHHI", *s) for s in screens)


def qemu_key_event(down: bool, keysym: int, keycode: int) -> bytes:
    return struct.pack(">BBHII", 255, 0, down, keysym, keycode)


def kasm_request_stats() -> bytes:
    return struct.pack(">Bxxx", 178)


def kasm_frame_stats(all_: int, render: int) -> bytes:
    return struct.pack(">BxxxII", 179, all_, render)


def kasm_binary_clipboard(items: Sequence[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack(">BB", 180, len(items))
    for mime, data in items:
        out += struct.pack(">B", len(mime)) + mime + struct.pack(">I", len(data)) + data
    return out


def kasm_upgrade_to_udp(payload: bytes) -> bytes:
    return struct.pack(">BH", 181, len(payload)) + payload


def kasm_subscribe_unix_relay(name: bytes) -> bytes:
    return struct.pack(">BB", 182, len(name)) + name


def kasm_unix_relay(name: bytes, data: bytes) -> bytes:
    return struct.pack(">BB", 183, len(name)) + name + struct.pack(">I", len(data)) + data


def kasm_video_encoders(encodings: Sequence[int]) -> bytes:
    return struct.pack(f">BB{len(encodings)}i", 184, len(encodings), *encodings)


def kasm_keep_alive() -> bytes:
    return b"\xb9"


def kasm_fixed(message_type: int, body: bytes) -> bytes:
    """188 (10 bytes), 189 (8), 190 and 191 (4): messages trivnc skips."""
    return bytes((message_type,)) + body


def kasm_max_video_resolution(w: int, h: int) -> bytes:
    return struct.pack(">BHH", 252, w, h)


# -- handshakes ----------------------------------------------------------------------

ROUTE_TYPES = {
    "none": SecurityType.NONE,
    "vnc": SecurityType.VNC_AUTH,
    "plain": SecurityType.VENCRYPT,
    "tls-plain": SecurityType.VENCRYPT,
    "x509-plain": SecurityType.VENCRYPT,
}
ROUTE_SUBTYPES = {
    "plain": VeNCryptSubtype.PLAIN,
    "tls-plain": VeNCryptSubtype.TLS_PLAIN,
    "x509-plain": VeNCryptSubtype.X509_PLAIN,
}


def routes(security: SecurityConfig, version: bytes) -> list[str]:
    """The security routes a client of `version` can take with this server
    (for RFB 3.3 the server picks: one route, or none when it refuses)."""
    offered = security.offered_types()
    if int(version[4:7]) == 3 and int(version[8:11]) < 7:
        legacy = [t for t in offered if t in (SecurityType.VNC_AUTH, SecurityType.NONE)]
        return ["none" if legacy[0] == SecurityType.NONE else "vnc"] if legacy else []
    out = []
    for route, stype in ROUTE_TYPES.items():
        if stype in offered and (
            route not in ROUTE_SUBTYPES or ROUTE_SUBTYPES[route] in security.vencrypt_subtypes
        ):
            out.append(route)
    return out


def handshake(
    version: bytes,
    route: str | None,
    *,
    vnc_response: bytes = GOOD_VNC_RESPONSE,
    username: bytes = b"user",
    password: bytes = PASSWORD.encode(),
    shared: bool = True,
) -> bytes:
    """A client's side of the handshake up to and including ClientInit.
    `version` is the 12-byte ProtocolVersion; `route` None means the server
    refuses (RFB 3.3 with VeNCrypt only), so only the version is sent."""
    out = version
    if route is None:
        return out
    legacy = version[:4] == b"RFB " and version[8:11].isdigit() and int(version[8:11]) < 7
    if not legacy:
        out += bytes((ROUTE_TYPES[route],))
    if route == "vnc":
        out += vnc_response
    elif route in ROUTE_SUBTYPES:
        out += b"\x00\x02" + struct.pack(">I", ROUTE_SUBTYPES[route])
        out += struct.pack(">II", len(username), len(password)) + username + password
    return out + bytes((shared,))


def version_string(minor: int, major: int = 3) -> bytes:
    return b"RFB %03d.%03d\n" % (major, minor)


# -- driving a connection ------------------------------------------------------------


@dataclass
class Outcome:
    events: list[ev.Event] = field(default_factory=list)
    error: ProtocolError | None = None
    replies: bytes = b""
    state: State = State.VERSION

    def key(self) -> tuple[object, ...]:
        """What must not depend on how the stream was chunked."""
        error = None if self.error is None else (type(self.error), self.error.reason)
        return (self.events, error, self.replies, self.state)


class InvariantViolation(AssertionError):
    """The state machine broke one of the harness's invariants."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


def check_event(event: object, dialect: Dialect, limits: Limits) -> None:
    _check(isinstance(event, ev.Event), f"next_event() returned {event!r}")
    # `dialect` is the connection's dialect when the event came out: AUTO
    # while undecided, when neither dialect's own messages can have been read.
    if dialect is not Dialect.KASM:
        _check(not isinstance(event, KASM_ONLY), f"Kasm event {event!r} in the standard dialect")
    if dialect is not Dialect.STANDARD:
        _check(not isinstance(event, STANDARD_ONLY), f"{event!r} in the Kasm dialect")
    match event:
        case ev.CredentialsReceived(username=username, password=password):
            _check(len(username.encode()) <= limits.max_username, "user name over the limit")
            _check(len(password.encode()) <= limits.max_password, "password over the limit")
        case ev.SetEncodings(encodings=encodings):
            _check(len(encodings) <= limits.max_encodings, "more encodings than the limit")
        case ev.ClientCutText(text=text):
            _check(len(text) <= limits.max_cut_text, "cut text over the limit")
        case ev.ClipboardProvide(data=data):
            _check(sum(map(len, data.values())) <= limits.max_cut_text, "clipboard over the limit")
            _check(all(0 < f <= 0x8000 and f & (f - 1) == 0 for f in data), "bad format bit")
        case ev.ClipboardCaps(max_sizes=sizes):
            _check(len(sizes) <= 16, "more than 16 clipboard formats")
        case ev.KasmBinaryClipboard(items=items):
            _check(len(items) <= limits.max_clipboard_items, "more clipboard items than the limit")
            total = sum(len(data) for _, data in items)
            _check(total <= limits.max_cut_text, "binary clipboard over the limit")
            _check(all(len(mime) <= 255 for mime, _ in items), "mime type over 255 bytes")
        case ev.ClientFence(payload=payload):
            _check(len(payload) <= 64, "fence payload over 64 bytes")
        case ev.SetDesktopSize(width=w, height=h, screens=screens):
            _check(len(screens) <= 255 and 0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF, "bad layout")
        case ev.KasmVideoEncodersRequest(encodings=encodings):
            _check(len(encodings) <= 255, "more than 255 video encoders")
        case ev.FramebufferUpdateRequest(rect=rect) | ev.EnableContinuousUpdates(rect=rect):
            _check(all(0 <= v <= 0xFFFF for v in rect), f"rect {rect} out of the U16 range")
        case ev.PointerEvent(x=x, y=y, buttons=buttons):
            _check(0 <= x <= 0xFFFF and 0 <= y <= 0xFFFF and buttons >= 0, "bad pointer event")
        case _:
            pass


def _answer(conn: ServerConnection, event: ev.Event) -> None:
    """What the I/O layer does with the events that need the application."""
    match event:
        case ev.CredentialsReceived(password=password):
            if password == PASSWORD:
                conn.accept_credentials()
            else:
                conn.reject_credentials("wrong password")
        case ev.StartTLS():
            conn.tls_established()  # the I/O layer's TLS handshake, done
        case ev.ClientInit():
            conn.send_server_init(*SERVER_SIZE, "fuzz")
        case ev.SetEncodings(encodings=encodings):
            # The session confirms ExtendedMouseButtons in its next update.
            if PseudoEncoding.EXTENDED_MOUSE_BUTTONS in encodings:
                conn.extended_mouse_buttons = True
        case _:
            pass


def _check_sticky(conn: ServerConnection, error: ProtocolError) -> None:
    _check(conn.state is State.ERROR, f"state {conn.state.name} after {error!r}")
    _check(conn.error is error, "error() is not the raised error")
    calls: list[Callable[[], object]] = [
        lambda: conn.receive_data(b"\x00"),
        conn.next_event,
        conn.tls_established,
        conn.accept_credentials,
        lambda: conn.send_server_init(1, 1, "x"),
        conn.next_event,
    ]
    for call in calls:
        try:
            call()
        except ProtocolError as exc:
            _check(exc is error, f"a later call raised {exc!r}, not {error!r}")
        else:
            raise InvariantViolation(f"a call after {error!r} did not raise")
    _check(conn.state is State.ERROR, "left the ERROR state")


def _check_buffer(conn: ServerConnection, bound: int, chunk: int) -> None:
    buffer = conn._buffer
    _check(len(buffer) <= bound + chunk, f"{len(buffer)} bytes buffered (bound {bound} + {chunk})")
    stored = len(buffer._data)
    _check(stored <= 2 * (bound + chunk), f"{stored} bytes stored (bound {bound} + {chunk})")


def _check_dialect(conn: ServerConnection, chosen: Dialect, event: object) -> None:
    """Only AUTO changes its dialect, once, and says so with DialectSelected."""
    if chosen is not Dialect.AUTO:
        _check(conn.dialect is chosen, f"dialect {chosen.value} became {conn.dialect.value}")
        _check(not isinstance(event, ev.DialectSelected), f"{event!r} without AUTO")
    elif isinstance(event, ev.DialectSelected):
        _check(event.dialect is conn.dialect, f"{event!r} but the dialect is {conn.dialect}")
        _check(event.dialect is not Dialect.AUTO, "selected AUTO")
        previous = getattr(conn, "_fuzz_selected", None)
        _check(previous is None, f"{event!r} after {previous!r}")
        conn._fuzz_selected = event  # type: ignore[attr-defined]
    elif conn.dialect is not Dialect.AUTO:
        _check(getattr(conn, "_fuzz_selected", None) is not None, "dialect changed silently")


#: Fixed-size handshake steps up to the TLS go-ahead.
_HANDSHAKE_STEPS = {
    State.VERSION: 12,
    State.SECURITY_TYPE: 1,
    State.VENCRYPT_VERSION: 2,
    State.VENCRYPT_SUBTYPE: 4,
}


def drive(
    data: bytes,
    chunks: Iterator[int],
    *,
    security: SecurityConfig,
    dialect: Dialect,
    limits: Limits,
    lockstep: bool = True,
) -> Outcome:
    """Feed `data` in chunks of the sizes `chunks` yields (at least 1 each).
    With `lockstep`, chunks end where the handshake steps before TLS end, as
    a real client sends each step only after the server's reply to the one
    before (and must, for VeNCrypt's TLS go-ahead). Raises InvariantViolation,
    or whatever unexpected exception escapes."""
    conn = ServerConnection(security, dialect=dialect, limits=limits, random_bytes=bytes)
    bound = max_message_size(limits)
    out = Outcome()
    replies = bytearray(conn.data_to_send())
    fed = pos = 0
    try:
        _check(conn.next_event() is NEED_DATA, "an event before any data")
        while pos < len(data):
            size = max(1, next(chunks))
            step = _HANDSHAKE_STEPS.get(conn.state) if lockstep else None
            if step is not None:
                size = min(size, step - len(conn._buffer))
            chunk = data[pos : pos + size]
            pos += len(chunk)
            fed += len(chunk)
            conn.receive_data(chunk)
            _check_buffer(conn, bound, len(chunk))
            while (event := conn.next_event()) is not NEED_DATA:
                check_event(event, conn.dialect, limits)
                _check_dialect(conn, dialect, event)
                assert isinstance(event, ev.Event)
                out.events.append(event)
                _check(len(out.events) <= fed + 2, f"{len(out.events)} events from {fed} bytes")
                _answer(conn, event)
                replies += conn.data_to_send()
                _check_buffer(conn, bound, len(chunk))
            replies += conn.data_to_send()
            _check(
                len(replies) <= REPLY_FACTOR * fed + REPLY_SLACK,
                f"{len(replies)} bytes of replies to {fed} bytes",
            )
    except ProtocolError as exc:
        _check_sticky(conn, exc)
        out.error = exc
        replies += conn.data_to_send()
    out.replies = bytes(replies)
    out.state = conn.state
    return out


# -- chunkings and replay ------------------------------------------------------------


def whole() -> Iterator[int]:
    while True:
        yield 1 << 30


def bytewise() -> Iterator[int]:
    while True:
        yield 1


def seeded(data: bytes, salt: bytes = b"") -> Iterator[int]:
    """Chunk sizes from a PRNG seeded by the data: mostly small, some large."""
    rng = random.Random(hashlib.sha256(salt + data).digest())
    while True:
        yield rng.choice((1, 2, 3, rng.randint(1, 16), rng.randint(1, 300), rng.randint(1, 5000)))


CHUNKINGS: dict[str, Callable[[bytes], Iterator[int]]] = {
    "whole": lambda data: whole(),
    "seeded": seeded,
    "bytewise": lambda data: bytewise(),
}


def replay(
    data: bytes,
    *,
    chunkings: Sequence[str] = ("whole", "seeded", "bytewise"),
    limits: Sequence[Limits] = (SMALL_LIMITS, DEFAULT_LIMITS, ZERO_LIMITS),
) -> dict[tuple[str, Dialect, int], Outcome]:
    """Play `data` under every security configuration, both dialects, the
    given limits and chunkings. Checks the invariants of `drive()`, and that
    every chunking of the same stream gives the same events, error, replies
    and final state (in lockstep; once more whole and not in lockstep, for
    the invariants only). Returns the outcome per (configuration, dialect,
    limits index) from the first chunking."""
    results: dict[tuple[str, Dialect, int], Outcome] = {}
    for name, security in SECURITY_CONFIGS.items():
        for dialect in Dialect:
            for index, limit in enumerate(limits):
                first: Outcome | None = None
                for chunking in chunkings:
                    outcome = drive(
                        data,
                        CHUNKINGS[chunking](data),
                        security=security,
                        dialect=dialect,
                        limits=limit,
                    )
                    if first is None:
                        first = outcome
                    elif outcome.key() != first.key():
                        raise InvariantViolation(
                            f"{name}/{dialect.value}: chunking {chunking!r} gave "
                            f"{outcome.key()!r}, not {first.key()!r}"
                        )
                assert first is not None
                results[name, dialect, index] = first
                drive(
                    data, whole(), security=security, dialect=dialect, limits=limit, lockstep=False
                )
    return results

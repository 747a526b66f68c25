"""Property-based fuzzing of the RFB server state machine with Hypothesis.

Handshakes for every security type a SecurityConfig offers (None, VNC
authentication, VeNCrypt Plain, TLSPlain and X509Plain) and RFB 3.3, 3.7 and
3.8, then client messages: valid ones (which must come out as exactly their
events), and valid ones mutated (bit flips, truncation, splicing, interesting
values at length fields) mixed with random ones, in every dialect and random
chunkings. In Dialect.AUTO, the sessions decide the dialect as KasmVNC's
web client or a standard one does. The invariants are checked by `fuzz_harness.drive`.

The normal run is short and deterministic. `TRIVNC_FUZZ_EXAMPLES=N` runs N
examples per test with fresh randomness, for a separate fuzz session."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fuzz_harness as h
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context

from trivnc.rfb import connection
from trivnc.rfb import events as ev
from trivnc.rfb.connection import Dialect, ServerConnection, State
from trivnc.rfb.constants import PseudoEncoding
from trivnc.rfb.errors import RemoteProtocolError
from trivnc.rfb.pixelformat import BGR233, BGRX, RGB565, RGBX

FUZZ_EXAMPLES = int(os.environ.get("TRIVNC_FUZZ_EXAMPLES", "0"))
_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
if FUZZ_EXAMPLES > 0:
    _SETTINGS["max_examples"] = FUZZ_EXAMPLES
else:
    _SETTINGS.update(derandomize=True, database=None)


CRASHES = Path(__file__).resolve().parent.parent / "fixtures" / "fuzz" / "crashes"


def fuzz_settings(default_examples: int) -> settings:
    return settings(**{"max_examples": default_examples, **_SETTINGS})


@contextmanager
def kept_if_failing(stream: bytes) -> Iterator[None]:
    """Show the stream of a failing example; in a fuzz run, also keep the
    final (shrunk) one in fixtures/fuzz/crashes/ for test_fuzz_regression."""
    note(f"client stream: {stream.hex()}")
    try:
        yield
    except BaseException:
        if FUZZ_EXAMPLES and current_build_context().is_final:
            CRASHES.mkdir(parents=True, exist_ok=True)
            path = CRASHES / f"hypothesis-{hashlib.sha1(stream).hexdigest()[:16]}.bin"
            path.write_bytes(stream)
            note(f"saved to {path}")
        raise


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
s16 = st.integers(-0x8000, 0x7FFF)
u32 = st.integers(0, 0xFFFFFFFF)
s32 = st.integers(-0x80000000, 0x7FFFFFFF)

EXT_CLIPBOARD = PseudoEncoding.EXTENDED_CLIPBOARD
FEATURES = (
    PseudoEncoding.FENCE,
    PseudoEncoding.CONTINUOUS_UPDATES,
    PseudoEncoding.EXTENDED_CLIPBOARD,
    PseudoEncoding.EXTENDED_MOUSE_BUTTONS,
)
KNOWN_ENCODINGS = [0, 1, 2, 5, 6, 7, 16, -260, -23, -32, -247, -256, -412, -512, -763, -768]
KNOWN_ENCODINGS += [e.value for e in PseudoEncoding if e not in FEATURES]
KNOWN_ENCODINGS += [-1023, -1013, -1003, -991, -981, -971, -870, -1996, -1986, -2048, -1998]

#: A message's bytes and the event it must produce (None: none).
Message = tuple[bytes, "type[ev.Event] | None"]
Msgs = st.SearchStrategy[Message]


def _m(strategy: st.SearchStrategy[bytes], event: type[ev.Event] | None) -> Msgs:
    return strategy.map(lambda data: (data, event))


def valid_messages(dialect: Dialect, caps: frozenset[int]) -> Msgs:
    """Every client message the dialect knows, well formed for a client that
    announced `caps` in its first SetEncodings."""
    extras = st.lists(st.sampled_from(KNOWN_ENCODINGS) | s32, max_size=40).map(
        lambda more: [*caps, *(e for e in more if e != PseudoEncoding.EXTENDED_MOUSE_BUTTONS)]
    )
    formats = st.sampled_from([BGRX, RGBX, RGB565, BGR233]).map(lambda pf: pf.pack())
    kasm = dialect is Dialect.KASM
    options: list[Msgs] = [
        _m(formats.map(h.set_pixel_format), ev.SetPixelFormat),
        _m(extras.map(h.set_encodings), ev.SetEncodings),
        _m(
            st.builds(h.update_request, st.booleans(), u16, u16, u16, u16),
            ev.FramebufferUpdateRequest,
        ),
        _m(st.builds(h.key_event, st.booleans(), u32), ev.KeyEvent),
        _m(st.builds(h.cut_text, st.binary(max_size=300)), None if kasm else ev.ClientCutText),
        _m(st.builds(h.fence, u32, st.binary(max_size=64)), ev.ClientFence),
        _m(st.builds(h.xvp, u8, u8), ev.XvpRequest),
        _m(
            st.builds(
                h.set_desktop_size,
                u16,
                u16,
                st.lists(st.tuples(u32, u16, u16, u16, u16, u32), max_size=4),
            ),
            ev.SetDesktopSize,
        ),
        _m(st.builds(h.qemu_key_event, st.booleans(), u32, u32), ev.QEMUKeyEvent),
    ]
    if kasm:
        options.append(
            _m(st.builds(h.kasm_pointer_event, u16, u16, u16, s16, s16), ev.PointerEvent)
        )
    else:
        options.append(
            _m(st.builds(h.pointer_event, st.integers(0, 0x7F), u16, u16), ev.PointerEvent)
        )
        if PseudoEncoding.EXTENDED_MOUSE_BUTTONS in caps:
            pointer = st.builds(h.extended_pointer_event, u8, u16, u16, u8)
            options.append(_m(pointer, ev.PointerEvent))
    if EXT_CLIPBOARD in caps:
        fmts = st.integers(0, 0xFFFF)
        caps_msg = st.lists(st.integers(0, 15), unique=True, max_size=5).flatmap(
            lambda bits: st.tuples(
                st.just(bits), st.lists(u32, min_size=len(bits), max_size=len(bits))
            )
        )
        options += [
            _m(
                caps_msg.map(
                    lambda c: h.extended_clipboard(
                        (1 << 24) | sum(1 << b for b in c[0]),
                        b"".join(
                            struct.pack(">I", s) for _, s in sorted(zip(c[0], c[1], strict=True))
                        ),
                    )
                ),
                ev.ClipboardCaps,
            ),
            _m(fmts.map(lambda f: h.extended_clipboard((1 << 25) | f)), ev.ClipboardRequest),
            _m(st.just(h.extended_clipboard(1 << 26)), ev.ClipboardPeek),
            _m(fmts.map(lambda f: h.extended_clipboard((1 << 27) | f)), ev.ClipboardNotify),
            _m(
                st.dictionaries(
                    st.integers(0, 15).map(lambda b: 1 << b), st.binary(max_size=200), max_size=3
                ).map(h.clipboard_provide),
                ev.ClipboardProvide,
            ),
        ]
    if PseudoEncoding.CONTINUOUS_UPDATES in caps:
        cu = st.builds(h.enable_continuous_updates, st.booleans(), u16, u16, u16, u16)
        options.append(_m(cu, ev.EnableContinuousUpdates))
    if kasm:
        item = st.tuples(st.binary(max_size=20), st.binary(max_size=200))
        options += [
            _m(st.just(h.kasm_request_stats()), ev.KasmRequestStats),
            _m(st.builds(h.kasm_frame_stats, u32, u32), ev.KasmFrameStats),
            _m(st.lists(item, max_size=4).map(h.kasm_binary_clipboard), ev.KasmBinaryClipboard),
            _m(st.binary(max_size=100).map(h.kasm_upgrade_to_udp), ev.KasmUnsupported),
            _m(st.binary(max_size=255).map(h.kasm_subscribe_unix_relay), ev.KasmUnsupported),
            _m(
                st.builds(h.kasm_unix_relay, st.binary(max_size=255), st.binary(max_size=200)),
                ev.KasmUnsupported,
            ),
            _m(st.lists(s32, max_size=20).map(h.kasm_video_encoders), ev.KasmVideoEncodersRequest),
            _m(st.just(h.kasm_keep_alive()), ev.KasmKeepAlive),
            _m(
                st.sampled_from([(188, 9), (189, 7), (190, 3), (191, 3)]).flatmap(
                    lambda t: st.binary(min_size=t[1], max_size=t[1]).map(
                        lambda body: h.kasm_fixed(t[0], body)
                    )
                ),
                ev.KasmUnsupported,
            ),
            _m(st.builds(h.kasm_max_video_resolution, u16, u16), ev.KasmSetMaxVideoResolution),
        ]
    return st.one_of(options)


MESSAGE_TYPES = [0, 2, 3, 4, 5, 6, 150, 248, 250, 251, 255, *range(178, 186), *range(188, 192), 252]
random_messages: st.SearchStrategy[bytes] = st.one_of(
    st.tuples(st.sampled_from(MESSAGE_TYPES), st.binary(max_size=40)).map(
        lambda t: bytes((t[0],)) + t[1]
    ),
    st.binary(min_size=1, max_size=64),
)


@dataclass
class Session:
    config: str
    dialect: Dialect
    version: bytes
    route: str | None
    handshake: bytes
    messages: list[Message]


@st.composite
def sessions(draw: st.DrawFn, *, good_credentials: bool = True) -> Session:
    config = draw(st.sampled_from(sorted(h.SECURITY_CONFIGS)))
    security = h.SECURITY_CONFIGS[config]
    minors = [3, 7, 8, 5, 889] if good_credentials else [0, 3, 7, 8, 5, 889, 999]
    if good_credentials:  # a session that can get through
        minors = [m for m in minors if h.routes(security, h.version_string(m))]
    minor = draw(st.sampled_from(minors))
    version = h.version_string(minor)
    choices = h.routes(security, version)
    route = draw(st.sampled_from(choices)) if choices else None
    dialect = draw(st.sampled_from(Dialect))
    kw: dict[str, Any] = {"shared": draw(st.booleans())}
    if route in h.ROUTE_SUBTYPES:
        kw["username"] = draw(st.text(max_size=20)).encode()
    if not good_credentials:
        if route == "vnc":
            kw["vnc_response"] = draw(st.binary(min_size=16, max_size=16))
        elif route in h.ROUTE_SUBTYPES:
            kw["username"] = draw(st.binary(max_size=80))
            kw["password"] = draw(
                st.sampled_from([h.PASSWORD.encode(), b""]) | st.binary(max_size=80)
            )
    caps = frozenset(draw(st.sets(st.sampled_from(FEATURES))))
    first: list[Message] = [(h.set_encodings([7, 0, *caps]), ev.SetEncodings)]
    speaks = dialect
    if dialect is Dialect.AUTO:
        # Dialect detection: a Kasm client's VideoEncodersRequest or Kasm
        # SetEncodings, or a standard client's first pointer event, decides
        # (DialectSelected comes first, so it goes with an empty message).
        how = draw(st.sampled_from(["184", "kasm-encodings", "pointer"]))
        selected: Message = (b"", ev.DialectSelected)
        if how == "184":
            encoders = draw(st.lists(s32, max_size=5))
            first = [selected, (h.kasm_video_encoders(encoders), ev.KasmVideoEncodersRequest)]
            first.append((h.set_encodings([7, 0, *caps, -1024]), ev.SetEncodings))
            speaks = Dialect.KASM
        elif how == "kasm-encodings":
            kasm = draw(st.sampled_from([-1024, -1886, -1885, -1884, -2048, -770, -992]))
            first = [selected, (h.set_encodings([7, 0, *caps, kasm]), ev.SetEncodings)]
            speaks = Dialect.KASM
        else:
            pointer = h.pointer_event(draw(st.integers(0, 0x7F)), draw(u16), draw(u16))
            first += [selected, (pointer, ev.PointerEvent)]
            speaks = Dialect.STANDARD
    rest = draw(st.lists(valid_messages(speaks, caps), max_size=12))
    return Session(
        config, dialect, version, route, h.handshake(version, route, **kw), [*first, *rest]
    )


def chunk_sizes(sizes: list[int]) -> Iterator[int]:
    while True:
        yield from sizes


chunkings = st.lists(
    st.integers(1, 8) | st.integers(1, 300) | st.integers(1, 20000), min_size=1, max_size=16
)


def handshake_events(session: Session) -> list[type[ev.Event]]:
    out: list[type[ev.Event]] = []
    if session.route in ("tls-plain", "x509-plain"):
        out.append(ev.StartTLS)
    if session.route in h.ROUTE_SUBTYPES:
        out.append(ev.CredentialsReceived)
    return [*out, ev.AuthenticationSucceeded, ev.ClientInit]


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 16, 17]
INTERESTING += [64, 65, 255, 256, 1024, 1025, 4096, 4097, 10 * 1024 * 1024, 10 * 1024 * 1024 + 1]
_FORMATS = {1: ">B", 2: ">H", 4: ">I"}

MESSAGE_OPS = ("field", "splice", "random", "drop")
STREAM_OPS = ("flip", "truncate", "insert", "delete")
mutation_ops = st.lists(
    st.tuples(
        st.sampled_from(MESSAGE_OPS + STREAM_OPS),
        st.integers(0, 1 << 16),
        st.integers(0, 1 << 16),
        u32,
    ),
    max_size=5,
)


def mutate(parts: list[bytes], ops: list[tuple[str, int, int, int]], extra: list[bytes]) -> bytes:
    """Message-level mutations first (an interesting value at a field of a
    message, the handshake included; a message repeated elsewhere; a random
    message in; a message out), then byte-level ones on the whole stream."""
    parts = list(parts)
    for op, a, b, c in ops:
        if not parts:
            break
        if op == "field":
            i = a % len(parts)
            width = (1, 2, 4)[b % 3]
            mask = (1 << (8 * width)) - 1
            value = INTERESTING[c % len(INTERESTING)] & mask
            if c & (1 << 20):
                value = -value & mask
            msg = bytearray(parts[i])
            offset = (b // 3) % max(1, len(msg))
            msg[offset : offset + width] = struct.pack(_FORMATS[width], value)
            parts[i] = bytes(msg)
        elif op == "splice":
            parts.insert(a % (len(parts) + 1), parts[b % len(parts)])
        elif op == "random" and extra:
            parts.insert(a % (len(parts) + 1), extra[b % len(extra)])
        elif op == "drop":
            del parts[a % len(parts)]
    data = bytearray(b"".join(parts))
    for op, a, b, c in ops:
        pos = a % (len(data) + 1)
        if op == "flip" and data:
            data[pos % len(data)] ^= 1 << (b % 8)
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = c.to_bytes(4, "big")[: 1 + b % 4]
        elif op == "delete":
            del data[pos : pos + 1 + b % 32]
    return bytes(data)


@fuzz_settings(80)
@given(sessions(), chunkings)
def test_valid_sessions_give_exactly_their_events(session: Session, sizes: list[int]) -> None:
    """The generators are right (else the mutations below start from noise):
    a valid session passes the handshake and yields one event per message."""
    stream = session.handshake + b"".join(data for data, _ in session.messages)
    with kept_if_failing(stream):
        out = h.drive(
            stream,
            chunk_sizes(sizes),
            security=h.SECURITY_CONFIGS[session.config],
            dialect=session.dialect,
            limits=h.SMALL_LIMITS,
        )
    assert out.error is None
    assert out.state is State.NORMAL
    expected = handshake_events(session) + [t for _, t in session.messages if t is not None]
    assert [type(event) for event in out.events] == expected
    assert out.replies.startswith(b"RFB 003.008\n")


@fuzz_settings(200)
@given(st.data())
def test_mutated_and_random_streams_only_raise_protocol_errors(data: st.DataObject) -> None:
    session = data.draw(sessions(good_credentials=data.draw(st.booleans())), label="session")
    randoms = data.draw(st.lists(random_messages, max_size=6), label="random messages")
    parts = [session.handshake, *(msg for msg, _ in session.messages)]
    if data.draw(st.booleans(), label="random after the handshake only"):
        stream = session.handshake + b"".join(randoms)
    else:
        stream = mutate(parts, data.draw(mutation_ops, label="mutations"), randoms)
    limits = data.draw(st.sampled_from([h.SMALL_LIMITS, h.DEFAULT_LIMITS, h.ZERO_LIMITS]))
    lockstep = data.draw(st.booleans(), label="lockstep")
    sizes = data.draw(chunkings, label="chunks")
    kw: dict[str, Any] = {
        "security": h.SECURITY_CONFIGS[session.config],
        "dialect": session.dialect,
        "limits": limits,
        "lockstep": lockstep,
    }
    with kept_if_failing(stream):
        out = h.drive(stream, chunk_sizes(sizes), **kw)
        if lockstep:
            # How the bytes were split must not matter.
            assert out.key() == h.drive(stream, h.whole(), **kw).key()


@fuzz_settings(60)
@given(
    st.binary(max_size=600),
    st.sampled_from(sorted(h.SECURITY_CONFIGS)),
    st.sampled_from(Dialect),
    chunkings,
)
def test_random_bytes(data: bytes, config: str, dialect: Dialect, sizes: list[int]) -> None:
    for prefix in (b"", h.version_string(8), h.handshake(h.version_string(8), "none")):
        with kept_if_failing(prefix + data):
            h.drive(
                prefix + data,
                chunk_sizes(sizes),
                security=h.SECURITY_CONFIGS[config],
                dialect=dialect,
                limits=h.SMALL_LIMITS,
                lockstep=False,
            )


# -- the harness catches what it is there to catch -----------------------------------------

NONE_SESSION = h.handshake(h.version_string(8), "none")


def _drive(data: bytes) -> h.Outcome:
    return h.drive(
        data,
        h.bytewise(),
        security=h.SECURITY_CONFIGS["none"],
        dialect=Dialect.STANDARD,
        limits=h.SMALL_LIMITS,
    )


def test_harness_lets_other_exceptions_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(conn: ServerConnection) -> ev.Event | None:
        raise ValueError("a parser bug")

    monkeypatch.setitem(connection._STANDARD_READERS, 4, broken)
    with pytest.raises(ValueError, match="a parser bug"):
        _drive(NONE_SESSION + h.key_event(True, 1))


def test_harness_catches_hoarding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that waits for a length it never bounds."""
    monkeypatch.setitem(connection._STANDARD_READERS, 6, lambda conn: None)
    _drive(NONE_SESSION + h.cut_text(b"z" * 4000))  # within the bound: fine
    with pytest.raises(h.InvariantViolation, match="bytes buffered"):
        _drive(NONE_SESSION + h.cut_text(b"z" * 9000))


def test_harness_catches_a_forgotten_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ServerConnection, "_raise_if_error", lambda self: None)
    with pytest.raises(h.InvariantViolation, match="did not raise"):
        _drive(NONE_SESSION + b"\x07")


def test_harness_catches_oversized_events() -> None:
    with pytest.raises(h.InvariantViolation, match="cut text over the limit"):
        h.check_event(ev.ClientCutText("x" * 5000), Dialect.STANDARD, h.SMALL_LIMITS)
    with pytest.raises(h.InvariantViolation, match="Kasm event"):
        h.check_event(ev.KasmKeepAlive(), Dialect.STANDARD, h.SMALL_LIMITS)


def test_harness_catches_chunking_dependence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser that only works when a message arrives whole."""

    def impatient(conn: ServerConnection) -> ev.Event | None:
        data = conn._buffer.take(8)
        if data is None:
            raise RemoteProtocolError("short key event")
        return ev.KeyEvent(0, False)

    monkeypatch.setitem(connection._STANDARD_READERS, 4, impatient)
    with pytest.raises(h.InvariantViolation, match="chunking"):
        h.replay(NONE_SESSION + h.key_event(True, 1))

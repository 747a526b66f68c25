# What the server state machine reports: one frozen dataclass per thing a
# client can say (RFC 6143 section 7.5, rfbproto "Client to Server Messages",
# KasmVNC's msgTypes.h), plus the handshake steps the I/O layer must act on.
# Events are validated by the reader that builds them, so a consumer can trust
# every field's range.
from __future__ import annotations

from dataclasses import dataclass, field

from ..geometry import Rect
from .constants import Dialect
from .pixelformat import PixelFormat


class Event:
    """Base class of everything `ServerConnection.next_event()` returns."""

    __slots__ = ()


# -- handshake -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """VeNCrypt chose a TLS subtype: flush `data_to_send()`, wrap the stream in
    TLS (anonymous for TLS*, certificate for X509*), then call
    `ServerConnection.tls_established()`."""

    x509: bool


@dataclass(frozen=True, slots=True)
class CredentialsReceived(Event):
    """VeNCrypt Plain credentials. Answer with `accept_credentials()` or
    `reject_credentials(reason)`."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthenticationSucceeded(Event):
    """The security handshake finished; `username` is None unless the client
    gave one (VeNCrypt Plain)."""

    security_type: int
    username: str | None


@dataclass(frozen=True, slots=True)
class ClientInit(Event):
    """ClientInit (RFC 6143 section 7.3.1). Answer with `send_server_init()`."""

    shared: bool


# -- normal phase: standard RFB -----------------------------------------------


@dataclass(frozen=True, slots=True)
class SetPixelFormat(Event):
    pixel_format: PixelFormat


@dataclass(frozen=True, slots=True)
class SetEncodings(Event):
    encodings: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FramebufferUpdateRequest(Event):
    incremental: bool
    rect: Rect


@dataclass(frozen=True, slots=True)
class KeyEvent(Event):
    keysym: int
    down: bool


@dataclass(frozen=True, slots=True)
class QEMUKeyEvent(Event):
    """QEMU Extended Key Event: keysym plus the XT scancode of the key."""

    keysym: int
    keycode: int
    down: bool


@dataclass(frozen=True, slots=True)
class PointerEvent(Event):
    """Button mask bit 0 left, 1 middle, 2 right, 3/4 wheel up/down, 5/6 wheel
    left/right, 7 back, 8 forward (ExtendedMouseButtons). The Kasm dialect adds
    scroll deltas."""

    x: int
    y: int
    buttons: int
    scroll_x: int = 0
    scroll_y: int = 0


@dataclass(frozen=True, slots=True)
class ClientCutText(Event):
    """Old-style cut text (Latin-1)."""

    text: str


@dataclass(frozen=True, slots=True)
class ClipboardCaps(Event):
    """Extended Clipboard caps: formats the client handles, with size limits."""

    actions: int
    max_sizes: dict[int, int]


@dataclass(frozen=True, slots=True)
class ClipboardRequest(Event):
    formats: int


@dataclass(frozen=True, slots=True)
class ClipboardPeek(Event):
    pass


@dataclass(frozen=True, slots=True)
class ClipboardNotify(Event):
    formats: int


@dataclass(frozen=True, slots=True)
class ClipboardProvide(Event):
    """Extended Clipboard provide: format flag -> bytes. Text is decoded into
    `text` (UTF-8, CRLF turned into LF, NUL terminator removed)."""

    data: dict[int, bytes]
    text: str | None


@dataclass(frozen=True, slots=True)
class EnableContinuousUpdates(Event):
    enable: bool
    rect: Rect


@dataclass(frozen=True, slots=True)
class ClientFence(Event):
    """A fence the client sent. Requests are answered by the state machine
    itself (the reply is queued at once, as rfbproto requires); replies to the
    server's own fences come out here with `flags` lacking REQUEST."""

    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Screen:
    """One screen of an ExtendedDesktopSize layout."""

    id: int
    x: int
    y: int
    w: int
    h: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class SetDesktopSize(Event):
    width: int
    height: int
    screens: tuple[Screen, ...]


@dataclass(frozen=True, slots=True)
class XvpRequest(Event):
    version: int
    code: int


# -- normal phase: KasmVNC dialect ----------------------------------------------


@dataclass(frozen=True, slots=True)
class DialectSelected(Event):
    """A connection in Dialect.AUTO settled on `dialect` (STANDARD or KASM),
    for good. Comes out before the event of the message that decided it."""

    dialect: Dialect


@dataclass(frozen=True, slots=True)
class KasmRequestStats(Event):
    """Message 178: the client wants the bottleneck stats (reply 178)."""


@dataclass(frozen=True, slots=True)
class KasmFrameStats(Event):
    """Message 179: the client processed the tracked update. KasmVNC's web
    client puts its frame rate in `all`; both are opaque U32 values."""

    all: int
    render: int


@dataclass(frozen=True, slots=True)
class KasmBinaryClipboard(Event):
    """Message 180: (mime type, data) items."""

    items: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class KasmVideoEncodersRequest(Event):
    """Message 184: the encoders the client can decode."""

    encodings: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KasmKeepAlive(Event):
    """Message 185."""


@dataclass(frozen=True, slots=True)
class KasmSetMaxVideoResolution(Event):
    """Message 252: the largest size the client wants video-mode images at."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class KasmUnsupported(Event):
    """A Kasm message trivnc parses but does not act on (UDP upgrade, unix
    relays, direct mouse, latency/network/system stats), kept for logging."""

    message_type: int


#: Every event only the KasmVNC dialect produces.
KASM_EVENTS = (
    KasmRequestStats,
    KasmFrameStats,
    KasmBinaryClipboard,
    KasmVideoEncodersRequest,
    KasmKeepAlive,
    KasmSetMaxVideoResolution,
    KasmUnsupported,
)

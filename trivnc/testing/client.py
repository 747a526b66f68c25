# A decoding RFB client without I/O, written from RFC 6143 (section 7: 7.1
# handshake, 7.3 initialisation, 7.5 client messages, 7.6 server messages, 7.8
# pseudo-encodings) and the community rfbproto document (VeNCrypt, Fence,
# ContinuousUpdates, ExtendedDesktopSize, Extended Clipboard, QEMU, VMware and
# xvp extensions), plus the KasmVNC dialect (kasmtech/KasmVNC msgTypes.h and
# SMsgWriter.cxx; see /work/shared/reference/protocol.md B.7).
#
# It is trivnc's independent check of its own server, so it deliberately shares
# nothing with trivnc.rfb's server state machine except the number catalogue,
# PIXEL_FORMAT and the errors.
#
# Theory of operation (after h11's Connection):
#   * receive_data(bytes) appends to a buffer; receive_data(b"") means EOF.
#   * The whole incoming stream is parsed by ONE generator, `_run`, that yields
#     the number of bytes it needs and is sent exactly that many bytes, the
#     same protocol as trivnc.testing.decode's framebuffer decoders, which
#     therefore compose with `yield from`. Because the generator only ever
#     sees whole reads, any split of the input gives the same events.
#   * The generator appends events to a queue; next_event() drives it until
#     an event is queued or the buffer runs dry (NEED_DATA).
#   * Replies that the handshake needs (version, security choice, credentials,
#     ClientInit) go to an outbox drained by data_to_send(). Everything after
#     the handshake is the caller's decision: each client message is a method
#     that returns its bytes. Nothing is answered automatically, not even a
#     ServerFence (see fence_reply()).
#   * A yield of 0 is a pause: after StartTLS the generator stops so that the
#     I/O layer can flush the outbox in the clear and wrap the stream before the
#     Plain credentials are produced.
#   * A server that breaks the protocol raises RemoteProtocolError; the error is
#     sticky. A client method used out of turn raises LocalProtocolError.
from __future__ import annotations

import enum
import re
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from ..geometry import Rect
from ..rfb.constants import (
    FENCE_KNOWN,
    ClientMessage,
    ClipboardFlags,
    Encoding,
    FenceFlags,
    ProtocolVersion,
    PseudoEncoding,
    SecurityType,
    ServerMessage,
    VeNCryptSubtype,
    XvpCode,
)
from ..rfb.errors import LocalProtocolError, RemoteProtocolError
from ..rfb.pixelformat import PixelFormat
from .decode import DecodeState, Framebuffer, decode_rect
from .decode.reader import Needs, read, read_s32, read_u8, read_u16, read_u32

__all__ = [
    "NEED_DATA",
    "Bell",
    "ClientConnection",
    "ClipboardCaps",
    "ClipboardNotify",
    "ClipboardPeek",
    "ClipboardProvide",
    "ClipboardRequest",
    "ConnectionClosed",
    "CursorPosition",
    "CursorShape",
    "DesktopName",
    "DesktopSize",
    "EndOfContinuousUpdates",
    "Event",
    "ExtendedDesktopSize",
    "ExtendedKeyEventConfirmed",
    "ExtendedMouseButtonsConfirmed",
    "FramebufferUpdate",
    "HandshakeFailed",
    "KasmBinaryClipboard",
    "KasmClipboardItem",
    "KasmRequestFrameStats",
    "KasmServerDisconnect",
    "KasmStats",
    "KasmUserAdded",
    "KasmUserRemoved",
    "KasmVideoEncoder",
    "KasmVideoEncoders",
    "LedState",
    "NeedData",
    "PointerMotionMode",
    "Screen",
    "SecurityTypes",
    "ServerCutText",
    "ServerFence",
    "ServerInit",
    "StartTLS",
    "VeNCryptSubtypes",
    "VersionAgreed",
    "Xvp",
    "encode_clipboard_text",
    "keysym_for_char",
    "vnc_auth_response",
]

# -- bounds on what the server may make us allocate ---------------------------------

MAX_CUT_TEXT: Final = 64 << 20  # cut text, extended clipboard (compressed and not)
MAX_NAME: Final = 1 << 20  # desktop names, failure reasons, Kasm texts
MAX_FENCE_PAYLOAD: Final = 64  # rfbproto "ClientFence"
MAX_CURSOR_PIXELS: Final = 1024 * 1024
DEFAULT_MAX_FRAMEBUFFER_PIXELS: Final = 8192 * 8192

#: The value of a 0 return from a decoder step: "pause, give control back".
_PAUSE: Final = 0

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_RECT_HEADER = struct.Struct(">HHHHi")
_SCREEN = struct.Struct(">IHHHHI")
_VIDEO_ENCODER = struct.Struct(">iiiB")

_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")

Dialect = Literal["standard", "kasm"]


class NeedData(enum.Enum):
    """next_event() has nothing to return until more data arrives."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


# -- events ---------------------------------------------------------------------------
# Frozen and made of plain values (bytes, tuples) so that events compare and
# hash: the split-stream tests compare whole event lists.


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything next_event() returns."""


@dataclass(frozen=True, slots=True)
class VersionAgreed(Event):
    """The server's ProtocolVersion line and the version this client answered."""

    server_version: str
    version: ProtocolVersion


@dataclass(frozen=True, slots=True)
class SecurityTypes(Event):
    """What the server offered (a 3.3 server imposes one) and our choice."""

    offered: tuple[int, ...]
    chosen: int


@dataclass(frozen=True, slots=True)
class VeNCryptSubtypes(Event):
    offered: tuple[int, ...]
    chosen: int


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """The server accepted a TLS VeNCrypt subtype. The I/O layer must send
    data_to_send() in the clear, run a TLS handshake on the same stream, and
    feed what it decrypts into receive_data from now on."""

    subtype: int

    @property
    def x509(self) -> bool:
        """True for X509* subtypes (certificate), False for TLS* (anonymous)."""
        return self.subtype in _X509_SUBTYPES


@dataclass(frozen=True, slots=True)
class HandshakeFailed(Event):
    """The server refused the connection, or this client could not meet what
    it offered. The connection is over; the server is expected to close."""

    stage: str  # "security-types", "vencrypt", "security-result"
    reason: str
    status: int | None = None


@dataclass(frozen=True, slots=True)
class ServerInit(Event):
    width: int
    height: int
    pixel_format: PixelFormat
    name: str


class Screen(NamedTuple):
    """SCREEN (rfbproto "ExtendedDesktopSize Pseudo-encoding")."""

    id: int
    x: int
    y: int
    width: int
    height: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class FramebufferUpdate(Event):
    """One complete FramebufferUpdate. `rects` lists every rect it carried,
    pseudo-rects included, in order; LastRect itself is not listed."""

    rects: tuple[tuple[Rect, int], ...]
    last_rect: bool = False

    @property
    def pixel_rects(self) -> tuple[tuple[Rect, int], ...]:
        """The rects that carried framebuffer data."""
        return tuple((r, e) for r, e in self.rects if e not in _PSEUDO_ENCODINGS)

    @property
    def encodings(self) -> frozenset[int]:
        return frozenset(e for _, e in self.rects)


@dataclass(frozen=True, slots=True)
class DesktopSize(Event):
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ExtendedDesktopSize(Event):
    reason: int  # DesktopSizeReason; unknown values mean "server-side"
    status: int  # 0 OK, 1 prohibited, 2 no resources, 3 invalid, 4 forwarded
    width: int
    height: int
    screens: tuple[Screen, ...]


@dataclass(frozen=True, slots=True)
class DesktopName(Event):
    name: str


@dataclass(frozen=True, slots=True)
class CursorShape(Event):
    """A cursor image from Cursor, X Cursor, Cursor With Alpha or VMware Cursor.

    `rgba` is width*height*4 bytes of premultiplied RGBA, which is what Cursor
    With Alpha carries and what a mask-based cursor is once its masked-out
    pixels are zeroed."""

    encoding: int
    hotspot_x: int
    hotspot_y: int
    width: int
    height: int
    rgba: bytes

    def image(self) -> npt.NDArray[np.uint8]:
        """The cursor as an (height, width, 4) RGBA array (read-only view)."""
        return np.frombuffer(self.rgba, np.uint8).reshape(self.height, self.width, 4)


@dataclass(frozen=True, slots=True)
class CursorPosition(Event):
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class ExtendedKeyEventConfirmed(Event):
    """The server accepts QEMU extended key events (pseudo-encoding -258)."""


@dataclass(frozen=True, slots=True)
class ExtendedMouseButtonsConfirmed(Event):
    """The server accepts 7-byte extended PointerEvents (pseudo-encoding -316)."""


@dataclass(frozen=True, slots=True)
class PointerMotionMode(Event):
    absolute: bool


@dataclass(frozen=True, slots=True)
class LedState(Event):
    state: int

    @property
    def scroll_lock(self) -> bool:
        return bool(self.state & 1)

    @property
    def num_lock(self) -> bool:
        return bool(self.state & 2)

    @property
    def caps_lock(self) -> bool:
        return bool(self.state & 4)


@dataclass(frozen=True, slots=True)
class Bell(Event):
    pass


@dataclass(frozen=True, slots=True)
class ServerCutText(Event):
    """Old-style cut text (Latin-1)."""

    text: str


@dataclass(frozen=True, slots=True)
class ClipboardCaps(Event):
    """Extended Clipboard caps: the formats and actions the server accepts and
    the largest unsolicited size per format, as (format flag, size) pairs."""

    flags: int
    sizes: tuple[tuple[int, int], ...]


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
    """(format flag, data) pairs as sent; text is UTF-8 with CRLF line ends and
    a terminating NUL, which the parser has checked."""

    data: tuple[tuple[int, bytes], ...]

    def get(self, fmt: int) -> bytes | None:
        for f, d in self.data:
            if f == fmt:
                return d
        return None

    @property
    def text(self) -> str | None:
        """The text format with the NUL removed and CRLF turned into LF."""
        raw = self.get(ClipboardFlags.TEXT)
        if raw is None:
            return None
        return raw[:-1].decode("utf-8").replace("\r\n", "\n")


@dataclass(frozen=True, slots=True)
class EndOfContinuousUpdates(Event):
    pass


@dataclass(frozen=True, slots=True)
class ServerFence(Event):
    flags: int
    payload: bytes

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FenceFlags.REQUEST)


@dataclass(frozen=True, slots=True)
class Xvp(Event):
    version: int
    code: int  # XvpCode.INIT or XvpCode.FAIL


@dataclass(frozen=True, slots=True)
class KasmStats(Event):
    """Message 178: "[ cpu_recent, cpu_total, net_recent, net_total ]"."""

    text: str


@dataclass(frozen=True, slots=True)
class KasmRequestFrameStats(Event):
    """Message 179: answer with kasm_frame_stats() after the next update."""


class KasmClipboardItem(NamedTuple):
    id: int
    mime: str
    data: bytes


@dataclass(frozen=True, slots=True)
class KasmBinaryClipboard(Event):
    items: tuple[KasmClipboardItem, ...]


class KasmVideoEncoder(NamedTuple):
    encoding: int
    quality_min: int
    quality_max: int
    presets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KasmVideoEncoders(Event):
    encoders: tuple[KasmVideoEncoder, ...]


@dataclass(frozen=True, slots=True)
class KasmServerDisconnect(Event):
    graceful: bool
    reason: str


@dataclass(frozen=True, slots=True)
class KasmUserAdded(Event):
    username: str


@dataclass(frozen=True, slots=True)
class KasmUserRemoved(Event):
    username: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The server closed the stream at a message boundary."""


# -- helpers usable on their own -------------------------------------------------------

_TLS_SUBTYPES: Final = frozenset(
    {VeNCryptSubtype.TLS_NONE, VeNCryptSubtype.TLS_VNC, VeNCryptSubtype.TLS_PLAIN}
)
_X509_SUBTYPES: Final = frozenset(
    {VeNCryptSubtype.X509_NONE, VeNCryptSubtype.X509_VNC, VeNCryptSubtype.X509_PLAIN}
)
_PLAIN_SUBTYPES: Final = frozenset(
    {VeNCryptSubtype.PLAIN, VeNCryptSubtype.TLS_PLAIN, VeNCryptSubtype.X509_PLAIN}
)
_VNC_SUBTYPES: Final = frozenset(
    {VeNCryptSubtype.TLS_VNC, VeNCryptSubtype.X509_VNC, SecurityType.VNC_AUTH}
)
_NONE_SUBTYPES: Final = frozenset(
    {VeNCryptSubtype.TLS_NONE, VeNCryptSubtype.X509_NONE, SecurityType.NONE}
)

#: Most secure first; Plain without TLS only as a last resort (rfbproto says it
#: "should be never used", but a test client must be able to see it offered).
DEFAULT_VENCRYPT_SUBTYPES: Final[tuple[int, ...]] = (
    VeNCryptSubtype.X509_PLAIN,
    VeNCryptSubtype.TLS_PLAIN,
    VeNCryptSubtype.X509_VNC,
    VeNCryptSubtype.TLS_VNC,
    VeNCryptSubtype.X509_NONE,
    VeNCryptSubtype.TLS_NONE,
    VeNCryptSubtype.PLAIN,
)
DEFAULT_SECURITY_TYPES: Final[tuple[int, ...]] = (
    SecurityType.VENCRYPT,
    SecurityType.VNC_AUTH,
    SecurityType.NONE,
)

# The DES key's bits are used lowest-first (rfbproto "VNC Authentication",
# RFC 6143 errata 4951), the reverse of what DES libraries do: reverse each
# key byte once here.
_BIT_REVERSED: Final = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def vnc_auth_response(password: str | bytes, challenge: bytes) -> bytes:
    """The 16-byte answer to a VNC Authentication challenge (RFC 6143 7.2.2):
    DES-ECB of the challenge with the password, truncated or NUL-padded to 8
    bytes and with each byte bit-reversed, as the key."""
    if len(challenge) != 16:
        raise ValueError("a VNC Authentication challenge is 16 bytes")
    raw = password.encode("utf-8") if isinstance(password, str) else password
    key = raw[:8].ljust(8, b"\0").translate(_BIT_REVERSED)
    # Single DES as 3DES with K1 = K2 = K3, because cryptography is dropping
    # 8-byte TripleDES keys.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def encode_clipboard_text(text: str) -> bytes:
    """Extended Clipboard text: UTF-8, CRLF line ends, terminating NUL."""
    crlf = text.replace("\r\n", "\n").replace("\n", "\r\n")
    return crlf.encode("utf-8") + b"\0"


_SPECIAL_KEYSYMS: Final = {"\n": 0xFF0D, "\r": 0xFF0D, "\t": 0xFF09, "\b": 0xFF08, "\x1b": 0xFF1B}


def keysym_for_char(char: str) -> int:
    """The X11 keysym that types `char`: Latin-1 printables are their own
    keysym, a few controls have function keysyms, everything else uses the
    Unicode keysym range 0x01000000 + code point."""
    if char in _SPECIAL_KEYSYMS:
        return _SPECIAL_KEYSYMS[char]
    code = ord(char)
    if 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFF:
        return code
    return 0x01000000 + code


def _signed32(value: int) -> int:
    """Encodings are S32; accept the unsigned spelling too (0xC0A1E5CE)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _encoding_name(encoding: int) -> str:
    for enum_type in (Encoding, PseudoEncoding):
        try:
            return f"{enum_type(encoding).name} ({encoding})"
        except ValueError:
            continue
    return str(encoding)


def _format_bits(formats: int) -> list[int]:
    """The set format flags (bits 0-15), lowest first: the order of caps
    sizes and provide data."""
    return [1 << bit for bit in range(16) if formats & (1 << bit)]


def _rgba_from_mask(bgrx: Framebuffer, mask: bytes, width: int, height: int) -> bytes:
    """BGRX pixels plus a 1-bpp MSB-first row-padded mask -> premultiplied RGBA."""
    stride = (width + 7) // 8
    bits = np.unpackbits(np.frombuffer(mask, np.uint8).reshape(height, stride), axis=1)
    valid = bits[:, :width].astype(bool)
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0] = bgrx[..., 2]
    rgba[..., 1] = bgrx[..., 1]
    rgba[..., 2] = bgrx[..., 0]
    rgba[..., 3] = 255
    rgba[~valid] = 0
    return rgba.tobytes()


_PSEUDO_ENCODINGS: Final = frozenset(int(p) for p in PseudoEncoding)

_Handler = Callable[[], Needs[None]]
_PseudoHandler = Callable[[Rect], Needs[None]]


class ClientConnection:
    """A sans-io RFB client. See the module comment for how to drive it.

    `vnc_password` answers VNC Authentication (alone or inside VeNCrypt);
    `username` and `password` are VeNCrypt Plain credentials (and `password`
    is also used for VNC Authentication when `vnc_password` is not given).
    `security_types` and `vencrypt_subtypes` are preference orders; a type is
    chosen only if the server offers it and the credentials it needs exist.
    `dialect="kasm"` speaks KasmVNC's variant (11-byte PointerEvent, Kasm
    messages 178-254)."""

    def __init__(
        self,
        *,
        version: ProtocolVersion = ProtocolVersion.V3_8,
        password: str | bytes | None = None,
        username: str | None = None,
        vnc_password: str | bytes | None = None,
        shared: bool = True,
        dialect: Dialect = "standard",
        security_types: Sequence[int] | None = None,
        vencrypt_subtypes: Sequence[int] | None = None,
        max_framebuffer_pixels: int = DEFAULT_MAX_FRAMEBUFFER_PIXELS,
    ) -> None:
        if dialect not in ("standard", "kasm"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self._want_version = ProtocolVersion(version)
        self._password = password
        self._username = username
        self._vnc_password = vnc_password if vnc_password is not None else password
        self._shared = shared
        self._security_preference = tuple(
            DEFAULT_SECURITY_TYPES if security_types is None else security_types
        )
        self._vencrypt_preference = tuple(
            DEFAULT_VENCRYPT_SUBTYPES if vencrypt_subtypes is None else vencrypt_subtypes
        )
        self._max_pixels = max_framebuffer_pixels
        # The largest single read any step may ask for: a Raw rect covering the
        # largest framebuffer we accept, plus slack for compressed framing.
        self._max_read = 4 * max_framebuffer_pixels + (1 << 20)

        self._buffer = bytearray()
        self._eof = False
        self._events: deque[Event] = deque()
        self._outbox = bytearray()
        self._error: RemoteProtocolError | None = None
        self._parser_done = False
        self._at_boundary = False

        # What the connection has learnt from the server. Public to read; only
        # the parser writes them.
        self.version: ProtocolVersion | None = None
        self.server_init: ServerInit | None = None
        self.name = ""
        self.screens: tuple[Screen, ...] = ()
        self.decode_state = DecodeState()
        self._fb: Framebuffer = np.zeros((0, 0, 4), np.uint8)
        self._advertised: set[int] = set()
        self.extended_key_events = False
        self.extended_mouse_buttons = False
        self.extended_desktop_size = False
        self.continuous_updates = False
        self.fence = False
        self.xvp_version = 0
        self.server_clipboard_caps: ClipboardCaps | None = None
        self.cursor: CursorShape | None = None

        self._handlers: dict[int, _Handler] = {
            ServerMessage.FRAMEBUFFER_UPDATE: self._read_framebuffer_update,
            ServerMessage.SET_COLOUR_MAP_ENTRIES: self._read_colour_map,
            ServerMessage.BELL: self._read_bell,
            ServerMessage.SERVER_CUT_TEXT: self._read_server_cut_text,
            ServerMessage.END_OF_CONTINUOUS_UPDATES: self._read_end_of_continuous_updates,
            ServerMessage.SERVER_FENCE: self._read_server_fence,
            ServerMessage.XVP: self._read_xvp,
        }
        if dialect == "kasm":
            # KasmVNC reuses numbers that rfbproto registers for gii (253) and
            # VMware (254); only a client that speaks the dialect reads them so.
            self._handlers.update(
                {
                    ServerMessage.KASM_STATS: self._read_kasm_stats,
                    ServerMessage.KASM_REQUEST_FRAME_STATS: self._read_kasm_request_frame_stats,
                    ServerMessage.KASM_BINARY_CLIPBOARD: self._read_kasm_binary_clipboard,
                    ServerMessage.KASM_VIDEO_ENCODERS: self._read_kasm_video_encoders,
                    ServerMessage.KASM_SERVER_DISCONNECT: self._read_kasm_disconnect,
                    ServerMessage.KASM_USER_ADDED: self._read_kasm_user_added,
                    ServerMessage.KASM_USER_REMOVED: self._read_kasm_user_removed,
                }
            )
        self._pseudo_handlers: dict[int, _PseudoHandler] = {
            PseudoEncoding.DESKTOP_SIZE: self._read_desktop_size,
            PseudoEncoding.EXTENDED_DESKTOP_SIZE: self._read_extended_desktop_size,
            PseudoEncoding.DESKTOP_NAME: self._read_desktop_name,
            PseudoEncoding.CURSOR: self._read_cursor,
            PseudoEncoding.X_CURSOR: self._read_x_cursor,
            PseudoEncoding.CURSOR_WITH_ALPHA: self._read_cursor_with_alpha,
            PseudoEncoding.VMWARE_CURSOR: self._read_vmware_cursor,
            PseudoEncoding.VMWARE_CURSOR_POSITION: self._read_vmware_cursor_position,
            PseudoEncoding.QEMU_EXTENDED_KEY_EVENT: self._read_qemu_ext_key,
            PseudoEncoding.EXTENDED_MOUSE_BUTTONS: self._read_ext_mouse_buttons,
            PseudoEncoding.QEMU_POINTER_MOTION_CHANGE: self._read_pointer_motion_change,
            PseudoEncoding.QEMU_LED_STATE: self._read_led_state,
        }

        self._parser = self._run()
        self._want = next(self._parser)

    # -- driving the parser -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the server; b"" means the server closed the stream."""
        if self._eof and data:
            raise LocalProtocolError("received data after end of stream")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError (sticky)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def events(self) -> list[Event]:
        """Every event available now. Stops at NEED_DATA, at ConnectionClosed,
        and after StartTLS, which the I/O layer must act on before parsing
        goes on (the next call produces the credentials)."""
        out: list[Event] = []
        while True:
            event = self.next_event()
            if isinstance(event, NeedData):
                return out
            out.append(event)
            if isinstance(event, ConnectionClosed | StartTLS):
                return out

    def data_to_send(self) -> bytes:
        """Handshake replies the parser produced; send them in order."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def _next_event(self) -> Event | NeedData:
        while not self._events:
            if self._parser_done:
                if self._buffer:
                    raise RemoteProtocolError(
                        f"server sent {len(self._buffer)} bytes after refusing the connection"
                    )
                return ConnectionClosed() if self._eof else NEED_DATA
            want = self._want
            if want == _PAUSE:
                self._step(b"")
                continue
            if want < 0 or want > self._max_read:
                raise RemoteProtocolError(f"refusing to read a {want}-byte field")
            if len(self._buffer) < want:
                if not self._eof:
                    return NEED_DATA
                if not self._buffer and self._at_boundary:
                    return ConnectionClosed()
                stage = "the handshake" if self.server_init is None else "a message"
                raise RemoteProtocolError(f"server closed the connection in the middle of {stage}")
            chunk = bytes(self._buffer[:want])
            del self._buffer[:want]  # amortised O(1) at the front of a bytearray
            self._step(chunk)
        return self._events.popleft()

    def _step(self, chunk: bytes) -> None:
        try:
            self._want = self._parser.send(chunk)
        except StopIteration:
            self._parser_done = True

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _send(self, data: bytes) -> None:
        self._outbox += data

    # -- handshake (RFC 6143 7.1-7.3) ---------------------------------------------------

    def _run(self) -> Needs[None]:
        if (yield from self._handshake()):
            yield from self._message_loop()

    def _handshake(self) -> Needs[bool]:
        version = yield from self._read_version()
        if version == ProtocolVersion.V3_3:
            # 3.3: the server decides (RFC 6143 7.1.2, "Version 3.3").
            sec_type = yield from read_u32()
            if sec_type == SecurityType.INVALID:
                reason = yield from self._read_reason()
                return self._fail("security-types", reason)
            if sec_type not in (SecurityType.NONE, SecurityType.VNC_AUTH):
                raise RemoteProtocolError(f"a 3.3 server may not pick security type {sec_type}")
            self._emit(SecurityTypes((sec_type,), sec_type))
            if not self._can_use(sec_type):
                return self._fail("security-types", "server requires a VNC password")
        else:
            count = yield from read_u8()
            if count == 0:
                reason = yield from self._read_reason()
                return self._fail("security-types", reason)
            offered = tuple((yield from read(count)))
            choice = self._choose(offered, self._security_preference)
            if choice is None:
                return self._fail(
                    "security-types", f"no acceptable security type among {list(offered)}"
                )
            sec_type = choice
            self._send(_U8.pack(sec_type))
            self._emit(SecurityTypes(offered, sec_type))

        if sec_type == SecurityType.NONE:
            # 3.3 and 3.7 skip SecurityResult for None (RFC 6143 7.2.1).
            ok = True
            if version >= ProtocolVersion.V3_8:
                ok = yield from self._read_security_result()
        elif sec_type == SecurityType.VNC_AUTH:
            yield from self._vnc_auth()
            ok = yield from self._read_security_result()
        else:
            ok = yield from self._vencrypt()
        if not ok:
            return False
        self._send(_U8.pack(1 if self._shared else 0))  # ClientInit
        yield from self._read_server_init()
        return True

    def _read_version(self) -> Needs[ProtocolVersion]:
        raw = yield from read(12)
        match = _VERSION_RE.fullmatch(raw)
        if match is None:
            raise RemoteProtocolError(f"not an RFB ProtocolVersion: {raw!r}")
        major, minor = int(match[1]), int(match[2])
        # Odd versions mapped as noVNC's client maps them: 3.5 (never
        # released), 3.6 (UltraVNC) and 3.889 (Apple) speak 3.3; 4.x/5.0
        # (RealVNC) speak 3.8.
        if major == 3 and minor in (3, 5, 6, 889):
            server = ProtocolVersion.V3_3
        elif major == 3 and minor == 7:
            server = ProtocolVersion.V3_7
        elif (major == 3 and minor >= 8) or (major, minor) in ((4, 0), (4, 1), (5, 0)):
            server = ProtocolVersion.V3_8
        else:
            raise RemoteProtocolError(f"unsupported RFB version {major}.{minor}")
        version = min(server, self._want_version)
        self.version = version
        self._send(b"RFB 003.%03d\n" % version)
        self._emit(VersionAgreed(raw[:11].decode("ascii"), version))
        return version

    def _read_reason(self) -> Needs[str]:
        length = yield from read_u32()
        if length > MAX_NAME:
            raise RemoteProtocolError(f"failure reason of {length} bytes")
        # Free text; older servers are not UTF-8, so do not fail on it.
        return (yield from read(length)).decode("utf-8", "replace")

    def _fail(self, stage: str, reason: str, status: int | None = None) -> bool:
        self._emit(HandshakeFailed(stage, reason, status))
        return False

    def _can_use(self, sec_type: int) -> bool:
        if sec_type in _VNC_SUBTYPES:
            return self._vnc_password is not None
        if sec_type in _PLAIN_SUBTYPES:
            return self._username is not None and self._password is not None
        if sec_type == SecurityType.VENCRYPT:
            return any(self._can_use(s) for s in self._vencrypt_preference)
        return sec_type in _NONE_SUBTYPES

    def _choose(self, offered: Iterable[int], preference: Sequence[int]) -> int | None:
        offered_set = set(offered)
        for candidate in preference:
            if candidate in offered_set and self._can_use(candidate):
                return candidate
        return None

    def _vnc_auth(self) -> Needs[None]:
        challenge = yield from read(16)
        if self._vnc_password is None:  # _can_use() rules this out; keeps mypy informed
            raise LocalProtocolError("VNC Authentication chosen without a password")
        self._send(vnc_auth_response(self._vnc_password, challenge))

    def _read_security_result(self) -> Needs[bool]:
        status = yield from read_u32()
        if status == 0:
            return True
        if self.version is not None and self.version >= ProtocolVersion.V3_8:
            reason = yield from self._read_reason()
        else:
            reason = "too many authentication attempts" if status == 2 else "authentication failed"
        return self._fail("security-result", reason, status)

    def _vencrypt(self) -> Needs[bool]:
        # rfbproto "VeNCrypt": version exchange, ack, subtype list, choice.
        major, minor = yield from read(2)
        if (major, minor) < (0, 2):
            raise RemoteProtocolError(f"VeNCrypt {major}.{minor} is older than 0.2")
        self._send(b"\x00\x02")
        if (yield from read_u8()) != 0:
            return self._fail("vencrypt", "server refused VeNCrypt 0.2")
        count = yield from read_u8()
        raw = yield from read(4 * count)
        offered = tuple(v for (v,) in _U32.iter_unpack(raw))
        subtype = self._choose(offered, self._vencrypt_preference)
        if subtype is None:
            return self._fail("vencrypt", f"no acceptable VeNCrypt subtype among {list(offered)}")
        self._send(_U32.pack(subtype))
        self._emit(VeNCryptSubtypes(offered, subtype))
        if subtype in _TLS_SUBTYPES or subtype in _X509_SUBTYPES:
            if (yield from read_u8()) != 1:  # 1 means OK here, unlike the ack above
                return self._fail("vencrypt", f"server refused VeNCrypt subtype {subtype}")
            if self._buffer:
                # The server cannot speak before our ClientHello; anything here
                # would be misread as RFB or TLS.
                raise RemoteProtocolError("server sent data before the TLS handshake")
            self._emit(StartTLS(subtype))
            yield _PAUSE  # let the I/O layer flush and wrap before credentials
        if subtype in _PLAIN_SUBTYPES:
            # rfbproto "Plain subtype": U32 lengths, then username and password.
            if self._username is None or self._password is None:  # see _can_use()
                raise LocalProtocolError("Plain chosen without credentials")
            user = self._username.encode("utf-8")
            pw = self._password
            pw = pw.encode("utf-8") if isinstance(pw, str) else pw
            self._send(struct.pack(">II", len(user), len(pw)) + user + pw)
        elif subtype in _VNC_SUBTYPES:
            yield from self._vnc_auth()
        # VeNCrypt is not type None, so SecurityResult follows in every version.
        return (yield from self._read_security_result())

    def _read_server_init(self) -> Needs[None]:
        width = yield from read_u16()
        height = yield from read_u16()
        pf = PixelFormat.unpack((yield from read(16)))
        name_length = yield from read_u32()
        if name_length > MAX_NAME:
            raise RemoteProtocolError(f"desktop name of {name_length} bytes")
        raw_name = yield from read(name_length)
        self._check_size(width, height)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            # rfbproto only recommends UTF-8 here; old servers send Latin-1.
            name = raw_name.decode("latin-1")
        self.name = name
        self.decode_state = DecodeState(pf=pf, scale_images=self.dialect == "kasm")
        self._fb = np.zeros((height, width, 4), np.uint8)
        event = ServerInit(width, height, pf, name)
        self.server_init = event
        self._emit(event)

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self._max_pixels:
            raise RemoteProtocolError(
                f"framebuffer {width}x{height} exceeds {self._max_pixels} pixels"
            )

    # -- server messages (RFC 6143 7.6, rfbproto, KasmVNC) -----------------------------

    def _message_loop(self) -> Needs[None]:
        while True:
            self._at_boundary = True
            msg_type = yield from read_u8()
            self._at_boundary = False
            handler = self._handlers.get(msg_type)
            if handler is None:
                raise RemoteProtocolError(f"unknown server message type {msg_type}")
            yield from handler()

    def _require_advertised(self, encoding: int, what: str) -> None:
        # rfbproto: the server must know the client supports an extension
        # before it uses it; the client says so in SetEncodings.
        if encoding not in self._advertised:
            raise RemoteProtocolError(
                f"server sent {what} without the client advertising {_encoding_name(encoding)}"
            )

    def _read_framebuffer_update(self) -> Needs[None]:
        yield from read(1)
        nrects = yield from read_u16()
        rects: list[tuple[Rect, int]] = []
        last_rect = False
        has_pixels = has_eds = False
        # With LastRect, 0xFFFF means "until a LastRect rect" (rfbproto
        # "LastRect Pseudo-encoding"); counting to 65535 is then an upper bound.
        for _ in range(nrects):
            x, y, w, h, encoding = _RECT_HEADER.unpack((yield from read(12)))
            rect = Rect(x, y, w, h)
            if encoding == PseudoEncoding.LAST_RECT:
                self._require_advertised(encoding, "a LastRect rect")
                last_rect = True
                break
            rects.append((rect, encoding))
            pseudo = self._pseudo_handlers.get(encoding)
            if pseudo is not None:
                self._require_advertised(encoding, "a pseudo-rect")
                has_eds |= encoding == PseudoEncoding.EXTENDED_DESKTOP_SIZE
                yield from pseudo(rect)
            else:
                has_pixels = True
                yield from self._read_pixel_rect(rect, encoding)
            if has_pixels and has_eds:
                raise RemoteProtocolError(
                    "an update with ExtendedDesktopSize must not change framebuffer data"
                )
        self._emit(FramebufferUpdate(tuple(rects), last_rect))

    def _read_pixel_rect(self, rect: Rect, encoding: int) -> Needs[None]:
        if encoding != Encoding.RAW:  # Raw is always allowed (RFC 6143 7.5.2)
            self._require_advertised(encoding, f"a rect at {tuple(rect)}")
        height, width = self._fb.shape[:2]
        if rect.right > width or rect.bottom > height:
            raise RemoteProtocolError(
                f"rect {tuple(rect)} is outside the {width}x{height} framebuffer"
            )
        try:
            yield from decode_rect(self.decode_state, self._fb, rect, encoding)
        except RemoteProtocolError:
            raise
        except Exception as exc:
            # Decoders report bad peer data with ordinary exceptions (zlib,
            # ValueError, codec errors); to us they all mean a broken server.
            raise RemoteProtocolError(
                f"cannot decode {_encoding_name(encoding)} rect {tuple(rect)}: {exc}"
            ) from exc

    def _resize(self, width: int, height: int) -> None:
        self._check_size(width, height)
        if self._fb.shape[:2] != (height, width):
            # A new, blank framebuffer: the server must repaint it, and a test
            # should see it if it does not.
            self._fb = np.zeros((height, width, 4), np.uint8)

    def _read_desktop_size(self, rect: Rect) -> Needs[None]:
        # Handlers that read nothing are still generators, so that the dispatch
        # can `yield from` every handler alike; `yield from ()` makes them so.
        yield from ()
        self._resize(rect.w, rect.h)
        self._emit(DesktopSize(rect.w, rect.h))

    def _read_extended_desktop_size(self, rect: Rect) -> Needs[None]:
        count = yield from read_u8()
        yield from read(3)
        raw = yield from read(16 * count)
        screens = tuple(Screen(*fields) for fields in _SCREEN.iter_unpack(raw))
        reason, status = rect.x, rect.y
        if status == 0:
            # On failure "all remaining fields are undefined" (rfbproto), so
            # only a successful rect says anything about the size.
            self._resize(rect.w, rect.h)
            self.screens = screens
        self.extended_desktop_size = True
        self._emit(ExtendedDesktopSize(reason, status, rect.w, rect.h, screens))

    def _read_desktop_name(self, rect: Rect) -> Needs[None]:
        if rect != (0, 0, 0, 0):
            raise RemoteProtocolError(f"DesktopName rect must be all zero, got {tuple(rect)}")
        length = yield from read_u32()
        if length > MAX_NAME:
            raise RemoteProtocolError(f"desktop name of {length} bytes")
        name = self._utf8((yield from read(length)), "DesktopName")
        self.name = name
        self._emit(DesktopName(name))

    def _check_cursor_size(self, rect: Rect) -> None:
        if rect.w * rect.h > MAX_CURSOR_PIXELS:
            raise RemoteProtocolError(f"cursor of {rect.w}x{rect.h} pixels")

    def _set_cursor(self, encoding: int, rect: Rect, rgba: bytes) -> None:
        cursor = CursorShape(encoding, rect.x, rect.y, rect.w, rect.h, rgba)
        self.cursor = cursor
        self._emit(cursor)

    def _read_cursor(self, rect: Rect) -> Needs[None]:
        # RFC 6143 7.8.1: pixels in the client's format, then a 1-bpp mask.
        self._check_cursor_size(rect)
        pf = self.decode_state.pf
        pixels = yield from read(rect.w * rect.h * pf.bytes_per_pixel)
        mask = yield from read((rect.w + 7) // 8 * rect.h)
        bgrx = pf.decode_pixels(pixels, rect.h, rect.w)
        self._set_cursor(PseudoEncoding.CURSOR, rect, _rgba_from_mask(bgrx, mask, rect.w, rect.h))

    def _read_x_cursor(self, rect: Rect) -> Needs[None]:
        # rfbproto "X Cursor": two RGB colours, a bitmap choosing between
        # them, and a validity mask. An empty rect carries no data.
        self._check_cursor_size(rect)
        if rect.w == 0 or rect.h == 0:
            self._set_cursor(PseudoEncoding.X_CURSOR, rect, b"")
            return
        colours = yield from read(6)
        row_bytes = (rect.w + 7) // 8 * rect.h
        bitmap = yield from read(row_bytes)
        mask = yield from read(row_bytes)
        stride = (rect.w + 7) // 8
        primary = np.unpackbits(np.frombuffer(bitmap, np.uint8).reshape(rect.h, stride), axis=1)[
            :, : rect.w
        ].astype(bool)
        bgrx = np.zeros((rect.h, rect.w, 4), np.uint8)
        for channel, offset in ((2, 0), (1, 1), (0, 2)):  # R, G, B into BGRX
            bgrx[..., channel] = np.where(primary, colours[offset], colours[3 + offset])
        self._set_cursor(PseudoEncoding.X_CURSOR, rect, _rgba_from_mask(bgrx, mask, rect.w, rect.h))

    def _read_cursor_with_alpha(self, rect: Rect) -> Needs[None]:
        # rfbproto "Cursor With Alpha": S32 encoding, then RGBA (premultiplied,
        # bytes R, G, B, A) in that encoding.
        self._check_cursor_size(rect)
        encoding = yield from read_s32()
        if encoding != Encoding.RAW:
            self._require_advertised(encoding, "a Cursor With Alpha rect")
            # The shared decoders produce BGRX and would drop the alpha byte.
            raise RemoteProtocolError(
                f"the test client decodes Cursor With Alpha only in Raw, "
                f"not {_encoding_name(encoding)}"
            )
        rgba = yield from read(rect.w * rect.h * 4)
        self._set_cursor(PseudoEncoding.CURSOR_WITH_ALPHA, rect, rgba)

    def _read_vmware_cursor(self, rect: Rect) -> Needs[None]:
        # rfbproto "VMware Cursor Pseudo-encoding": U8 type, U8 pad, then an
        # AND and an XOR mask in the client's format (type 0) or RGBA (type 1).
        self._check_cursor_size(rect)
        cursor_type = yield from read_u8()
        yield from read(1)
        if cursor_type == 1:
            rgba = yield from read(rect.w * rect.h * 4)
        elif cursor_type == 0:
            pf = self.decode_state.pf
            size = rect.w * rect.h * pf.bytes_per_pixel
            and_values = pf.decode_values((yield from read(size)), rect.h, rect.w)
            xor_values = pf.decode_values((yield from read(size)), rect.h, rect.w)
            bgrx = pf.values_to_bgrx(xor_values)
            out = np.zeros((rect.h, rect.w, 4), np.uint8)
            out[..., 0], out[..., 1], out[..., 2] = bgrx[..., 2], bgrx[..., 1], bgrx[..., 0]
            # dst = (dst & and) ^ xor: AND 0 paints the XOR colour; AND set with
            # XOR 0 leaves dst (transparent); AND and XOR both set inverts dst,
            # which RGBA cannot say, so it is shown opaque in the XOR colour.
            opaque = (and_values == 0) | (xor_values != 0)
            out[..., 3] = 255
            out[~opaque] = 0
            rgba = out.tobytes()
        else:
            raise RemoteProtocolError(f"unknown VMware cursor type {cursor_type}")
        self._set_cursor(PseudoEncoding.VMWARE_CURSOR, rect, rgba)

    def _read_vmware_cursor_position(self, rect: Rect) -> Needs[None]:
        self._emit(CursorPosition(rect.x, rect.y))
        yield from ()

    def _read_qemu_ext_key(self, rect: Rect) -> Needs[None]:
        self.extended_key_events = True
        self._emit(ExtendedKeyEventConfirmed())
        yield from ()

    def _read_ext_mouse_buttons(self, rect: Rect) -> Needs[None]:
        self.extended_mouse_buttons = True
        self._emit(ExtendedMouseButtonsConfirmed())
        yield from ()

    def _read_pointer_motion_change(self, rect: Rect) -> Needs[None]:
        if rect.x not in (0, 1):
            raise RemoteProtocolError(f"QEMU pointer motion mode {rect.x} is neither 0 nor 1")
        self._emit(PointerMotionMode(absolute=rect.x == 1))
        yield from ()

    def _read_led_state(self, rect: Rect) -> Needs[None]:
        self._emit(LedState((yield from read_u8())))

    def _read_colour_map(self) -> Needs[None]:
        yield from ()
        raise RemoteProtocolError(
            "SetColourMapEntries sent to a client whose pixel format is true colour"
        )

    def _read_bell(self) -> Needs[None]:
        self._emit(Bell())
        yield from ()

    def _read_server_cut_text(self) -> Needs[None]:
        yield from read(3)
        length = yield from read_u32()
        if length & 0x8000_0000 and PseudoEncoding.EXTENDED_CLIPBOARD in self._advertised:
            # Extended Clipboard: S32, negative = extended message of |len| bytes.
            size = (1 << 32) - length
            if size < 4 or size > MAX_CUT_TEXT:
                raise RemoteProtocolError(f"extended clipboard message of {size} bytes")
            self._parse_extended_clipboard((yield from read(size)))
            return
        if length > MAX_CUT_TEXT:
            raise RemoteProtocolError(f"cut text of {length} bytes")
        self._emit(ServerCutText((yield from read(length)).decode("latin-1")))

    def _parse_extended_clipboard(self, payload: bytes) -> None:
        # rfbproto "Extended Clipboard Pseudo-Encoding".
        (flags,) = _U32.unpack_from(payload)
        body = payload[4:]
        formats = flags & 0xFFFF
        actions = flags & 0xFF00_0000
        if actions & ClipboardFlags.CAPS:
            bits = _format_bits(formats)
            if len(body) != 4 * len(bits):
                raise RemoteProtocolError(
                    f"clipboard caps for {len(bits)} formats carried {len(body)} bytes of sizes"
                )
            sizes = tuple(zip(bits, (s for (s,) in _U32.iter_unpack(body)), strict=True))
            caps = ClipboardCaps(flags, sizes)
            self.server_clipboard_caps = caps
            self._emit(caps)
            return
        if actions not in (
            ClipboardFlags.REQUEST,
            ClipboardFlags.PEEK,
            ClipboardFlags.NOTIFY,
            ClipboardFlags.PROVIDE,
        ):
            raise RemoteProtocolError(
                f"extended clipboard flags {flags:#010x} must name exactly one known action"
            )
        if actions != ClipboardFlags.PROVIDE:
            if body:
                raise RemoteProtocolError("extended clipboard action with unexpected payload")
            if actions == ClipboardFlags.REQUEST:
                self._emit(ClipboardRequest(formats))
            elif actions == ClipboardFlags.PEEK:
                self._emit(ClipboardPeek())
            else:
                self._emit(ClipboardNotify(formats))
            return
        inflater = zlib.decompressobj()
        try:
            # max_length bounds the inflated size before it is allocated.
            data = inflater.decompress(body, MAX_CUT_TEXT + 1)
        except zlib.error as exc:
            raise RemoteProtocolError(f"bad zlib stream in clipboard provide: {exc}") from exc
        if len(data) > MAX_CUT_TEXT or inflater.unconsumed_tail:
            raise RemoteProtocolError("clipboard provide inflates past the size limit")
        items: list[tuple[int, bytes]] = []
        pos = 0
        for fmt in _format_bits(formats):
            if pos + 4 > len(data):
                raise RemoteProtocolError("clipboard provide ended before all its formats")
            (size,) = _U32.unpack_from(data, pos)
            pos += 4
            if pos + size > len(data):
                raise RemoteProtocolError(f"clipboard provide item of {size} bytes is truncated")
            item = data[pos : pos + size]
            pos += size
            if fmt == ClipboardFlags.TEXT:
                if not item.endswith(b"\0"):
                    raise RemoteProtocolError("clipboard text is not NUL-terminated")
                self._utf8(item[:-1], "clipboard text")
            items.append((fmt, item))
        if pos != len(data):
            raise RemoteProtocolError(f"{len(data) - pos} stray bytes after clipboard provide data")
        self._emit(ClipboardProvide(tuple(items)))

    def _read_end_of_continuous_updates(self) -> Needs[None]:
        self._require_advertised(PseudoEncoding.CONTINUOUS_UPDATES, "EndOfContinuousUpdates")
        self.continuous_updates = True
        self._emit(EndOfContinuousUpdates())
        yield from ()

    def _read_server_fence(self) -> Needs[None]:
        self._require_advertised(PseudoEncoding.FENCE, "ServerFence")
        yield from read(3)
        flags = yield from read_u32()
        length = yield from read_u8()
        if length > MAX_FENCE_PAYLOAD:
            raise RemoteProtocolError(f"fence payload of {length} bytes (at most 64)")
        payload = yield from read(length)
        self.fence = True
        self._emit(ServerFence(flags, payload))

    def _read_xvp(self) -> Needs[None]:
        self._require_advertised(PseudoEncoding.XVP, "an xvp message")
        yield from read(1)
        version = yield from read_u8()
        code = yield from read_u8()
        if code == XvpCode.INIT:
            self.xvp_version = version
        elif code != XvpCode.FAIL:
            raise RemoteProtocolError(f"unknown xvp server message code {code}")
        self._emit(Xvp(version, code))

    # -- KasmVNC server messages (protocol.md B.7.3) ------------------------------------

    def _read_kasm_text(self, what: str) -> Needs[str]:
        length = yield from read_u32()
        if length > MAX_NAME:
            raise RemoteProtocolError(f"{what} of {length} bytes")
        return self._utf8((yield from read(length)), what)

    def _read_kasm_stats(self) -> Needs[None]:
        yield from read(3)
        self._emit(KasmStats((yield from self._read_kasm_text("Kasm stats"))))

    def _read_kasm_request_frame_stats(self) -> Needs[None]:
        self._emit(KasmRequestFrameStats())
        yield from ()

    def _read_kasm_binary_clipboard(self) -> Needs[None]:
        count = yield from read_u8()
        items: list[KasmClipboardItem] = []
        total = 0
        for _ in range(count):
            clip_id = yield from read_u32()
            mime_length = yield from read_u8()
            mime = self._utf8((yield from read(mime_length)), "clipboard mime type")
            length = yield from read_u32()
            total += length
            if total > MAX_CUT_TEXT:
                raise RemoteProtocolError(f"binary clipboard of more than {MAX_CUT_TEXT} bytes")
            items.append(KasmClipboardItem(clip_id, mime, (yield from read(length))))
        self._emit(KasmBinaryClipboard(tuple(items)))

    def _read_kasm_video_encoders(self) -> Needs[None]:
        count = yield from read_u8()
        encoders: list[KasmVideoEncoder] = []
        for _ in range(count):
            encoding, qmin, qmax, npresets = _VIDEO_ENCODER.unpack((yield from read(13)))
            raw = yield from read(4 * npresets)
            presets = tuple(p for (p,) in struct.iter_unpack(">i", raw))
            encoders.append(KasmVideoEncoder(encoding, qmin, qmax, presets))
        self._emit(KasmVideoEncoders(tuple(encoders)))

    def _read_kasm_disconnect(self) -> Needs[None]:
        self._require_advertised(PseudoEncoding.KASM_DISCONNECT_NOTIFY, "a disconnect notice")
        flags = yield from read_u8()
        yield from read(3)
        reason = yield from self._read_kasm_text("disconnect reason")
        self._emit(KasmServerDisconnect(bool(flags & 1), reason))

    def _read_kasm_user_added(self) -> Needs[None]:
        self._emit(KasmUserAdded((yield from self._read_kasm_text("user name"))))

    def _read_kasm_user_removed(self) -> Needs[None]:
        self._emit(KasmUserRemoved((yield from self._read_kasm_text("user name"))))

    @staticmethod
    def _utf8(raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"{what} is not UTF-8: {exc}") from exc

    # -- state ------------------------------------------------------------------------

    @property
    def framebuffer(self) -> Framebuffer:
        """The BGRX picture of the desktop, (height, width, 4) uint8. It is
        replaced (not resized in place) when the desktop size changes."""
        return self._fb

    @property
    def width(self) -> int:
        return int(self._fb.shape[1])

    @property
    def height(self) -> int:
        return int(self._fb.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def pixel_format(self) -> PixelFormat:
        return self.decode_state.pf

    @property
    def advertised_encodings(self) -> frozenset[int]:
        """Every encoding this client has advertised so far; the server may
        use any of them (it may not have seen the latest SetEncodings yet)."""
        return frozenset(self._advertised)

    @property
    def established(self) -> bool:
        return self.server_init is not None and self._error is None

    # -- client messages (RFC 6143 7.5, rfbproto, KasmVNC) -----------------------------

    def _require_established(self, what: str) -> None:
        if self.server_init is None:
            raise LocalProtocolError(f"cannot send {what} before ServerInit")

    def _require_kasm(self, what: str) -> None:
        self._require_established(what)
        if self.dialect != "kasm":
            raise LocalProtocolError(f"{what} exists only in the kasm dialect")

    @staticmethod
    def _check_u16(**values: int) -> None:
        for name, value in values.items():
            if not 0 <= value <= 0xFFFF:
                raise LocalProtocolError(f"{name}={value} does not fit in a U16")

    def set_pixel_format(self, pf: PixelFormat) -> bytes:
        """SetPixelFormat. Decoding switches at once, so send it only with no
        update request outstanding, as RFC 6143 7.5.1 requires."""
        self._require_established("SetPixelFormat")
        self.decode_state.pf = pf
        return struct.pack(">B3x", ClientMessage.SET_PIXEL_FORMAT) + pf.pack()

    def set_encodings(self, encodings: Sequence[int]) -> bytes:
        self._require_established("SetEncodings")
        values = [_signed32(e) for e in encodings]
        if len(values) > 0xFFFF:
            raise LocalProtocolError("at most 65535 encodings")
        self._advertised.update(values)
        return struct.pack(f">BxH{len(values)}i", ClientMessage.SET_ENCODINGS, len(values), *values)

    def framebuffer_update_request(self, incremental: bool, rect: Rect | None = None) -> bytes:
        """FramebufferUpdateRequest for `rect`, or for the whole framebuffer."""
        self._require_established("FramebufferUpdateRequest")
        x, y, w, h = rect if rect is not None else (0, 0, self.width, self.height)
        self._check_u16(x=x, y=y, w=w, h=h)
        return struct.pack(
            ">BBHHHH", ClientMessage.FRAMEBUFFER_UPDATE_REQUEST, int(incremental), x, y, w, h
        )

    def key_event(self, keysym: int, down: bool) -> bytes:
        self._require_established("KeyEvent")
        return struct.pack(">BB2xI", ClientMessage.KEY_EVENT, int(down), keysym)

    def pointer_event(
        self, x: int, y: int, buttons: int = 0, *, scroll_x: int = 0, scroll_y: int = 0
    ) -> bytes:
        """PointerEvent. `buttons` has bit N set for button N+1 pressed: bits
        0-2 left/middle/right, 3-6 wheel, 7 back, 8 forward (needs the server's
        ExtendedMouseButtons confirmation). In the kasm dialect the mask is a
        U16 and scroll deltas travel in the message."""
        self._require_established("PointerEvent")
        self._check_u16(x=x, y=y)
        if self.dialect == "kasm":
            if not 0 <= buttons <= 0xFFFF:
                raise LocalProtocolError(f"Kasm button mask {buttons:#x} does not fit in a U16")
            if not (-0x8000 <= scroll_x <= 0x7FFF and -0x8000 <= scroll_y <= 0x7FFF):
                raise LocalProtocolError("scroll deltas must fit in an S16")
            return struct.pack(
                ">BHHHhh", ClientMessage.POINTER_EVENT, buttons, x, y, scroll_x, scroll_y
            )
        if scroll_x or scroll_y:
            raise LocalProtocolError("scroll deltas exist only in the kasm dialect; use buttons")
        if not 0 <= buttons <= 0x7FFF:
            raise LocalProtocolError(f"button mask {buttons:#x} has more than 15 buttons")
        if buttons <= 0xFF:
            return struct.pack(">BBHH", ClientMessage.POINTER_EVENT, buttons, x, y)
        if not self.extended_mouse_buttons:
            raise LocalProtocolError(
                "buttons above 8 need the server's ExtendedMouseButtons confirmation"
            )
        # Extended form: the top bit of button-mask marks it, so back (bit 7)
        # moves to bit 0 of the extra byte, forward to bit 1.
        return struct.pack(
            ">BBHHB", ClientMessage.POINTER_EVENT, (buttons & 0x7F) | 0x80, x, y, buttons >> 7
        )

    def client_cut_text(self, text: str) -> bytes:
        """Old-style ClientCutText: Latin-1, LF line ends."""
        self._require_established("ClientCutText")
        try:
            data = text.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"ClientCutText is Latin-1 only: {exc}") from exc
        return struct.pack(">B3xI", ClientMessage.CLIENT_CUT_TEXT, len(data)) + data

    def _extended_cut_text(self, flags: int, body: bytes = b"") -> bytes:
        self._require_established("an extended clipboard message")
        if self.server_clipboard_caps is None:
            raise LocalProtocolError("the server has not announced Extended Clipboard caps")
        payload = _U32.pack(flags) + body
        return struct.pack(">B3xi", ClientMessage.CLIENT_CUT_TEXT, -len(payload)) + payload

    def clipboard_caps(
        self,
        sizes: Mapping[int, int],
        actions: int = ClipboardFlags.REQUEST
        | ClipboardFlags.PEEK
        | ClipboardFlags.NOTIFY
        | ClipboardFlags.PROVIDE,
    ) -> bytes:
        """Extended Clipboard caps: `sizes` maps each accepted format flag to
        its largest unsolicited size."""
        formats = 0
        for fmt in sizes:
            formats |= fmt
        bits = _format_bits(formats)
        body = b"".join(_U32.pack(sizes[f]) for f in bits)
        return self._extended_cut_text(ClipboardFlags.CAPS | actions | formats, body)

    def clipboard_request(self, formats: int = ClipboardFlags.TEXT) -> bytes:
        return self._extended_cut_text(ClipboardFlags.REQUEST | formats)

    def clipboard_peek(self) -> bytes:
        return self._extended_cut_text(ClipboardFlags.PEEK)

    def clipboard_notify(self, formats: int = ClipboardFlags.TEXT) -> bytes:
        return self._extended_cut_text(ClipboardFlags.NOTIFY | formats)

    def clipboard_provide(self, data: Mapping[int, bytes]) -> bytes:
        """Extended Clipboard provide: `data` maps format flags to their bytes
        (use encode_clipboard_text() for the text format)."""
        formats = 0
        for fmt in data:
            formats |= fmt
        inner = b"".join(_U32.pack(len(data[f])) + data[f] for f in _format_bits(formats))
        return self._extended_cut_text(ClipboardFlags.PROVIDE | formats, zlib.compress(inner))

    def enable_continuous_updates(self, enable: bool, rect: Rect | None = None) -> bytes:
        self._require_established("EnableContinuousUpdates")
        if not self.continuous_updates:
            raise LocalProtocolError("the server has not confirmed ContinuousUpdates")
        x, y, w, h = rect if rect is not None else (0, 0, self.width, self.height)
        self._check_u16(x=x, y=y, w=w, h=h)
        return struct.pack(
            ">BBHHHH", ClientMessage.ENABLE_CONTINUOUS_UPDATES, int(enable), x, y, w, h
        )

    def client_fence(self, flags: int, payload: bytes = b"") -> bytes:
        self._require_established("ClientFence")
        if not self.fence:
            raise LocalProtocolError("the server has not shown Fence support (no ServerFence)")
        if len(payload) > MAX_FENCE_PAYLOAD:
            raise LocalProtocolError("fence payloads are at most 64 bytes")
        return struct.pack(">B3xIB", ClientMessage.CLIENT_FENCE, flags, len(payload)) + payload

    def fence_reply(self, event: ServerFence) -> bytes:
        """The ClientFence answering a ServerFence request: Request and any
        flag this client does not understand cleared, payload echoed."""
        if not event.is_request:
            raise LocalProtocolError("that ServerFence is a response, not a request")
        return self.client_fence(event.flags & FENCE_KNOWN, event.payload)

    def set_desktop_size(self, width: int, height: int, screens: Sequence[Screen]) -> bytes:
        self._require_established("SetDesktopSize")
        if not self.extended_desktop_size:
            raise LocalProtocolError("SetDesktopSize needs an ExtendedDesktopSize rect first")
        self._check_u16(width=width, height=height)
        if len(screens) > 0xFF:
            raise LocalProtocolError("at most 255 screens")
        head = struct.pack(">BxHHBx", ClientMessage.SET_DESKTOP_SIZE, width, height, len(screens))
        return head + b"".join(_SCREEN.pack(*s) for s in screens)

    def qemu_key_event(self, keysym: int, keycode: int, down: bool) -> bytes:
        """QEMU Extended Key Event: `keycode` is the XT scancode (RFB form)."""
        self._require_established("a QEMU key event")
        if not self.extended_key_events:
            raise LocalProtocolError("the server has not confirmed QEMU extended key events")
        return struct.pack(">BBHII", ClientMessage.QEMU, 0, int(down), keysym, keycode)

    def xvp(self, code: int) -> bytes:
        self._require_established("an xvp message")
        if not self.xvp_version:
            raise LocalProtocolError("the server has not sent XVP_INIT")
        if code not in (XvpCode.SHUTDOWN, XvpCode.REBOOT, XvpCode.RESET):
            raise LocalProtocolError(f"xvp code {code} is not a client request")
        return struct.pack(">BxBB", ClientMessage.XVP, 1, code)

    # KasmVNC client messages (protocol.md B.7.3).

    def kasm_request_stats(self) -> bytes:
        self._require_kasm("RequestStats")
        return struct.pack(">B3x", ClientMessage.KASM_REQUEST_STATS)

    def kasm_frame_stats(self, all_value: int, render: int) -> bytes:
        """FrameStats (179). KasmVNC's web client puts its frame rate in
        `all_value` and 0 in `render`; both are opaque U32s."""
        self._require_kasm("FrameStats")
        return struct.pack(">B3xII", ClientMessage.KASM_FRAME_STATS, all_value, render)

    def kasm_binary_clipboard(self, items: Sequence[tuple[str, bytes]]) -> bytes:
        """BinaryClipboard (180): (mime type, data) pairs; no ids on this side."""
        self._require_kasm("BinaryClipboard")
        if len(items) > 0xFF:
            raise LocalProtocolError("at most 255 clipboard items")
        parts = [struct.pack(">BB", ClientMessage.KASM_BINARY_CLIPBOARD, len(items))]
        for mime, data in items:
            raw_mime = mime.encode("ascii")
            if len(raw_mime) > 0xFF:
                raise LocalProtocolError("mime types are at most 255 bytes")
            parts.append(struct.pack(">B", len(raw_mime)) + raw_mime)
            parts.append(_U32.pack(len(data)) + data)
        return b"".join(parts)

    def kasm_video_encoders_request(self, encodings: Sequence[int]) -> bytes:
        self._require_kasm("VideoEncodersRequest")
        if len(encodings) > 0xFF:
            raise LocalProtocolError("at most 255 video encoders")
        return struct.pack(
            f">BB{len(encodings)}i",
            ClientMessage.KASM_VIDEO_ENCODERS,
            len(encodings),
            *(_signed32(e) for e in encodings),
        )

    def kasm_keep_alive(self) -> bytes:
        self._require_kasm("KeepAlive")
        return _U8.pack(ClientMessage.KASM_KEEP_ALIVE)

    def kasm_set_max_video_resolution(self, width: int, height: int) -> bytes:
        """SetMaxVideoResolution (252): no padding, 5 bytes in all."""
        self._require_kasm("SetMaxVideoResolution")
        self._check_u16(width=width, height=height)
        return struct.pack(">BHH", ClientMessage.KASM_SET_MAX_VIDEO_RESOLUTION, width, height)

# The server side of an RFB connection as a state machine with no I/O, after
# h11's Connection: the I/O layer feeds received bytes with `receive_data()`,
# pulls events with `next_event()` until NEED_DATA, and sends whatever
# `data_to_send()` returns. Handshake (RFC 6143 section 7.1-7.3; rfbproto
# "ProtocolVersion", "Security", "VeNCrypt", "ClientInit", "ServerInit") and
# the normal phase (section 7.5) follow the tables below.
#
# Theory of operation: the handshake is a short sequence of states, each
# waiting for a fixed number of bytes. Replies the protocol dictates (the
# security type list, the VNC challenge, a fence reply, EndOfContinuousUpdates)
# are queued here; decisions that need the application (credentials, the
# ServerInit contents, TLS) come out as events and the application answers
# through a method. Any protocol error moves the connection to ERROR, for good:
# every later call raises the same error (h11's sticky error state).
#
# Dialect detection (Dialect.AUTO; trivnc uses it on the WebSocket only, when
# the client offered the "binary" subprotocol, as KasmVNC's web client does;
# raw TCP is always STANDARD). KasmVNC's dialect cannot be negotiated
# (protocol.md B.7.4), but its web client always sends, right after
# ServerInit, SetPixelFormat, VideoEncodersRequest (184), SetEncodings with
# its own pseudo-encodings (-2048..-770: WebP -1024, QOI -1886, -1885, -1884,
# the quality and video knobs), a full update request, and only then input.
# So, while undecided, the connection reads the messages both dialects share
# as standard, and:
#   - a message type only the Kasm dialect has (178-191, 252; in practice
#     184), or a SetEncodings with any value in -2048..-770, selects KASM;
#   - a PointerEvent or a ClientCutText (whose layout or meaning differ
#     between the dialects) selects STANDARD before it is read.
# The choice is final (a later Kasm SetEncodings does not change it) and is
# reported as `DialectSelected`, before the deciding message's own event.
from __future__ import annotations

import enum
import secrets
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..geometry import Rect
from . import constants, writers
from . import events as ev
from .auth import CHALLENGE_SIZE, check_vnc_auth
from .capabilities import ClientCapabilities
from .constants import (
    FENCE_KNOWN,
    ClientMessage,
    ClipboardFlags,
    FenceFlags,
    ProtocolVersion,
    SecurityResult,
    SecurityType,
    VeNCryptSubtype,
)
from .errors import AuthenticationFailed, LocalProtocolError, ProtocolError, RemoteProtocolError
from .pixelformat import BGRX, PixelFormat

#: The I/O layer chooses a connection's dialect here (defined in constants).
Dialect = constants.Dialect


class State(enum.Enum):
    VERSION = enum.auto()
    SECURITY_TYPE = enum.auto()
    VNC_AUTH = enum.auto()
    VENCRYPT_VERSION = enum.auto()
    VENCRYPT_SUBTYPE = enum.auto()
    TLS_HANDSHAKE = enum.auto()
    PLAIN_CREDENTIALS = enum.auto()
    CREDENTIALS_PENDING = enum.auto()
    CLIENT_INIT = enum.auto()
    SERVER_INIT_PENDING = enum.auto()
    NORMAL = enum.auto()
    ERROR = enum.auto()


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by `next_event()` when more bytes must arrive first.
NEED_DATA = _NeedData()

_VERSION_LEN = 12
_TLS_SUBTYPES = {VeNCryptSubtype.TLS_PLAIN: False, VeNCryptSubtype.X509_PLAIN: True}
_QEMU_EXTENDED_KEY = 0


@dataclass(frozen=True)
class SecurityConfig:
    """Which security types the server offers, strongest first."""

    allow_none: bool = False
    vnc_password: str | None = field(default=None, repr=False)
    vencrypt_subtypes: tuple[VeNCryptSubtype, ...] = ()

    def __post_init__(self) -> None:
        allowed = {VeNCryptSubtype.PLAIN, VeNCryptSubtype.TLS_PLAIN, VeNCryptSubtype.X509_PLAIN}
        for sub in self.vencrypt_subtypes:
            if sub not in allowed:
                raise ValueError(f"unsupported VeNCrypt subtype {sub!r}")

    def offered_types(self) -> list[int]:
        types: list[int] = []
        if self.vencrypt_subtypes:
            types.append(SecurityType.VENCRYPT)
        if self.vnc_password is not None:
            types.append(SecurityType.VNC_AUTH)
        if self.allow_none:
            types.append(SecurityType.NONE)
        return types


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may make us allocate."""

    max_cut_text: int = 10 * 1024 * 1024
    max_encodings: int = 1024
    max_username: int = 1024
    max_password: int = 1024
    max_clipboard_items: int = 16


class _Buffer:
    """Received bytes with a read position; compacted lazily so that parsing
    many small messages out of one large chunk stays linear (h11's
    _receivebuffer.py does the same)."""

    __slots__ = ("_data", "_pos")

    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos > len(self._data) // 2:
            del self._data[: self._pos]
            self._pos = 0
        self._data += data

    def peek(self, n: int, offset: int = 0) -> bytes | None:
        start = self._pos + offset
        if start + n > len(self._data):
            return None
        return bytes(self._data[start : start + n])

    def take(self, n: int) -> bytes | None:
        data = self.peek(n)
        if data is not None:
            self._pos += n
        return data


_Reader = Callable[["ServerConnection"], "ev.Event | None"]


class ServerConnection:
    """One client's RFB protocol state, server side."""

    def __init__(
        self,
        security: SecurityConfig,
        *,
        dialect: Dialect = Dialect.STANDARD,
        limits: Limits | None = None,
        clipboard_max_size: int = 1024 * 1024,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if not security.offered_types():
            raise ValueError("the server must offer at least one security type")
        self.security = security
        self.dialect = dialect
        self.limits = limits or Limits()
        self.clipboard_max_size = clipboard_max_size
        self._random_bytes = random_bytes
        self.state = State.VERSION
        self.version: ProtocolVersion | None = None
        self.security_type: int | None = None
        self.username: str | None = None
        #: The pixel format the client asked for (the server's own until then).
        self.pixel_format: PixelFormat = BGRX
        self.capabilities = ClientCapabilities.from_encodings(())
        #: Set once the server confirmed ExtendedMouseButtons in an update.
        self.extended_mouse_buttons = False
        #: Area of continuous updates, or None when they are off.
        self.continuous_updates: Rect | None = None
        self._buffer = _Buffer()
        self._outgoing = bytearray()
        self._pending: list[ev.Event] = []
        self._error: ProtocolError | None = None
        self._challenge = b""
        self._vencrypt_tls = False
        self._seen_fence = False
        self._seen_continuous_updates = False
        self._outgoing += b"RFB 003.008\n"

    # -- I/O boundary ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_if_error()
        self._buffer.feed(data)

    def has_data_to_send(self) -> bool:
        return bool(self._outgoing)

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def next_event(self) -> ev.Event | _NeedData:
        """The next event, or NEED_DATA. Raises ProtocolError (sticky)."""
        self._raise_if_error()
        if self._pending:
            return self._pending.pop(0)
        try:
            event = self._step()
        except ProtocolError as exc:
            self._fail(exc)
            raise
        return NEED_DATA if event is None else event

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    def _raise_if_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, exc: ProtocolError) -> None:
        """Enter the sticky ERROR state; during the security phase of 3.8, tell
        the client why (SecurityResult failed + reason)."""
        if self._error is not None:
            return
        in_security = self.state in (
            State.SECURITY_TYPE,
            State.VNC_AUTH,
            State.VENCRYPT_SUBTYPE,
            State.PLAIN_CREDENTIALS,
            State.CREDENTIALS_PENDING,
        )
        if in_security:
            self._outgoing += struct.pack(">I", SecurityResult.FAILED)
            if self.version == ProtocolVersion.V3_8:
                reason = exc.reason.encode()
                self._outgoing += struct.pack(">I", len(reason)) + reason
        self.state = State.ERROR
        self._error = exc

    def _step(self) -> ev.Event | None:
        while True:
            handler = _STATE_HANDLERS.get(self.state)
            if handler is None:
                return None  # waiting for the application (or done)
            before = self.state
            event = handler(self)
            if event is not None or self.state == before:
                return event

    # -- handshake ---------------------------------------------------------------

    def _read_version(self) -> ev.Event | None:
        data = self._buffer.take(_VERSION_LEN)
        if data is None:
            return None
        if not (
            data[:4] == b"RFB "
            and data[7:8] == b"."
            and data[11:12] == b"\n"
            and data[4:7].isdigit()
            and data[8:11].isdigit()
        ):
            raise RemoteProtocolError(f"not an RFB version string: {data!r}")
        major, minor = int(data[4:7]), int(data[8:11])
        if major != 3:
            raise RemoteProtocolError(f"unsupported RFB version {major}.{minor}")
        # KasmVNC's mapping of unofficial minors (SConnection::processVersionMsg).
        if minor >= 8:
            self.version = ProtocolVersion.V3_8
        elif minor == 7:
            self.version = ProtocolVersion.V3_7
        else:
            self.version = ProtocolVersion.V3_3
        offered = self.security.offered_types()
        if self.version == ProtocolVersion.V3_3:
            # The server picks, and 3.3 knows only None and VNC Authentication.
            legacy = [t for t in offered if t in (SecurityType.VNC_AUTH, SecurityType.NONE)]
            if not legacy:
                reason = b"this server requires RFB 3.7 or later (VeNCrypt)"
                self._outgoing += struct.pack(">II", 0, len(reason)) + reason
                raise RemoteProtocolError(reason.decode())
            self._outgoing += struct.pack(">I", legacy[0])
            return self._start_security(legacy[0])
        self._outgoing += bytes((len(offered), *offered))
        self.state = State.SECURITY_TYPE
        return None

    def _read_security_type(self) -> ev.Event | None:
        data = self._buffer.take(1)
        if data is None:
            return None
        chosen = data[0]
        if chosen not in self.security.offered_types():
            raise RemoteProtocolError(f"client chose security type {chosen}, which was not offered")
        return self._start_security(chosen)

    def _start_security(self, chosen: int) -> ev.Event | None:
        self.security_type = chosen
        if chosen == SecurityType.NONE:
            return self._security_ok()
        if chosen == SecurityType.VNC_AUTH:
            self._challenge = self._random_bytes(CHALLENGE_SIZE)
            self._outgoing += self._challenge
            self.state = State.VNC_AUTH
            return None
        self._outgoing += b"\x00\x02"  # VeNCrypt 0.2
        self.state = State.VENCRYPT_VERSION
        return None

    def _security_ok(self) -> ev.Event:
        # 3.3 and 3.7 skip SecurityResult after None (RFC 6143 section 7.2.1).
        if self.security_type != SecurityType.NONE or self.version == ProtocolVersion.V3_8:
            self._outgoing += struct.pack(">I", SecurityResult.OK)
        self.state = State.CLIENT_INIT
        assert self.security_type is not None
        return ev.AuthenticationSucceeded(self.security_type, self.username)

    def _read_vnc_auth(self) -> ev.Event | None:
        data = self._buffer.take(CHALLENGE_SIZE)
        if data is None:
            return None
        assert self.security.vnc_password is not None
        if not check_vnc_auth(self.security.vnc_password, self._challenge, data):
            raise AuthenticationFailed("authentication failed")
        return self._security_ok()

    def _read_vencrypt_version(self) -> ev.Event | None:
        data = self._buffer.take(2)
        if data is None:
            return None
        if data != b"\x00\x02":
            self._outgoing += b"\x01"
            raise RemoteProtocolError(f"unsupported VeNCrypt version {data[0]}.{data[1]}")
        subtypes = self.security.vencrypt_subtypes
        self._outgoing += b"\x00" + bytes((len(subtypes),))
        self._outgoing += b"".join(struct.pack(">I", s) for s in subtypes)
        self.state = State.VENCRYPT_SUBTYPE
        return None

    def _read_vencrypt_subtype(self) -> ev.Event | None:
        data = self._buffer.take(4)
        if data is None:
            return None
        (chosen,) = struct.unpack(">I", data)
        if chosen not in self.security.vencrypt_subtypes:
            raise RemoteProtocolError(
                f"client chose VeNCrypt subtype {chosen}, which was not offered"
            )
        if chosen in _TLS_SUBTYPES:
            self._outgoing += b"\x01"  # for the TLS subtypes, 1 means "go ahead"
            self.state = State.TLS_HANDSHAKE
            if len(self._buffer):
                # Bytes after the subtype belong to the TLS handshake; the I/O
                # layer must hand the stream over unread, so this is an error.
                raise RemoteProtocolError("data before the TLS handshake")
            return ev.StartTLS(x509=_TLS_SUBTYPES[VeNCryptSubtype(chosen)])
        self.state = State.PLAIN_CREDENTIALS
        return None

    def tls_established(self) -> None:
        """The I/O layer finished the TLS handshake after StartTLS."""
        self._raise_if_error()
        if self.state != State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_established() in state {self.state.name}")
        self._vencrypt_tls = True
        self.state = State.PLAIN_CREDENTIALS

    @property
    def over_tls(self) -> bool:
        return self._vencrypt_tls

    def _read_plain_credentials(self) -> ev.Event | None:
        header = self._buffer.peek(8)
        if header is None:
            return None
        ulen, plen = struct.unpack(">II", header)
        if ulen > self.limits.max_username or plen > self.limits.max_password:
            raise AuthenticationFailed("username or password too long")
        data = self._buffer.take(8 + ulen + plen)
        if data is None:
            return None
        try:
            username = data[8 : 8 + ulen].decode()
            password = data[8 + ulen :].decode()
        except UnicodeDecodeError:
            raise AuthenticationFailed("username or password is not UTF-8") from None
        self.username = username
        self.state = State.CREDENTIALS_PENDING
        return ev.CredentialsReceived(username, password)

    def accept_credentials(self) -> None:
        self._raise_if_error()
        if self.state != State.CREDENTIALS_PENDING:
            raise LocalProtocolError(f"accept_credentials() in state {self.state.name}")
        self._pending.append(self._security_ok())

    def reject_credentials(self, reason: str = "authentication failed") -> AuthenticationFailed:
        """Queue the failure and enter ERROR; returns the error for logging."""
        self._raise_if_error()
        if self.state != State.CREDENTIALS_PENDING:
            raise LocalProtocolError(f"reject_credentials() in state {self.state.name}")
        exc = AuthenticationFailed(reason)
        self._fail(exc)
        return exc

    def refuse(self, reason: str) -> None:
        """Turn the client away before the handshake (the server is full):
        after the ProtocolVersion already queued, an empty security-types list
        and the reason (RFC 6143 section 7.1.2), which RFB 3.7 and 3.8
        clients read once they have sent their version; an RFB 3.3 client
        sees a failure without a readable reason. The connection enters ERROR."""
        self._raise_if_error()
        if self.state != State.VERSION:
            raise LocalProtocolError(f"refuse() in state {self.state.name}")
        reason_b = reason.encode()
        self._outgoing += b"\x00" + struct.pack(">I", len(reason_b)) + reason_b
        self.state = State.ERROR
        self._error = LocalProtocolError(f"refused: {reason}")

    def _read_client_init(self) -> ev.Event | None:
        data = self._buffer.take(1)
        if data is None:
            return None
        self.state = State.SERVER_INIT_PENDING
        return ev.ClientInit(shared=data[0] != 0)

    def send_server_init(self, width: int, height: int, name: str) -> None:
        """ServerInit (RFC 6143 section 7.3.2) in trivnc's native BGRX format."""
        self._raise_if_error()
        if self.state != State.SERVER_INIT_PENDING:
            raise LocalProtocolError(f"send_server_init() in state {self.state.name}")
        name_b = name.encode()
        self._outgoing += struct.pack(">HH", width, height) + BGRX.pack()
        self._outgoing += struct.pack(">I", len(name_b)) + name_b
        self.state = State.NORMAL

    # -- normal phase ------------------------------------------------------------

    def _read_message(self) -> ev.Event | None:
        while True:
            head = self._buffer.peek(1)
            if head is None:
                return None
            reader = _READERS[self.dialect].get(head[0])
            if reader is None:
                raise RemoteProtocolError(f"unknown message type {head[0]}")
            event = reader(self)
            if event is None:
                return None
            if event is not _CONSUMED:
                return event

    def _take_fixed(self, n: int) -> bytes | None:
        return self._buffer.take(n)

    def _r_set_pixel_format(self) -> ev.Event | None:
        data = self._take_fixed(20)
        if data is None:
            return None
        pf = PixelFormat.unpack(data[4:20])
        self.pixel_format = pf
        return ev.SetPixelFormat(pf)

    def _r_set_encodings(self) -> ev.Event | None:
        head = self._buffer.peek(4)
        if head is None:
            return None
        (count,) = struct.unpack(">H", head[2:4])
        if count > self.limits.max_encodings:
            raise RemoteProtocolError(f"SetEncodings with {count} encodings")
        data = self._buffer.take(4 + 4 * count)
        if data is None:
            return None
        encodings = struct.unpack(f">{count}i", data[4:])
        self.capabilities = ClientCapabilities.from_encodings(encodings)
        caps = self.capabilities
        selected = self.dialect is Dialect.AUTO and caps.is_kasm_client
        if selected:
            self.dialect = Dialect.KASM
        # Obligations on first sight of a capability (rfbproto "Fence",
        # "ContinuousUpdates") and on every sight of ExtendedClipboard.
        if caps.fence and not self._seen_fence:
            self._seen_fence = True
            self._outgoing += writers.server_fence(FenceFlags.REQUEST, b"")
        if caps.continuous_updates and not self._seen_continuous_updates:
            self._seen_continuous_updates = True
            self._outgoing += writers.end_of_continuous_updates()
        if caps.extended_clipboard and self.dialect is not Dialect.KASM:
            actions = (
                ClipboardFlags.REQUEST
                | ClipboardFlags.PEEK
                | ClipboardFlags.NOTIFY
                | ClipboardFlags.PROVIDE
            )
            self._outgoing += writers.clipboard_caps(
                {ClipboardFlags.TEXT: self.clipboard_max_size}, actions
            )
        if selected:
            self._pending.append(ev.SetEncodings(encodings))
            return ev.DialectSelected(Dialect.KASM)
        return ev.SetEncodings(encodings)

    def _r_auto_select(self, dialect: Dialect) -> ev.Event:
        """Dialect.AUTO, undecided: the next message decides. It stays in the
        buffer and is read with the chosen dialect's readers."""
        self.dialect = dialect
        return ev.DialectSelected(dialect)

    def _r_update_request(self) -> ev.Event | None:
        data = self._take_fixed(10)
        if data is None:
            return None
        incremental, x, y, w, h = struct.unpack(">BHHHH", data[1:])
        return ev.FramebufferUpdateRequest(bool(incremental), Rect(x, y, w, h))

    def _r_key(self) -> ev.Event | None:
        data = self._take_fixed(8)
        if data is None:
            return None
        down, keysym = data[1], struct.unpack(">I", data[4:8])[0]
        return ev.KeyEvent(keysym, bool(down))

    def _r_pointer(self) -> ev.Event | None:
        if self.dialect == Dialect.KASM:
            data = self._take_fixed(11)
            if data is None:
                return None
            mask, x, y, sx, sy = struct.unpack(">HHHhh", data[1:])
            return ev.PointerEvent(x, y, mask, sx, sy)
        head = self._buffer.peek(2)
        if head is None:
            return None
        extended = self.extended_mouse_buttons and head[1] & 0x80
        data = self._take_fixed(7 if extended else 6)
        if data is None:
            return None
        mask, x, y = struct.unpack(">BHH", data[1:6])
        if extended:
            # Bit 7 now says "another byte follows"; that byte's bits 0-1 are
            # buttons 8 and 9 (rfbproto "ExtendedMouseButtons").
            mask = (mask & 0x7F) | (data[6] << 7)
        return ev.PointerEvent(x, y, mask)

    def _r_cut_text(self) -> ev.Event | None:
        head = self._buffer.peek(8)
        if head is None:
            return None
        (length,) = struct.unpack(">i", head[4:8])
        extended = length < 0 and self.capabilities.extended_clipboard
        size = -length if extended else length & 0xFFFFFFFF
        if size > self.limits.max_cut_text:
            raise RemoteProtocolError(f"cut text of {size} bytes exceeds the limit")
        data = self._buffer.take(8 + size)
        if data is None:
            return None
        payload = data[8:]
        if extended:
            return self._parse_extended_clipboard(payload)
        if self.dialect == Dialect.KASM:
            # KasmVNC ignores old-style cut text; its client uses message 180.
            return _CONSUMED
        return ev.ClientCutText(payload.decode("latin-1"))

    def _parse_extended_clipboard(self, payload: bytes) -> ev.Event:
        if len(payload) < 4:
            raise RemoteProtocolError("extended clipboard message without flags")
        (flags,) = struct.unpack(">I", payload[:4])
        body = payload[4:]
        formats = flags & 0xFFFF
        if flags & ClipboardFlags.CAPS:
            nformats = bin(formats).count("1")
            if len(body) < 4 * nformats:
                raise RemoteProtocolError("extended clipboard caps too short")
            sizes = struct.unpack(f">{nformats}I", body[: 4 * nformats])
            bits = [1 << b for b in range(16) if formats & (1 << b)]
            return ev.ClipboardCaps(flags & 0x1F000000, dict(zip(bits, sizes, strict=True)))
        if flags & ClipboardFlags.REQUEST:
            return ev.ClipboardRequest(formats)
        if flags & ClipboardFlags.PEEK:
            return ev.ClipboardPeek()
        if flags & ClipboardFlags.NOTIFY:
            return ev.ClipboardNotify(formats)
        if flags & ClipboardFlags.PROVIDE:
            return self._parse_clipboard_provide(formats, body)
        raise RemoteProtocolError(f"extended clipboard message with no action (flags {flags:#x})")

    def _parse_clipboard_provide(self, formats: int, body: bytes) -> ev.Event:
        limit = self.limits.max_cut_text
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise RemoteProtocolError(f"bad zlib data in clipboard provide: {exc}") from None
        if len(raw) > limit or inflater.unconsumed_tail:
            raise RemoteProtocolError("clipboard provide inflates beyond the limit")
        items: dict[int, bytes] = {}
        pos = 0
        for bit in range(16):
            if not formats & (1 << bit):
                continue
            if pos + 4 > len(raw):
                raise RemoteProtocolError("clipboard provide truncated")
            (size,) = struct.unpack(">I", raw[pos : pos + 4])
            if pos + 4 + size > len(raw):
                raise RemoteProtocolError("clipboard provide truncated")
            items[1 << bit] = raw[pos + 4 : pos + 4 + size]
            pos += 4 + size
        text = None
        if ClipboardFlags.TEXT in items:
            text = items[ClipboardFlags.TEXT].split(b"\0", 1)[0].decode("utf-8", "replace")
            text = text.replace("\r\n", "\n")
        return ev.ClipboardProvide(items, text)

    def _r_continuous_updates(self) -> ev.Event | None:
        data = self._take_fixed(10)
        if data is None:
            return None
        if not self.capabilities.continuous_updates:
            raise RemoteProtocolError("EnableContinuousUpdates without the pseudo-encoding")
        enable, x, y, w, h = struct.unpack(">BHHHH", data[1:])
        rect = Rect(x, y, w, h)
        if enable:
            self.continuous_updates = rect
        else:
            # A disable is answered at once, even if updates were already off.
            self.continuous_updates = None
            self._outgoing += writers.end_of_continuous_updates()
        return ev.EnableContinuousUpdates(bool(enable), rect)

    def _r_fence(self) -> ev.Event | None:
        head = self._buffer.peek(9)
        if head is None:
            return None
        flags, length = struct.unpack(">IB", head[4:9])
        if length > 64:
            raise RemoteProtocolError(f"fence payload of {length} bytes (at most 64)")
        data = self._buffer.take(9 + length)
        if data is None:
            return None
        payload = data[9:]
        if flags & FenceFlags.REQUEST:
            # Reply at once with Request and unknown bits cleared.
            self._outgoing += writers.server_fence(flags & FENCE_KNOWN, payload)
        return ev.ClientFence(flags, payload)

    def _r_xvp(self) -> ev.Event | None:
        data = self._take_fixed(4)
        if data is None:
            return None
        return ev.XvpRequest(version=data[2], code=data[3])

    def _r_set_desktop_size(self) -> ev.Event | None:
        head = self._buffer.peek(8)
        if head is None:
            return None
        width, height, count = struct.unpack(">HHB", head[2:7])
        data = self._buffer.take(8 + 16 * count)
        if data is None:
            return None
        screens = tuple(
            ev.Screen(*struct.unpack(">IHHHHI", data[8 + 16 * i : 24 + 16 * i]))
            for i in range(count)
        )
        return ev.SetDesktopSize(width, height, screens)

    def _r_qemu(self) -> ev.Event | None:
        head = self._buffer.peek(2)
        if head is None:
            return None
        if head[1] != _QEMU_EXTENDED_KEY:
            raise RemoteProtocolError(f"unsupported QEMU message subtype {head[1]}")
        data = self._take_fixed(12)
        if data is None:
            return None
        down, keysym, keycode = struct.unpack(">HII", data[2:12])
        return ev.QEMUKeyEvent(keysym, keycode, bool(down))

    # -- Kasm dialect ------------------------------------------------------------

    def _r_kasm_fixed(self, size: int, make: Callable[[bytes], ev.Event]) -> ev.Event | None:
        data = self._take_fixed(size)
        return None if data is None else make(data)

    def _r_kasm_clipboard(self) -> ev.Event | None:
        head = self._buffer.peek(2)
        if head is None:
            return None
        count = head[1]
        if count > self.limits.max_clipboard_items:
            raise RemoteProtocolError(f"binary clipboard with {count} items")
        pos, total = 2, 0
        spans = []
        for _ in range(count):
            mlen_b = self._buffer.peek(1, pos)
            if mlen_b is None:
                return None
            mlen = mlen_b[0]
            dlen_b = self._buffer.peek(4, pos + 1 + mlen)
            if dlen_b is None:
                return None
            (dlen,) = struct.unpack(">I", dlen_b)
            total += dlen
            if total > self.limits.max_cut_text:
                raise RemoteProtocolError("binary clipboard exceeds the size limit")
            spans.append((pos + 1, mlen, pos + 5 + mlen, dlen))
            pos += 5 + mlen + dlen
        data = self._buffer.take(pos)
        if data is None:
            return None
        items = []
        for mstart, mlen, dstart, dlen in spans:
            mime = data[mstart : mstart + mlen].decode("ascii", "replace")
            items.append((mime, data[dstart : dstart + dlen]))
        return ev.KasmBinaryClipboard(tuple(items))

    def _r_kasm_video_encoders(self) -> ev.Event | None:
        head = self._buffer.peek(2)
        if head is None:
            return None
        count = head[1]
        data = self._buffer.take(2 + 4 * count)
        if data is None:
            return None
        return ev.KasmVideoEncodersRequest(struct.unpack(f">{count}i", data[2:]))

    def _r_kasm_length_prefixed(
        self, fixed: int, length_at: int, length_fmt: str
    ) -> ev.Event | None:
        """Messages trivnc only skips: read the length, bound it, consume."""
        size = struct.calcsize(length_fmt)
        head = self._buffer.peek(length_at + size)
        if head is None:
            return None
        (length,) = struct.unpack(length_fmt, head[length_at:])
        if length > self.limits.max_cut_text:
            raise RemoteProtocolError("Kasm message too long")
        data = self._buffer.take(fixed + length)
        if data is None:
            return None
        return ev.KasmUnsupported(data[0])

    def _r_kasm_unix_relay(self) -> ev.Event | None:
        head = self._buffer.peek(2)
        if head is None:
            return None
        name_len = head[1]
        tail = self._buffer.peek(4, 2 + name_len)
        if tail is None:
            return None
        (length,) = struct.unpack(">I", tail)
        if length > self.limits.max_cut_text:
            raise RemoteProtocolError("unix relay message too long")
        data = self._buffer.take(6 + name_len + length)
        return None if data is None else ev.KasmUnsupported(data[0])


class _Consumed(ev.Event):
    """A message that was read and needs no event (see _read_message)."""

    __slots__ = ()


_CONSUMED = _Consumed()

_STATE_HANDLERS: dict[State, Callable[[ServerConnection], ev.Event | None]] = {
    State.VERSION: ServerConnection._read_version,
    State.SECURITY_TYPE: ServerConnection._read_security_type,
    State.VNC_AUTH: ServerConnection._read_vnc_auth,
    State.VENCRYPT_VERSION: ServerConnection._read_vencrypt_version,
    State.VENCRYPT_SUBTYPE: ServerConnection._read_vencrypt_subtype,
    State.PLAIN_CREDENTIALS: ServerConnection._read_plain_credentials,
    State.CLIENT_INIT: ServerConnection._read_client_init,
    State.NORMAL: ServerConnection._read_message,
}

_STANDARD_READERS: dict[int, Callable[[ServerConnection], ev.Event | None]] = {
    ClientMessage.SET_PIXEL_FORMAT: ServerConnection._r_set_pixel_format,
    ClientMessage.SET_ENCODINGS: ServerConnection._r_set_encodings,
    ClientMessage.FRAMEBUFFER_UPDATE_REQUEST: ServerConnection._r_update_request,
    ClientMessage.KEY_EVENT: ServerConnection._r_key,
    ClientMessage.POINTER_EVENT: ServerConnection._r_pointer,
    ClientMessage.CLIENT_CUT_TEXT: ServerConnection._r_cut_text,
    ClientMessage.ENABLE_CONTINUOUS_UPDATES: ServerConnection._r_continuous_updates,
    ClientMessage.CLIENT_FENCE: ServerConnection._r_fence,
    ClientMessage.XVP: ServerConnection._r_xvp,
    ClientMessage.SET_DESKTOP_SIZE: ServerConnection._r_set_desktop_size,
    ClientMessage.QEMU: ServerConnection._r_qemu,
}


def _fixed(
    size: int, make: Callable[[bytes], ev.Event]
) -> Callable[[ServerConnection], ev.Event | None]:
    return lambda conn: conn._r_kasm_fixed(size, make)


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from(">I", data, offset)[0]
    return value


_KASM_READERS: dict[int, Callable[[ServerConnection], ev.Event | None]] = {
    **_STANDARD_READERS,
    ClientMessage.KASM_REQUEST_STATS: _fixed(4, lambda d: ev.KasmRequestStats()),
    ClientMessage.KASM_FRAME_STATS: _fixed(12, lambda d: ev.KasmFrameStats(_u32(d, 4), _u32(d, 8))),
    ClientMessage.KASM_BINARY_CLIPBOARD: ServerConnection._r_kasm_clipboard,
    ClientMessage.KASM_UPGRADE_TO_UDP: lambda c: c._r_kasm_length_prefixed(3, 1, ">H"),
    ClientMessage.KASM_SUBSCRIBE_UNIX_RELAY: lambda c: c._r_kasm_length_prefixed(2, 1, ">B"),
    ClientMessage.KASM_UNIX_RELAY: ServerConnection._r_kasm_unix_relay,
    ClientMessage.KASM_VIDEO_ENCODERS: ServerConnection._r_kasm_video_encoders,
    ClientMessage.KASM_KEEP_ALIVE: _fixed(1, lambda d: ev.KasmKeepAlive()),
    ClientMessage.KASM_DIRECT_MOUSE: _fixed(10, lambda d: ev.KasmUnsupported(d[0])),
    ClientMessage.KASM_LATENCY: _fixed(8, lambda d: ev.KasmUnsupported(d[0])),
    ClientMessage.KASM_NETWORK_STATS: _fixed(4, lambda d: ev.KasmUnsupported(d[0])),
    ClientMessage.KASM_SYSTEM_STATS: _fixed(4, lambda d: ev.KasmUnsupported(d[0])),
    ClientMessage.KASM_SET_MAX_VIDEO_RESOLUTION: _fixed(
        5, lambda d: ev.KasmSetMaxVideoResolution(*struct.unpack(">HH", d[1:5]))
    ),
}

#: Dialect.AUTO before it is decided (see "Dialect detection" at the top).
_AUTO_READERS: dict[int, Callable[[ServerConnection], ev.Event | None]] = {
    **_STANDARD_READERS,
    ClientMessage.POINTER_EVENT: lambda c: c._r_auto_select(Dialect.STANDARD),
    ClientMessage.CLIENT_CUT_TEXT: lambda c: c._r_auto_select(Dialect.STANDARD),
    **{
        t: lambda c: c._r_auto_select(Dialect.KASM)
        for t in _KASM_READERS
        if t not in _STANDARD_READERS
    },
}

_READERS: dict[Dialect, dict[int, Callable[[ServerConnection], ev.Event | None]]] = {
    Dialect.STANDARD: _STANDARD_READERS,
    Dialect.KASM: _KASM_READERS,
    Dialect.AUTO: _AUTO_READERS,
}

# The trio side of the test client: runs trivnc.testing.client's sans-io
# ClientConnection over a trio Stream (TCP, TLS after VeNCrypt's StartTLS, or
# any Stream such as one end of trio.testing.memory_stream_pair). The RFB
# rules live in client.py (RFC 6143 section 7, rfbproto, KasmVNC); this module
# only moves bytes, owns the tasks, and offers the conveniences tests want.
#
# Shape (trio-websocket's per-connection nursery): the handshake runs in the
# caller's task under a deadline; then one receive task reads the stream and
# publishes events, and one writer task owns every write, until the context
# manager exits. Writes are queued in order on an unbounded channel, so the
# receive task can queue a fence reply without ever waiting on a write (a
# reader blocked on a writer blocked on a peer that waits for us to read is a
# deadlock), and the reply is queued before its ServerFence is published, so it
# precedes anything the caller sends in response to that event.
from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Final, TypeVar

import numpy as np
import trio

from ..geometry import Rect
from ..rfb.constants import ClipboardFlags, Encoding, ProtocolVersion, PseudoEncoding
from ..rfb.errors import ProtocolError, RemoteProtocolError
from ..rfb.pixelformat import PixelFormat
from .client import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Dialect,
    Event,
    FramebufferUpdate,
    HandshakeFailed,
    ServerFence,
    ServerInit,
    StartTLS,
    encode_clipboard_text,
    keysym_for_char,
)
from .decode import Framebuffer

__all__ = [
    "DEFAULT_ENCODINGS",
    "ConnectionClosedError",
    "HandshakeError",
    "VncClient",
    "open_test_client",
    "wrap_stream",
]

#: Lossless encodings the shared decoders handle (no quality level, so Tight
#: never sends JPEG), and the pseudo-encodings a desktop client normally sends.
DEFAULT_ENCODINGS: Final[tuple[int, ...]] = (
    Encoding.TIGHT,
    Encoding.ZRLE,
    Encoding.HEXTILE,
    Encoding.ZLIB,
    Encoding.RRE,
    Encoding.COPY_RECT,
    Encoding.RAW,
    PseudoEncoding.DESKTOP_SIZE,
    PseudoEncoding.EXTENDED_DESKTOP_SIZE,
    PseudoEncoding.LAST_RECT,
    PseudoEncoding.DESKTOP_NAME,
    PseudoEncoding.CURSOR,
)
DEFAULT_TIMEOUT: Final = 10.0
_RECEIVE_SIZE: Final = 1 << 16
_CLOSE_TIMEOUT: Final = 2.0

E = TypeVar("E", bound=Event)


class HandshakeError(Exception):
    """The server refused the connection (or offered nothing we can use)."""

    def __init__(self, event: HandshakeFailed) -> None:
        super().__init__(f"{event.stage}: {event.reason}")
        self.event = event
        self.reason = event.reason


class ConnectionClosedError(Exception):
    """The connection ended while waiting for something from the server."""


class VncClient:
    """A connected, initialised RFB client. Create it with open_test_client()
    or wrap_stream(); the context manager owns its receive task and stream.

    Events other than those consumed by the handshake are kept, oldest first,
    until a wait_for()/next_update() call takes them (at most
    `max_pending_events`; the oldest are dropped beyond that)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: ClientConnection,
        *,
        auto_fence_reply: bool = True,
        max_pending_events: int = 10_000,
    ) -> None:
        self.conn = conn
        self.auto_fence_reply = auto_fence_reply
        self.handshake_events: list[Event] = []
        self._stream = stream
        self._outgoing: trio.MemorySendChannel[tuple[bytes, trio.Event]] | None = None
        self._write_failure: BaseException | None = None
        # (trio.current_time() when parsed, event): when an update completed
        # is the I/O layer's knowledge, not the sans-io connection's.
        self._pending: deque[tuple[float, Event]] = deque(maxlen=max_pending_events)
        self._arrived = trio.Event()
        self._finished = False
        self._failure: BaseException | None = None
        self._failure_reported = False

    # -- state ------------------------------------------------------------------------

    @property
    def framebuffer(self) -> Framebuffer:
        """The live BGRX framebuffer (height, width, 4); copy it to keep it."""
        return self.conn.framebuffer

    @property
    def size(self) -> tuple[int, int]:
        return self.conn.size

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def pixel_format(self) -> PixelFormat:
        return self.conn.pixel_format

    @property
    def server_init(self) -> ServerInit:
        if self.conn.server_init is None:
            raise RuntimeError("the handshake has not finished")
        return self.conn.server_init

    @property
    def stream(self) -> trio.abc.Stream:
        """The stream in use (a trio.SSLStream after StartTLS)."""
        return self._stream

    # -- sending ----------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send raw bytes, e.g. a message built by hand to test the server.
        Returns once they are written; writes keep the order of the calls."""
        if not data:
            return
        if self._outgoing is None:  # handshake: no writer task yet, one task
            await self._stream.send_all(data)
            return
        if self._write_failure is not None:
            raise self._write_failure
        written = trio.Event()
        self._outgoing.send_nowait((data, written))
        await written.wait()
        if self._write_failure is not None:
            raise self._write_failure

    async def set_encodings(self, encodings: Sequence[int]) -> None:
        await self.send(self.conn.set_encodings(encodings))

    async def set_pixel_format(self, pf: PixelFormat) -> None:
        await self.send(self.conn.set_pixel_format(pf))

    async def request_update(self, incremental: bool = True, rect: Rect | None = None) -> None:
        """Send a FramebufferUpdateRequest. Updates that arrived before it and
        were not taken yet are dropped, so next_update() then returns an
        update that arrived after this request was sent."""
        self._drop(FramebufferUpdate)
        await self.send(self.conn.framebuffer_update_request(incremental, rect))

    async def key(self, keysym: int, down: bool | None = None) -> None:
        """A key press (down=True), release (False), or both (None)."""
        if down is None:
            await self.send(self.conn.key_event(keysym, True) + self.conn.key_event(keysym, False))
        else:
            await self.send(self.conn.key_event(keysym, down))

    async def type_text(self, text: str) -> None:
        """Press and release the keysym of each character, in one write."""
        await self.send(
            b"".join(
                self.conn.key_event(sym, True) + self.conn.key_event(sym, False)
                for sym in map(keysym_for_char, text)
            )
        )

    async def pointer(
        self, x: int, y: int, buttons: int = 0, *, scroll_x: int = 0, scroll_y: int = 0
    ) -> None:
        await self.send(
            self.conn.pointer_event(x, y, buttons, scroll_x=scroll_x, scroll_y=scroll_y)
        )

    async def click(self, x: int, y: int, button: int = 1) -> None:
        """Move to (x, y), press and release `button` (1 left, 2 middle, 3 right)."""
        mask = 1 << (button - 1)
        await self.send(
            self.conn.pointer_event(x, y, 0)
            + self.conn.pointer_event(x, y, mask)
            + self.conn.pointer_event(x, y, 0)
        )

    async def cut_text(self, text: str) -> None:
        """Put `text` on the server's clipboard the way this client can: Kasm
        BinaryClipboard in the kasm dialect, an Extended Clipboard provide once
        the server sent caps, else old-style Latin-1 ClientCutText."""
        if self.conn.dialect == "kasm":
            data = self.conn.kasm_binary_clipboard([("text/plain", text.encode("utf-8"))])
        elif self.conn.server_clipboard_caps is not None:
            data = self.conn.clipboard_provide({ClipboardFlags.TEXT: encode_clipboard_text(text)})
        else:
            data = self.conn.client_cut_text(text)
        await self.send(data)

    # -- receiving --------------------------------------------------------------------

    # The brief for these helpers is a per-call timeout (ASYNC109 prefers the
    # caller's own fail_after); they apply it with trio.fail_after inside.
    async def wait_for(
        self,
        event_type: type[E],
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
        predicate: Callable[[E], bool] | None = None,
    ) -> E:
        """Take the oldest pending event of `event_type` (matching `predicate`),
        waiting up to `timeout` seconds for one. Raises trio.TooSlowError on
        timeout, the RemoteProtocolError if the server broke the protocol, or
        ConnectionClosedError if the connection ended first."""
        _, event = await self._take(event_type, timeout, predicate)
        return event

    async def _take(
        self, event_type: type[E], seconds: float, predicate: Callable[[E], bool] | None
    ) -> tuple[float, E]:
        with trio.fail_after(seconds):
            while True:
                for index, (arrived, event) in enumerate(self._pending):
                    if isinstance(event, event_type) and (predicate is None or predicate(event)):
                        del self._pending[index]
                        return arrived, event
                if self._finished:
                    raise self._end_error()
                await self._arrived.wait()

    async def next_update(self, timeout: float = DEFAULT_TIMEOUT) -> FramebufferUpdate:  # noqa: ASYNC109
        """The oldest complete FramebufferUpdate not taken yet (see request_update)."""
        return await self.wait_for(FramebufferUpdate, timeout)

    async def next_update_with_time(
        self,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> tuple[float, FramebufferUpdate]:
        """Like next_update(), with the trio.current_time() at which the
        update's last byte had been parsed (for latency measurements)."""
        return await self._take(FramebufferUpdate, timeout, None)

    async def screenshot(self, timeout: float = DEFAULT_TIMEOUT) -> Framebuffer:  # noqa: ASYNC109
        """Request a non-incremental update of the whole screen and return a
        copy of the framebuffer once updates since the request have covered
        every pixel, which is what a non-incremental request obliges the
        server to send (possibly after an ExtendedDesktopSize-only update)."""
        with trio.fail_after(timeout):
            await self.request_update(incremental=False)
            size = self.size
            covered = np.zeros((size[1], size[0]), bool)
            while not covered.all():
                update = await self.next_update(math.inf)
                if self.size != size:
                    # A resize blanks the framebuffer; ask again for the new one.
                    # (Only on a real change: answering every ExtendedDesktopSize
                    # with a non-incremental request would loop, says rfbproto.)
                    size = self.size
                    covered = np.zeros((size[1], size[0]), bool)
                    await self.request_update(incremental=False)
                    continue
                for rect, _ in update.pixel_rects:
                    covered[rect.slices()] = True
            return self.framebuffer.copy()

    def pending_events(self) -> list[Event]:
        """Take every pending event."""
        events = [event for _, event in self._pending]
        self._pending.clear()
        return events

    def _drop(self, event_type: type[Event]) -> None:
        kept = [entry for entry in self._pending if not isinstance(entry[1], event_type)]
        self._pending.clear()
        self._pending.extend(kept)

    def _publish(self, event: Event) -> None:
        self._pending.append((trio.current_time(), event))
        self._arrived.set()
        self._arrived = trio.Event()

    def _end_error(self) -> BaseException:
        self._failure_reported = True
        if self._failure is not None:
            return self._failure
        return ConnectionClosedError("the server closed the connection")

    def _finish(self, failure: BaseException | None) -> None:
        if not self._finished:
            self._finished = True
            self._failure = failure
        self._arrived.set()

    # -- tasks ------------------------------------------------------------------------

    async def _receive_some(self) -> None:
        self.conn.receive_data(await self._stream.receive_some(_RECEIVE_SIZE))

    async def _handshake(
        self, ssl_context: ssl.SSLContext | None, server_hostname: str | None
    ) -> ServerInit:
        while True:
            event = self.conn.next_event()
            # Flush before acting: the VeNCrypt subtype choice must leave in the
            # clear before StartTLS wraps the stream.
            await self.send(self.conn.data_to_send())
            if event is NEED_DATA:
                await self._receive_some()
            elif isinstance(event, StartTLS):
                if ssl_context is None:
                    raise HandshakeError(
                        HandshakeFailed("vencrypt", "StartTLS but no ssl_context was given")
                    )
                tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname)
                await tls.do_handshake()
                self._stream = tls
                self.handshake_events.append(event)
            elif isinstance(event, HandshakeFailed):
                raise HandshakeError(event)
            elif isinstance(event, ServerInit):
                self.handshake_events.append(event)
                return event
            elif isinstance(event, Event):
                self.handshake_events.append(event)

    async def _receive_loop(self) -> None:
        # Never raises (except Cancelled): failures are stored and handed to
        # whoever waits, so the caller sees a plain exception, not a group.
        try:
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    await self._receive_some()
                    continue
                if isinstance(event, ServerFence) and event.is_request and self.auto_fence_reply:
                    self._queue(self.conn.fence_reply(event))
                if isinstance(event, Event):
                    self._publish(event)
                if isinstance(event, ConnectionClosed):
                    self._finish(None)
                    return
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._finish(exc)

    def _queue(self, data: bytes) -> None:
        """Queue a write without waiting for it (the receive task's way)."""
        if self._outgoing is not None and self._write_failure is None:
            self._outgoing.send_nowait((data, trio.Event()))

    async def _writer(self, outgoing: trio.MemoryReceiveChannel[tuple[bytes, trio.Event]]) -> None:
        # Never raises (except Cancelled): a broken stream is remembered and
        # reported to every send() still waiting and every later one.
        async for data, written in outgoing:
            if self._write_failure is None:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._write_failure = exc
            written.set()

    async def aclose(self) -> None:
        """Close the stream (TLS close_notify if any), at most a couple of
        seconds even when cancelled."""
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True) as scope:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)


@asynccontextmanager
async def wrap_stream(
    stream: trio.abc.Stream,
    *,
    password: str | bytes | None = None,
    username: str | None = None,
    vnc_password: str | bytes | None = None,
    version: ProtocolVersion = ProtocolVersion.V3_8,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    encodings: Sequence[int] | None = DEFAULT_ENCODINGS,
    pixel_format: PixelFormat | None = None,
    shared: bool = True,
    dialect: Dialect = "standard",
    kasm_video_encoders: Sequence[int] = (),
    auto_fence_reply: bool = True,
    handshake_timeout: float = DEFAULT_TIMEOUT,
    security_types: Sequence[int] | None = None,
    vencrypt_subtypes: Sequence[int] | None = None,
    client_class: type[VncClient] | None = None,
) -> AsyncIterator[VncClient]:
    """Run the RFB handshake over `stream` (which this takes ownership of and
    closes), send SetPixelFormat and SetEncodings (and, in the kasm dialect,
    VideoEncodersRequest between them, as KasmVNC's web client does), and
    yield the client with its receive task running. `encodings=None` sends
    no SetEncodings. No update is requested: that is the test's call.
    `client_class` is a VncClient subclass to create instead (e.g. one that
    answers more server messages by itself, trivnc.testing.kasm.KasmClient)."""
    conn = ClientConnection(
        version=version,
        password=password,
        username=username,
        vnc_password=vnc_password,
        shared=shared,
        dialect=dialect,
        security_types=security_types,
        vencrypt_subtypes=vencrypt_subtypes,
    )
    client = (client_class or VncClient)(stream, conn, auto_fence_reply=auto_fence_reply)
    try:
        with trio.fail_after(handshake_timeout):
            await client._handshake(ssl_context, server_hostname)
        setup = b""
        if pixel_format is not None:
            setup += conn.set_pixel_format(pixel_format)
        if dialect == "kasm":
            setup += conn.kasm_video_encoders_request(kasm_video_encoders)
        if encodings is not None:
            setup += conn.set_encodings(encodings)
        await client.send(setup)
        outgoing, to_write = trio.open_memory_channel[tuple[bytes, trio.Event]](math.inf)
        try:
            # Channels close after the nursery: a send() after exit then fails
            # at once instead of waiting for a writer that is gone.
            async with outgoing, to_write, trio.open_nursery() as nursery:
                client._outgoing = outgoing
                nursery.start_soon(client._writer, to_write)
                nursery.start_soon(client._receive_loop)
                yield client
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The receive and writer tasks never raise, so a group holds the
            # body's own exception; re-raise it bare so that `pytest.raises(X)`
            # around the `async with` works.
            if len(group.exceptions) != 1:
                raise
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        failure = client._failure
        if isinstance(failure, RemoteProtocolError) and not client._failure_reported:
            # A protocol violation nobody waited for must still fail the test.
            raise failure
    finally:
        await client.aclose()


@asynccontextmanager
async def open_test_client(
    host: str,
    port: int,
    *,
    password: str | bytes | None = None,
    username: str | None = None,
    vnc_password: str | bytes | None = None,
    version: ProtocolVersion = ProtocolVersion.V3_8,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    encodings: Sequence[int] | None = DEFAULT_ENCODINGS,
    pixel_format: PixelFormat | None = None,
    shared: bool = True,
    dialect: Dialect = "standard",
    kasm_video_encoders: Sequence[int] = (),
    auto_fence_reply: bool = True,
    handshake_timeout: float = DEFAULT_TIMEOUT,
    security_types: Sequence[int] | None = None,
    vencrypt_subtypes: Sequence[int] | None = None,
) -> AsyncIterator[VncClient]:
    """Connect over TCP and do what wrap_stream() does. TLS (on VeNCrypt
    StartTLS) checks the certificate against `server_hostname`, default `host`."""
    stream = await trio.open_tcp_stream(host, port)
    async with wrap_stream(
        stream,
        password=password,
        username=username,
        vnc_password=vnc_password,
        version=version,
        ssl_context=ssl_context,
        server_hostname=server_hostname if server_hostname is not None else host,
        encodings=encodings,
        pixel_format=pixel_format,
        shared=shared,
        dialect=dialect,
        kasm_video_encoders=kasm_video_encoders,
        auto_fence_reply=auto_fence_reply,
        handshake_timeout=handshake_timeout,
        security_types=security_types,
        vencrypt_subtypes=vencrypt_subtypes,
    ) as client:
        yield client

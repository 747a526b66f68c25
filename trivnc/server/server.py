# `trivnc.serve`: the server as a trio task. Shaped after trio's serve_tcp and
# hypercorn's worker_serve: open the listeners first, start the framebuffer
# service and the accept loops, then report what was bound through
# task_status, so `await nursery.start(trivnc.serve, config)` works with port 0
# and cancelling the nursery shuts everything down.
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import trio

from ..api.backend import ApiUser
from ..config import Config
from ..framebuffer.service import FramebufferService
from ..rfb import events as ev
from ..rfb.connection import SecurityConfig, ServerConnection
from ..sources.base import CursorImage, Source
from .encoding import EncodeCache
from .session import ClientSession
from .vncpasswd import read_vnc_password_file

log = logging.getLogger("trivnc")


@dataclass(eq=False)
class ServerContext:
    """What every session of one server shares."""

    config: Config
    source: Source
    service: FramebufferService
    limiter: trio.CapacityLimiter
    security: SecurityConfig
    cache: EncodeCache = field(default_factory=EncodeCache)
    sessions: set[ClientSession] = field(default_factory=set)
    #: The desktop's clipboard text, as last reported by the source.
    clipboard: str | None = None
    cursor: CursorImage | None = None
    #: Set when the source ends (an X server went away); the server stops.
    ended: trio.Event = field(default_factory=trio.Event)
    end_reason: str = ""

    # -- SourceListener: what the desktop says besides pixels ---------------------------

    def clipboard_changed(self, text: str) -> None:
        if len(text) > self.config.clipboard_max_size:
            log.info(
                "desktop clipboard of %d characters not sent (limit %d)",
                len(text),
                self.config.clipboard_max_size,
            )
            return
        self.clipboard = text
        for session in self.sessions:
            session.desktop_clipboard(text)

    def cursor_changed(self, cursor: CursorImage) -> None:
        self.cursor = cursor
        for session in self.sessions:
            session.desktop_cursor(cursor)

    def bell(self) -> None:
        for session in self.sessions:
            session.desktop_bell()

    def source_ended(self, reason: str) -> None:
        log.warning("%s; stopping", reason)
        self.end_reason = reason
        self.ended.set()

    async def check_credentials(
        self, session: ClientSession, event: ev.CredentialsReceived
    ) -> None:
        # VeNCrypt users arrive with the users file; until then nobody passes.
        session.conn.reject_credentials("no users are configured")

    async def start_tls(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        raise trio.BrokenResourceError("TLS is not configured")

    async def run_session(
        self,
        stream: trio.abc.Stream,
        conn: ServerConnection,
        peer: str,
        *,
        user: ApiUser | None = None,
        transport: str = "tcp",
    ) -> None:
        """Serve one client connection until it ends. `user` is set when the
        transport already authenticated it (HTTP Basic on the web port)."""
        log.info("%s: connection opened (%s)", peer, transport)
        session = ClientSession(
            self,
            stream,
            conn,
            peer,
            transport=transport,
            can_write=True if user is None else user.write,
        )
        if user is not None:
            session.username = user.name
        await session.run()

    def disconnect_others(self, keep: ClientSession) -> None:
        """A non-shared ClientInit: everyone else goes (RFC 6143 section 7.3.1)."""
        for other in list(self.sessions):
            if other is not keep:
                other.close("another client connected non-shared")

    def notify_resize_by(self, requester: ClientSession, size: tuple[int, int]) -> None:
        for other in self.sessions:
            if other is not requester:
                other.resized_by_other(size)

    async def client_clipboard(self, session: ClientSession, text: str) -> None:
        if len(text) > self.config.clipboard_max_size:
            log.info(
                "%s: clipboard of %d characters dropped (limit %d)",
                session.peer,
                len(text),
                self.config.clipboard_max_size,
            )
            return
        self.clipboard = text
        await self.source.clipboard_text(text)


@dataclass(eq=False)
class Server:
    """A running trivnc server, as `nursery.start(trivnc.serve, config)` returns it."""

    context: ServerContext
    #: (host, port) of every RFB listener.
    rfb_addresses: list[tuple[str, int]]
    cancel_scope: trio.CancelScope

    @property
    def service(self) -> FramebufferService:
        return self.context.service

    @property
    def source(self) -> Source:
        return self.context.source

    @property
    def sessions(self) -> set[ClientSession]:
        return self.context.sessions

    @property
    def rfb_port(self) -> int:
        return self.rfb_addresses[0][1]

    def stop(self) -> None:
        self.cancel_scope.cancel()


def security_for(config: Config) -> SecurityConfig:
    password = config.vnc_password
    if password is None and config.vnc_password_file is not None:
        password = read_vnc_password_file(config.vnc_password_file)
    return SecurityConfig(allow_none=config.insecure_no_auth, vnc_password=password)


def _make_source(config: Config) -> Source:
    if config.source is not None:
        return config.source
    from ..sources.demo import DemoSource

    return DemoSource(*config.geometry)


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a trivnc server until cancelled. Reports a `Server` when listening."""
    config.validate()
    security = security_for(config)
    source = _make_source(config)
    if config.desktop_name:
        source.name = config.desktop_name
    limiter = trio.CapacityLimiter(max(1, config.encode_threads))
    service = FramebufferService(source, max_frame_rate=config.max_frame_rate, limiter=limiter)
    context = ServerContext(config, source, service, limiter, security)
    source.listener = context
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_source_ends, context, scope)
            await nursery.start(service.run)
            listeners: list[trio.SocketListener] = []
            if config.rfb_port is not None:
                for host in config.listen:
                    listeners += await trio.open_tcp_listeners(config.rfb_port, host=host)
            addresses = [_address(listener) for listener in listeners]

            async def handle(stream: trio.SocketStream) -> None:
                await _serve_connection(context, stream)

            if listeners:
                nursery.start_soon(trio.serve_listeners, handle, listeners)
            task_status.started(Server(context, addresses, scope))


async def _stop_when_source_ends(context: ServerContext, scope: trio.CancelScope) -> None:
    await context.ended.wait()
    scope.cancel()


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return str(host), int(port)


async def _serve_connection(context: ServerContext, stream: trio.SocketStream) -> None:
    try:
        host, port = stream.socket.getpeername()[:2]
        peer = f"{host}:{port}"
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    except OSError:
        peer = "unknown"
    conn = ServerConnection(context.security, clipboard_max_size=context.config.clipboard_max_size)
    await context.run_session(stream, conn, peer)

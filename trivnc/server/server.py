# `trivnc.serve`: the server as a trio task. Shaped after trio's serve_tcp and
# hypercorn's worker_serve: open the listeners first, start the framebuffer
# service and the accept loops, then report what was bound through
# task_status, so `await nursery.start(trivnc.serve, config)` works with port 0
# and cancelling the nursery shuts everything down.
from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from ..api.backend import ApiBackend, ApiUser
from ..config import Config
from ..framebuffer.service import FramebufferService
from ..rfb import events as ev
from ..rfb.connection import SecurityConfig, ServerConnection, State
from ..rfb.constants import SecurityType, VeNCryptSubtype
from ..rfb.errors import AuthenticationFailed
from ..sources.base import CursorImage, Source
from ..tlsconfig import ensure_self_signed, server_ssl_context, state_dir
from .encoding import EncodeCache
from .ratelimit import LoginRateLimiter
from .session import ClientSession
from .users import UserStore, create_initial, default_users_path
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
    users: UserStore | None = None
    ssl_context: ssl.SSLContext | None = None
    login_limiter: LoginRateLimiter = field(default_factory=LoginRateLimiter)
    #: Every session from its start, the ones still in the handshake too (a
    #: user's rights may change before the handshake ends).
    all_sessions: set[ClientSession] = field(default_factory=set)
    #: RFB connections open (TCP and WebSocket), from accept to close: the
    #: ones still in the handshake count too.
    connections: int = 0
    #: Open connections per authenticated user.
    user_connections: Counter[str] = field(default_factory=Counter)
    #: Connections turned away because of a limit, and when that was last logged.
    refused: int = 0
    _refusal_logged: float = 0.0
    #: Refusals still waiting for the client's version before closing.
    _refusals_lingering: int = 0

    # -- connection limits ---------------------------------------------------------------

    @property
    def pending_handshakes(self) -> int:
        """Open connections that have not finished the handshake."""
        return max(0, self.connections - len(self.sessions))

    def connection_refusal(self, user: str | None = None) -> str | None:
        """Why one more connection (of `user`, if given) is refused, or None."""
        limit = self.config.max_connections
        if limit and self.connections >= limit:
            return f"too many connections: this server accepts at most {limit}"
        if user is not None:
            return self.user_refusal(user)
        return None

    def user_refusal(self, user: str) -> str | None:
        limit = self.config.max_connections_per_user
        if limit and self.user_connections[user] >= limit:
            return f"too many connections for user {user!r}: at most {limit} at once"
        return None

    def open_connection(self, user: str | None = None) -> None:
        self.connections += 1
        if user is not None:
            self.hold_user(user)

    def close_connection(self, user: str | None = None) -> None:
        self.connections -= 1
        if user is not None:
            self.release_user(user)

    def hold_user(self, user: str) -> None:
        self.user_connections[user] += 1

    def release_user(self, user: str) -> None:
        self.user_connections[user] -= 1
        if self.user_connections[user] <= 0:
            del self.user_connections[user]

    def log_refusal(self, peer: str, reason: str) -> None:
        """Every refusal at info level; a warning at most every ten seconds."""
        self.refused += 1
        log.info("%s: refused: %s", peer, reason)
        now = time.monotonic()
        if now - self._refusal_logged >= 10:
            self._refusal_logged = now
            log.warning("refusing connections: %s (%d refused so far)", reason, self.refused)

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
        """VeNCrypt Plain: the users file decides, with the web port's rate
        limit per address."""
        host = session.peer.rsplit(":", 1)[0]
        if self.users is None:
            session.conn.reject_credentials("no users are configured")
            return
        store = self.users
        # One attempt per address at a time, so that simultaneous guesses
        # cannot all pass the check before the first failure counts.
        async with self.login_limiter.attempt(host):
            if self.login_limiter.blocked(host) > 0:
                session.conn.reject_credentials("too many failed logins; try later")
                return
            store.reload_if_changed()  # `trivnc passwd` may have changed the file
            user = await trio.to_thread.run_sync(store.verify, event.username, event.password)
            if user is None:
                self.login_limiter.failure(host)
                session.conn.reject_credentials("wrong user name or password")
                return
            self.login_limiter.success(host)
        # The rights as they are now: the API may have changed them while
        # the password was being checked.
        current = store.get(user.name)
        if current is None or not current.permissions.can_view:
            session.conn.reject_credentials("this user may not view the desktop")
            return
        refusal = self.user_refusal(user.name)
        if refusal is not None:
            self.log_refusal(session.peer, refusal)
            session.conn.reject_credentials(refusal)
            return
        # Held until the session ends (run_session releases it).
        self.hold_user(user.name)
        session.user_slot = user.name
        session.can_write = current.permissions.can_input
        session.conn.accept_credentials()

    async def start_tls(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        if self.ssl_context is None:
            raise trio.BrokenResourceError("TLS is not configured")
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
        await tls.do_handshake()
        return tls

    def user_changed(self, name: str) -> None:
        """A user was changed through the API or the file: open connections
        of that user lose what they may no longer do, at once."""
        user = self.users.get(name) if self.users is not None else None
        for session in list(self.all_sessions):
            # user_slot: a VeNCrypt login accepted, handshake not finished.
            if name not in (session.username, session.user_slot):
                continue
            if user is None or not user.permissions.can_view:
                session.close(f"user {name!r} was removed or lost read permission")
            else:
                session.can_write = user.permissions.can_input

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
            # The rights as they are now, not as they were at login.
            current = self.users.get(user.name) if self.users is not None else None
            if self.users is not None and (current is None or not current.permissions.can_view):
                log.info("%s: user %r was removed or lost read permission", peer, user.name)
                await trio.aclose_forcefully(stream)
                return
            if current is not None:
                session.can_write = current.permissions.can_input
        host = peer.rsplit(":", 1)[0]
        vnc_auth = transport == "tcp" and self.security.vnc_password is not None
        if vnc_auth and not self.security.allow_none and self.login_limiter.blocked(host) > 0:
            # VNC authentication is checked inside the protocol state
            # machine, so a blocked address is turned away before it can try.
            await _refuse(self, stream, conn, "too many failed logins; try later")
            return
        self.all_sessions.add(session)
        try:
            await session.run()
        finally:
            self.all_sessions.discard(session)
            if session.user_slot is not None:
                self.release_user(session.user_slot)
            if vnc_auth and conn.security_type == SecurityType.VNC_AUTH:
                # The web port's and VeNCrypt's limit, for VNC passwords too.
                if isinstance(conn.error, AuthenticationFailed):
                    self.login_limiter.failure(host)
                elif conn.state in _PAST_SECURITY:
                    self.login_limiter.success(host)

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
    #: (host, port) of the HTTPS listeners (page, WebSocket, developer API).
    web_addresses: list[tuple[str, int]] = field(default_factory=list)
    #: (users file, name, password) when this start created the users file.
    initial_credentials: tuple[Path, str, str] | None = None
    cert: Path | None = None

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

    @property
    def web_port(self) -> int:
        return self.web_addresses[0][1]

    @property
    def end_reason(self) -> str:
        return self.context.end_reason

    def stop(self) -> None:
        """Stop the server (its nursery's scope is cancelled)."""
        self.cancel_scope.cancel()

    def api_backend(self) -> ApiBackend:
        """The developer API's backend over this server (its users file,
        sessions and frames, and the login rate limit its RFB port shares),
        for mounting `trivnc.api.api_blueprint` on an application's own
        Quart-Trio app. ValueError when the server has no users file: set
        `Config.users_file` when trivnc's own web port is off."""
        from ..api.server_backend import ServerBackend

        users = self.context.users
        if users is None:
            raise ValueError("the server has no users file (set Config.users_file)")
        return ServerBackend(self.context, users, self.context.login_limiter)


def security_for(config: Config, users: UserStore | None) -> SecurityConfig:
    password = config.vnc_password
    if password is None and config.vnc_password_file is not None:
        password = read_vnc_password_file(config.vnc_password_file)
    # VeNCrypt with a certificate (X509Plain): TLSPlain would need anonymous
    # TLS, which trivnc does not offer.
    vencrypt = (VeNCryptSubtype.X509_PLAIN,) if users is not None else ()
    return SecurityConfig(
        allow_none=config.insecure_no_auth, vnc_password=password, vencrypt_subtypes=vencrypt
    )


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a trivnc server until cancelled (or until its desktop ends).
    Reports a `Server` once every port listens."""
    config.validate()
    users, created = _open_users(config)
    cert = key = None
    ssl_context = None
    if users is not None or config.web_port is not None:
        cert, key = (
            (config.cert, config.key)
            if config.cert and config.key
            else (ensure_self_signed(state_dir()))
        )
        ssl_context = server_ssl_context(cert, key)
    security = security_for(config, users)
    limiter = trio.CapacityLimiter(max(1, config.encode_threads))
    async with _desktop(config) as (source, session_over):
        if config.desktop_name:
            source.name = config.desktop_name
        service = FramebufferService(
            source,
            max_frame_rate=config.max_frame_rate,
            defer_update=config.defer_update / 1000,
            limiter=limiter,
        )
        context = ServerContext(
            config, source, service, limiter, security, users=users, ssl_context=ssl_context
        )
        source.listener = context
        if users is not None:
            users.changed.append(context.user_changed)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_when_source_ends, context, scope, session_over)
                if users is not None:
                    nursery.start_soon(_watch_users_file, users)
                await nursery.start(service.run)
                listeners: list[trio.SocketListener] = []
                if config.rfb_port is not None:
                    for host in config.listen:
                        listeners += await trio.open_tcp_listeners(config.rfb_port, host=host)
                for listener in listeners:
                    set_user_timeout(listener.socket, config.send_timeout)
                addresses = [_address(listener) for listener in listeners]

                async def handle(stream: trio.SocketStream) -> None:
                    await _serve_connection(context, stream)

                if listeners:
                    nursery.start_soon(trio.serve_listeners, handle, listeners)
                web: list[tuple[str, int]] = []
                if config.web_port is not None and users is not None:
                    assert cert is not None and key is not None
                    from ..api.app import create_app, serve_web
                    from ..api.server_backend import ServerBackend

                    backend = ServerBackend(context, users, context.login_limiter)
                    app = create_app(context, backend, config.web_root)
                    web = await nursery.start(
                        partial(
                            serve_web,
                            app,
                            config.listen,
                            config.web_port,
                            cert,
                            key,
                            tls=not config.no_tls,
                            handshake_timeout=config.handshake_timeout,
                            send_timeout=config.send_timeout,
                        )
                    )
                task_status.started(Server(context, addresses, scope, web, created, cert))


def _open_users(config: Config) -> tuple[UserStore | None, tuple[Path, str, str] | None]:
    if not config.needs_users:
        return None, None
    path = config.users_file or default_users_path()
    if not path.exists():
        store, name, password = create_initial(path)
        log.warning("created users file %s with owner %r (password printed once)", path, name)
        return store, (path, name, password)
    return UserStore(path), None


@asynccontextmanager
async def _desktop(config: Config) -> AsyncIterator[tuple[Source, trio.Event | None]]:
    """The configured source: the application's, an X display, a private
    Xvfb (started here, stopped on exit), or the demo desktop; with the event
    that ends the session, if the desktop has one."""
    if config.source is not None:
        yield config.source, None
    elif config.display is not None:
        from ..sources.x11 import X11Source

        yield X11Source(config.display, clipboard_max_size=config.clipboard_max_size), None
    elif config.xvfb is not None:
        from ..sources.x11 import X11Source
        from ..sources.x11.xvfb import XvfbDesktop

        async with XvfbDesktop(*config.xvfb, command=config.xvfb_command or None) as desktop:
            # The session ends with the command (or Xvfb): serving stops then.
            yield (
                X11Source(desktop.display, clipboard_max_size=config.clipboard_max_size),
                desktop.ended,
            )
    else:
        from ..sources.demo import DemoSource

        yield DemoSource(*config.geometry), None


_PAST_SECURITY = (State.CLIENT_INIT, State.SERVER_INIT_PENDING, State.NORMAL)

#: How often the users file is checked for changes made outside the server.
USERS_FILE_POLL = 1.0


async def _watch_users_file(users: UserStore) -> None:
    """Notice `trivnc passwd` (or an editor) changing the users file while
    connections are open: a stat a second, a reload when it changed, and
    the change callbacks take rights away from open sessions."""
    while True:
        await trio.sleep(USERS_FILE_POLL)
        users.reload_if_changed()


async def _stop_when_source_ends(
    context: ServerContext, scope: trio.CancelScope, ended_by: trio.Event | None
) -> None:
    if ended_by is None:
        await context.ended.wait()
    else:
        async with trio.open_nursery() as race:

            async def desktop_session_over() -> None:
                await ended_by.wait()
                context.end_reason = context.end_reason or "the Xvfb session ended"
                race.cancel_scope.cancel()

            async def source_over() -> None:
                await context.ended.wait()
                race.cancel_scope.cancel()

            race.start_soon(desktop_session_over)
            race.start_soon(source_over)
    scope.cancel()


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return str(host), int(port)


def set_user_timeout(sock: trio.socket.SocketType | socket.socket, seconds: float) -> None:
    """TCP_USER_TIMEOUT (Linux): the kernel drops a connection whose peer has
    acknowledged nothing, or kept its receive window shut, for the send
    timeout (plus USER_TIMEOUT_MARGIN, so that the session's own timeout and
    its clearer reason normally come first) while data waits to go. Accepted
    sockets inherit it from the listener. It ends the sends the application
    cannot cancel (hypercorn shields its socket writes)."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return
    with suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, int((seconds + USER_TIMEOUT_MARGIN) * 1000))


USER_TIMEOUT_MARGIN = 2.0


#: Refusals that wait for the client's version before closing (so that the
#: close does not reset the connection under the reason); beyond it a refusal
#: closes at once.
MAX_LINGERING_REFUSALS = 64
REFUSAL_LINGER = 1.0


async def _serve_connection(context: ServerContext, stream: trio.SocketStream) -> None:
    try:
        host, port = stream.socket.getpeername()[:2]
        peer = f"{host}:{port}"
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    except OSError:
        peer = "unknown"
    conn = ServerConnection(context.security, clipboard_max_size=context.config.clipboard_max_size)
    refusal = context.connection_refusal()
    if refusal is not None:
        context.log_refusal(peer, refusal)
        await _refuse(context, stream, conn, refusal)
        return
    context.open_connection()
    try:
        await context.run_session(stream, conn, peer)
    finally:
        context.close_connection()


async def _refuse(
    context: ServerContext, stream: trio.abc.Stream, conn: ServerConnection, reason: str
) -> None:
    """Send the RFB refusal (version, no security types, reason) at once, then
    close; a little later if few refusals are lingering, after reading what
    the client sent (closing with unread data would reset the connection)."""
    conn.refuse(reason)
    linger = context._refusals_lingering < MAX_LINGERING_REFUSALS
    if linger:
        context._refusals_lingering += 1
    try:
        with (
            trio.move_on_after(REFUSAL_LINGER),
            suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await stream.send_all(conn.data_to_send())
            if linger:
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while await stream.receive_some(4096):
                    pass
    finally:
        if linger:
            context._refusals_lingering -= 1
        await trio.aclose_forcefully(stream)

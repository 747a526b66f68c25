# The web side on one HTTPS port, as KasmVNC serves it: the noVNC page, RFB
# over WebSocket at /websockify, and the developer API blueprint, all behind
# HTTP Basic authentication, in a Quart-Trio app served by hypercorn inside
# trivnc's own nursery (libraries-measured.md section 4).
from __future__ import annotations

import logging
import mimetypes
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request, websocket
from quart_trio import QuartTrio

from ..rfb.connection import Dialect, SecurityConfig, ServerConnection
from .backend import ApiBackend, ApiUser
from .blueprint import authenticate, parse_basic_credentials
from .stream import WebSocketStream

if TYPE_CHECKING:
    from ..server.server import ServerContext

log = logging.getLogger("trivnc.web")

REALM = 'Basic realm="trivnc", charset="UTF-8"'
#: Where noVNC is found when --web-root is not given: Debian's package, then
#: an npm install in the working directory.
NOVNC_CANDIDATES = (Path("/usr/share/novnc"), Path("node_modules/@novnc/novnc"))
MAX_CREDENTIALS = 4096


def find_web_root(configured: Path | None) -> Path | None:
    if configured is not None:
        return configured if (configured / "vnc.html").is_file() else None
    for candidate in NOVNC_CANDIDATES:
        if (candidate / "vnc.html").is_file():
            return candidate
    return None


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """Credentials from an Authorization header, or None if absent or
    malformed (the developer API's parser: non-ASCII base64, non-UTF-8
    credentials, an empty user name or an overlong header are all None,
    never an exception)."""
    return parse_basic_credentials(header)


def _unauthorized(reason: str = "authentication required") -> Response:
    return Response(reason + "\n", 401, {"WWW-Authenticate": REALM, "Content-Type": "text/plain"})


async def _authenticate(backend: ApiBackend, header: str | None, peer: str) -> ApiUser | Response:
    wait = backend.login_blocked(peer)
    if wait > 0:
        return Response(
            "too many failed logins; try later\n",
            429,
            {"Retry-After": str(int(wait) + 1), "Content-Type": "text/plain"},
        )
    creds = parse_basic(header)
    if creds is None:
        return _unauthorized()
    user = await authenticate(backend, creds[0], creds[1], peer)
    if user is None:
        return _unauthorized("wrong user name or password")
    return user


def create_app(context: ServerContext, backend: ApiBackend, web_root: Path | None) -> QuartTrio:
    """The Quart-Trio app for one server: page, WebSocket, developer API."""
    from .blueprint import api_blueprint

    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    app.register_blueprint(api_blueprint(backend))
    root = find_web_root(web_root)

    @app.websocket("/websockify")
    async def rfb_over_websocket() -> Response | None:
        peer = websocket.remote_addr or "unknown"
        auth = websocket.headers.get("Authorization")
        user = await _authenticate(backend, auth, peer)
        if isinstance(user, Response):
            return user
        if not user.read:
            return Response("this user may not view the desktop\n", 403)
        offered = websocket.requested_subprotocols
        if offered and "binary" not in offered:
            return Response("only binary WebSocket frames are supported\n", 400)
        # Connection limits, before the upgrade: the reason in a 503.
        refusal = context.connection_refusal(user.name)
        if refusal is not None:
            context.log_refusal(f"{peer}:ws", refusal)
            return Response(
                refusal + "\n", 503, {"Content-Type": "text/plain", "Retry-After": "10"}
            )
        context.open_connection(user.name)
        try:
            await websocket.accept(subprotocol="binary" if "binary" in offered else None)
            stream = WebSocketStream(websocket._get_current_object())  # type: ignore[attr-defined]
            # HTTP Basic already authenticated the user: RFB security is None
            # (as in KasmVNC), and the session carries the user's permissions.
            # KasmVNC's web client offers "binary" and speaks its own dialect;
            # upstream noVNC offers nothing. With "binary", the connection
            # tells the two apart by what the client sends first (Dialect.AUTO,
            # trivnc.rfb.connection "Dialect detection").
            conn = ServerConnection(
                SecurityConfig(allow_none=True),
                dialect=Dialect.AUTO if "binary" in offered else Dialect.STANDARD,
                clipboard_max_size=context.config.clipboard_max_size,
            )
            await context.run_session(stream, conn, f"{peer}:ws", user=user, transport="websocket")
        finally:
            context.close_connection(user.name)
        return None

    @app.route("/")
    async def index() -> Response:
        if root is None:
            return Response(
                "trivnc: the noVNC web client is not installed. Install Debian's 'novnc' "
                "package (apt-get install novnc) or 'npm install @novnc/novnc', or give "
                "--web-root DIR. VNC viewers can connect to the RFB port meanwhile.\n",
                200,
                {"Content-Type": "text/plain; charset=utf-8"},
            )
        return Response(
            "", 302, {"Location": "/vnc.html?autoconnect=true&resize=scale&path=websockify"}
        )

    @app.route("/<path:name>")
    async def static_file(name: str) -> Response:
        if root is None:
            return Response("not found\n", 404)
        target = (root / name).resolve()
        if not target.is_relative_to(root.resolve()) or not target.is_file():
            return Response("not found\n", 404)
        data = await trio.Path(target).read_bytes()
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return Response(data, 200, {"Content-Type": kind, "Cache-Control": "no-cache"})

    @app.before_request
    async def require_login() -> Response | None:
        if request.path.startswith("/api/"):
            return None  # the blueprint answers for itself (owner checks)
        user = await _authenticate(
            backend, request.headers.get("Authorization"), request.remote_addr or ""
        )
        if isinstance(user, Response):
            return user
        if not user.read:
            return Response("this user may not view the desktop\n", 403)
        return None

    return app


async def serve_web(
    app: QuartTrio,
    hosts: list[str],
    port: int,
    cert: Path,
    key: Path,
    *,
    tls: bool = True,
    handshake_timeout: float = 10.0,
    send_timeout: float = 30.0,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run hypercorn for `app` until cancelled; reports the bound addresses.
    `tls=False` serves plain HTTP (the caller checks the addresses are
    loopback). The TLS handshake must finish within `handshake_timeout`; a
    peer that accepts no data for `send_timeout` is dropped by the kernel
    (TCP_USER_TIMEOUT on the listening sockets, which hypercorn is handed as
    file descriptors), since hypercorn's socket writes cannot be cancelled."""
    from ..server.server import set_user_timeout

    config = HypercornConfig()
    sockets: list[socket.socket] = []
    try:
        for h in hosts:
            sock = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_user_timeout(sock, send_timeout)
            sock.bind((h, port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    # hypercorn adopts the descriptors (and closes them).
    config.bind = [f"fd://{sock.detach()}" for sock in sockets]
    if tls:
        config.certfile = os.fspath(cert)
        config.keyfile = os.fspath(key)
    config.ssl_handshake_timeout = handshake_timeout
    config.websocket_max_message_size = 1 << 24
    config.accesslog = None
    config.errorlog = logging.getLogger("trivnc.web.hypercorn")
    config.graceful_timeout = 1.0

    async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(run)
        task_status.started([_host_port(u) for u in urls])


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)

"""Connection limits (total and per user) with the reason visible to the
client, on the RFB port and on the WebSocket, and `no_tls` (plain HTTP and
WebSocket on the web port, loopback only)."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
import trustme
from tls_files import issue
from trio_websocket import open_websocket_url

import trivnc
from trivnc.cli import build_parser, config_from_args
from trivnc.config import ConfigError, load_config_file
from trivnc.rfb.connection import SecurityConfig, ServerConnection, State
from trivnc.rfb.errors import ProtocolError
from trivnc.server import Server
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource
from trivnc.testing.aclient import HandshakeError, VncClient, open_test_client, wrap_stream
from trivnc.testing.images import desktop_like
from trivnc.testing.websocket import WebSocketByteStream

W, H = 160, 100
USERS = {"alice": "alice-secret", "bob": "bob-secret"}


MakeServer = Callable[..., Awaitable[Server]]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def make_server(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> MakeServer:
    """A server with a users file and a trusted certificate; keyword
    arguments go to trivnc.Config."""
    tls = issue(tmp_path, ca)
    users = tmp_path / "users"
    store = UserStore(users)
    for name, password in USERS.items():
        store.create(name, password, read=True, write=True, owner=False)

    async def make(**kw: Any) -> Server:
        source = ArraySource.from_array(desktop_like(W, H, seed=9))
        values: dict[str, Any] = {
            "source": source,
            "rfb_port": 0,
            "web_port": 0,
            "users_file": users,
            "cert": tls.cert,
            "key": tls.key,
        }
        values.update(kw)
        server: Server = await nursery.start(trivnc.serve, trivnc.Config(**values))
        return server

    return make


def basic(name: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{USERS[name]}".encode()).decode()


def vencrypt_client(server: Server, name: str, client_ssl: ssl.SSLContext) -> Any:
    return open_test_client(
        "127.0.0.1", server.rfb_port, username=name, password=USERS[name], ssl_context=client_ssl
    )


def plain_client(server: Server) -> Any:
    return open_test_client("127.0.0.1", server.rfb_port, security_types=[1])


async def websocket_upgrade(port: int, name: str) -> tuple[int, bytes]:
    """Status and body of a plain-HTTP WebSocket upgrade to /websockify."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = (
            "GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: {basic(name)}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                assert chunk, data
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            while status != 101 and len(body) < length:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                body += chunk
    return status, body


async def ws_client(stack: AsyncExitStack, server: Server, name: str) -> VncClient:
    """An RFB client over plain ws:// (the server runs with no_tls)."""
    ws = await stack.enter_async_context(
        open_websocket_url(
            f"ws://127.0.0.1:{server.web_port}/websockify",
            subprotocols=["binary"],
            extra_headers=[(b"Authorization", basic(name).encode())],
        )
    )
    client: VncClient = await stack.enter_async_context(wrap_stream(WebSocketByteStream(ws)))
    return client


async def wait_until(check: Callable[[], bool], timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


# -- the refusal in the protocol core ---------------------------------------------------


def test_refuse_queues_an_empty_security_list_and_the_reason() -> None:
    conn = ServerConnection(SecurityConfig(allow_none=True))
    conn.refuse("server full")
    reason = b"server full"
    assert conn.data_to_send() == b"RFB 003.008\n\x00" + struct.pack(">I", len(reason)) + reason
    assert conn.state is State.ERROR
    conn2 = ServerConnection(SecurityConfig(allow_none=True))
    conn2.receive_data(b"RFB 003.008\n")
    conn2.next_event()
    with pytest.raises(ProtocolError):
        conn2.refuse("too late: the security types went out")
    with pytest.raises(ProtocolError):
        conn.receive_data(b"RFB 003.008\n")


# -- total limit ------------------------------------------------------------------------


async def test_max_connections_refuses_rfb_with_the_reason(make_server: MakeServer) -> None:
    server = await make_server(
        web_port=None, users_file=None, insecure_no_auth=True, max_connections=2
    )
    async with plain_client(server) as a, plain_client(server) as b:
        await a.screenshot()
        await b.screenshot()
        with pytest.raises(HandshakeError) as refused:
            async with plain_client(server):
                pass
        assert refused.value.event.stage == "security-types"
        assert "too many connections" in refused.value.reason
        assert "at most 2" in refused.value.reason
        assert server.context.connections == 2
        assert server.context.refused == 1
    # The slots come back when the clients leave.
    await wait_until(lambda: server.context.connections == 0)
    async with plain_client(server) as c:
        await c.screenshot()


async def test_connections_in_the_handshake_count(make_server: MakeServer) -> None:
    server = await make_server(
        web_port=None, users_file=None, insecure_no_auth=True, max_connections=1
    )
    idle = await trio.open_tcp_stream("127.0.0.1", server.rfb_port)
    async with idle:
        assert await idle.receive_some(12) == b"RFB 003.008\n"
        await wait_until(lambda: server.context.pending_handshakes == 1)
        with pytest.raises(HandshakeError, match="too many connections"):
            async with plain_client(server):
                pass


async def test_max_connections_counts_websocket_and_rfb_together(
    make_server: MakeServer,
) -> None:
    server = await make_server(no_tls=True, insecure_no_auth=True, max_connections=2)
    async with AsyncExitStack() as stack:
        rfb = await stack.enter_async_context(plain_client(server))
        web = await ws_client(stack, server, "alice")
        await rfb.screenshot()
        await web.screenshot()
        status, body = await websocket_upgrade(server.web_port, "bob")
        assert status == 503
        assert b"too many connections" in body and b"at most 2" in body
        with pytest.raises(HandshakeError, match="too many connections"):
            async with plain_client(server):
                pass
        assert server.context.connections == 2
    await wait_until(lambda: server.context.connections == 0)
    status, _ = await websocket_upgrade(server.web_port, "bob")
    assert status == 101


# -- per-user limit ---------------------------------------------------------------------


async def test_per_user_limit_on_vencrypt(
    make_server: MakeServer, client_ssl: ssl.SSLContext
) -> None:
    server = await make_server(web_port=None, max_connections_per_user=1)
    async with vencrypt_client(server, "alice", client_ssl) as first:
        await first.screenshot()
        with pytest.raises(HandshakeError) as refused:
            async with vencrypt_client(server, "alice", client_ssl):
                pass
        # After authentication, as a SecurityResult failure with the reason.
        assert refused.value.event.stage == "security-result"
        assert "too many connections for user 'alice'" in refused.value.reason
        async with vencrypt_client(server, "bob", client_ssl) as other:
            await other.screenshot()
        assert server.context.user_connections["alice"] == 1
    await wait_until(lambda: not server.context.user_connections)
    async with vencrypt_client(server, "alice", client_ssl) as again:
        await again.screenshot()


async def test_per_user_limit_spans_websocket_and_vencrypt(
    make_server: MakeServer, client_ssl: ssl.SSLContext
) -> None:
    server = await make_server(no_tls=True, max_connections_per_user=1)
    async with AsyncExitStack() as stack:
        web = await ws_client(stack, server, "alice")
        await web.screenshot()
        status, body = await websocket_upgrade(server.web_port, "alice")
        assert status == 503 and b"too many connections for user 'alice'" in body
        with pytest.raises(HandshakeError, match="too many connections for user 'alice'"):
            async with vencrypt_client(server, "alice", client_ssl):
                pass
        bob = await ws_client(stack, server, "bob")
        await bob.screenshot()
    await wait_until(lambda: not server.context.user_connections)
    status, _ = await websocket_upgrade(server.web_port, "alice")
    assert status == 101


# -- no_tls -----------------------------------------------------------------------------


@pytest.mark.parametrize("listen", [["0.0.0.0"], ["127.0.0.1", "192.0.2.7"], ["::"]], ids=str)
def test_no_tls_is_refused_off_loopback(listen: list[str]) -> None:
    config = trivnc.Config(web_port=0, listen=listen, no_tls=True)
    with pytest.raises(ConfigError, match="--no-tls refused"):
        config.validate()
    args = build_parser().parse_args(["--no-tls", *[f"--listen={a}" for a in listen]])
    with pytest.raises(ConfigError, match="not a loopback address"):
        config_from_args(args)


def test_no_tls_on_loopback_and_limits_from_the_command_line(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--no-tls",
            "--listen", "127.0.0.1",
            "--listen", "::1",
            "--listen", "localhost",
            "--max-connections", "7",
            "--max-connections-per-user", "2",
            "--handshake-timeout", "3",
            "--send-timeout", "4.5",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.no_tls
    assert (config.max_connections, config.max_connections_per_user) == (7, 2)
    assert (config.handshake_timeout, config.send_timeout) == (3, 4.5)
    path = tmp_path / "trivnc.toml"
    path.write_text(
        "no-tls = true\nmax-connections = 0\nmax_connections_per_user = 3\n"
        "send-timeout = 12\nhandshake-timeout = 2.5\noutput-buffer-limit = 100000\n"
    )
    assert load_config_file(path) == {
        "no_tls": True,
        "max_connections": 0,
        "max_connections_per_user": 3,
        "send_timeout": 12.0,
        "handshake_timeout": 2.5,
        "output_buffer_limit": 100000,
    }
    with pytest.raises(ConfigError):
        trivnc.Config(max_connections=-1).validate()
    with pytest.raises(ConfigError):
        trivnc.Config(send_timeout=0).validate()


async def test_no_tls_serves_plain_http_and_websocket(
    make_server: MakeServer, client_ssl: ssl.SSLContext
) -> None:
    server = await make_server(no_tls=True)
    port = server.web_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        assert (await http.get("/")).status_code == 401
        page = await http.get("/", headers={"Authorization": basic("alice")})
        assert page.status_code in (200, 302)
    async with AsyncExitStack() as stack:
        client = await ws_client(stack, server, "bob")
        shot = await client.screenshot()
        source = server.source
        assert isinstance(source, ArraySource)
        assert np.array_equal(shot[..., :3], source.pixels[..., :3])
    # TLS is not spoken there any more.
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, client_ssl, server_hostname="127.0.0.1")
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)), trio.fail_after(5):
        await tls.do_handshake()
    await trio.aclose_forcefully(tls)


async def test_the_web_port_speaks_tls_by_default(
    make_server: MakeServer, client_ssl: ssl.SSLContext
) -> None:
    server = await make_server()
    status = b""
    tcp = await trio.open_tcp_stream("127.0.0.1", server.web_port)
    async with trio.SSLStream(tcp, client_ssl, server_hostname="127.0.0.1") as tls:
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with trio.fail_after(5):
            while b"\r\n" not in status:
                status += await tls.receive_some(1024)
    assert status.startswith(b"HTTP/1.1 401")


# -- listeners --------------------------------------------------------------------------


async def test_listeners_carry_the_send_timeout(make_server: MakeServer) -> None:
    """TCP_USER_TIMEOUT on both listening sockets (accepted ones inherit it):
    the kernel then drops a peer that accepts nothing for send_timeout, even
    where hypercorn's shielded writes cannot be cancelled."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux only")
    server = await make_server(no_tls=True, send_timeout=7)
    for port in (server.rfb_port, server.web_port):
        timeouts = []
        for sock in _listening_sockets(port):
            with sock:
                timeouts.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        assert timeouts == [9000]  # the send timeout and a margin


def _listening_sockets(port: int) -> list[socket.socket]:
    """Duplicates of this process's listening TCP sockets on `port`."""
    found = []
    seen: set[int] = set()
    for entry in list(Path("/proc/self/fd").iterdir()):
        try:
            dup = os.dup(int(entry.name))
        except OSError:
            continue
        inode = os.fstat(dup).st_ino
        if inode in seen:  # a descriptor number reused by one of these dups
            os.close(dup)
            continue
        seen.add(inode)
        try:
            probe = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if (
                probe.type == socket.SOCK_STREAM
                and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and probe.getsockname()[1] == port
            ):
                found.append(probe)
                continue
        except (OSError, IndexError, TypeError):
            pass
        probe.close()
    return found

"""Slow and vanishing clients: one that never reads, one that reads a byte a
second, one that disconnects in the middle of an update, a thousand that never
finish the handshake. The others keep getting updates, the server's per-session
queues stay within their caps, and the bad ones are closed with a reason.
Assertions are on updates arriving and on bookkeeping sizes, never on speed."""

from __future__ import annotations

import base64
import resource
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import trio
from trio_websocket import open_websocket_url

import trivnc
from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.server import Server
from trivnc.server.session import ClientSession
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource
from trivnc.testing.aclient import HandshakeError, open_test_client

W, H = 800, 600
SEND_TIMEOUT = 4.0
OUTPUT_LIMIT = 65536
#: What one read of client input can add to the replies queued before the
#: receive task checks the cap again (a 64 KiB read of small messages that
#: each need a reply a few times their size).
ONE_READ_OF_REPLIES = 4 * 65536


def noise(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (H, W, 4), dtype=np.uint8)


@pytest.fixture
async def source() -> ArraySource:
    return ArraySource.from_array(noise(1))


@pytest.fixture
async def server(nursery: trio.Nursery, source: ArraySource) -> AsyncIterator[Server]:
    config = trivnc.Config(
        source=source,
        rfb_port=0,
        insecure_no_auth=True,
        handshake_timeout=2,
        send_timeout=SEND_TIMEOUT,
        output_buffer_limit=OUTPUT_LIMIT,
        measure_interval=0.2,
    )
    yield await nursery.start(trivnc.serve, config)


# -- a raw RFB viewer that does only what a test tells it -----------------------------


async def read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def set_encodings(*encodings: int) -> bytes:
    return b"\x02\x00" + struct.pack(f">H{len(encodings)}i", len(encodings), *encodings)


def update_request(incremental: bool) -> bytes:
    return struct.pack(">BBHHHH", 3, incremental, 0, 0, W, H)


async def raw_viewer(port: int, *, rcvbuf: int = 4096) -> trio.SocketStream:
    """RFB 3.8, security None, Raw pixels; a small receive buffer so that a
    viewer that stops reading is noticed soon."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    assert await read_exact(stream, 12) == b"RFB 003.008\n"
    await stream.send_all(b"RFB 003.008\n")
    types = await read_exact(stream, (await read_exact(stream, 1))[0])
    assert 1 in types
    await stream.send_all(b"\x01")
    assert await read_exact(stream, 4) == b"\0\0\0\0"
    await stream.send_all(b"\x01")
    await read_exact(stream, 20)
    (name_len,) = struct.unpack(">I", await read_exact(stream, 4))
    await read_exact(stream, name_len)
    await stream.send_all(set_encodings(Encoding.RAW, PseudoEncoding.FENCE))
    return stream


def session_of(server: Server, stream: trio.SocketStream) -> ClientSession:
    port = stream.socket.getsockname()[1]
    (session,) = [s for s in server.sessions if s.peer.endswith(f":{port}")]
    return session


async def wait_until(check: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


async def changes_arrive(
    server: Server,
    source: ArraySource,
    rounds: int = 8,
    while_present: ClientSession | None = None,
) -> None:
    """A well-behaved viewer sees each of `rounds` changes of the desktop
    (asserted on what arrives, with a generous timeout per change); the
    first while the session `while_present` is still connected."""
    async with open_test_client("127.0.0.1", server.rfb_port, security_types=[1]) as viewer:
        await viewer.screenshot()
        for i in range(rounds):
            if i == 1 and while_present is not None:
                assert while_present in server.sessions
            colour = (i * 37 % 256, 200, 255 - i, 0)
            source.pixels[10:40, 10:40] = colour
            source.mark_changed(Rect(10, 10, 30, 30))
            with trio.fail_after(10):
                while not np.array_equal(viewer.framebuffer[20, 20, :3], colour[:3]):
                    await viewer.request_update(incremental=True)
                    await viewer.next_update()


# -- tests ----------------------------------------------------------------------------


async def test_a_never_reading_client_does_not_stall_others(
    server: Server, source: ArraySource
) -> None:
    bad = await raw_viewer(server.rfb_port)
    session = session_of(server, bad)
    peak = 0

    async def flood_requests() -> None:
        # Asks for whole frames and never reads one (until the server drops it).
        with suppress(trio.BrokenResourceError):
            for _ in range(200):
                await bad.send_all(update_request(incremental=False))
                await trio.sleep(0.01)

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, session.pending_output())
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood_requests)
        nursery.start_soon(watch)
        for n in range(50):  # desktop clipboard and bell while it does not read
            server.context.clipboard_changed(f"clipboard {n} " + "x" * 1000)
            server.context.bell()
        await changes_arrive(server, source, while_present=session)
        # Newest clipboard and one bell are kept, not every one.
        kinds = [kind for kind, _ in session._control]
        assert kinds.count("clipboard") <= 1 and kinds.count("bell") <= 1
        # Then the server gives up on it, with the reason.
        await wait_until(lambda: session not in server.sessions)
        nursery.cancel_scope.cancel()
    assert "send timed out" in session.close_reason
    assert peak <= OUTPUT_LIMIT + ONE_READ_OF_REPLIES
    await wait_until(lambda: server.context.connections == 0)
    await trio.aclose_forcefully(bad)


async def test_a_one_byte_a_second_reader_does_not_stall_others(
    server: Server, source: ArraySource
) -> None:
    slow = await raw_viewer(server.rfb_port)
    session = session_of(server, slow)
    await slow.send_all(update_request(incremental=False))

    async def trickle() -> None:
        while True:
            await slow.receive_some(1)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await changes_arrive(server, source, while_present=session)
        await wait_until(lambda: session not in server.sessions)
        nursery.cancel_scope.cancel()
    assert "send timed out" in session.close_reason
    await trio.aclose_forcefully(slow)


async def test_replies_to_a_client_that_does_not_read_are_capped(server: Server) -> None:
    """Fence requests each need a reply; a client that sends them and reads
    nothing is stopped being read (so the replies cannot pile up), then
    disconnected."""
    bad = await raw_viewer(server.rfb_port)
    session = session_of(server, bad)
    fence = b"\xf8\0\0\0" + struct.pack(">IB", 0x80000000, 64) + b"f" * 64
    peak = 0
    sent = 0

    async def flood_fences() -> None:
        nonlocal sent
        with suppress(trio.BrokenResourceError):
            await bad.send_all(update_request(incremental=False))
            while True:
                await bad.send_all(fence * 256)
                sent += 256 * len(fence)

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, session.pending_output())
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood_fences)
        nursery.start_soon(watch)
        await wait_until(lambda: session not in server.sessions)
        nursery.cancel_scope.cancel()
    assert sent > 2 * OUTPUT_LIMIT  # it asked for more replies than the cap
    assert peak <= OUTPUT_LIMIT + ONE_READ_OF_REPLIES
    assert "send timed out" in session.close_reason or "not reading" in session.close_reason
    await trio.aclose_forcefully(bad)


async def test_disconnecting_mid_update_leaves_no_session(
    server: Server, source: ArraySource
) -> None:
    async def vanish() -> None:
        stream = await raw_viewer(server.rfb_port, rcvbuf=65536)
        await stream.send_all(update_request(incremental=False))
        await read_exact(stream, 20000)  # part of a 1.9 MB update
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(stream)  # reset, mid-update

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(vanish)
    async with open_test_client("127.0.0.1", server.rfb_port) as viewer:
        await viewer.screenshot()
        await wait_until(lambda: len(server.sessions) == 1 and server.context.connections == 1)
    await wait_until(lambda: not server.sessions and server.context.connections == 0)
    assert server.context.pending_handshakes == 0


async def test_handshake_timeout_closes_an_idle_connection(server: Server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.rfb_port)
    async with stream:
        assert await read_exact(stream, 12) == b"RFB 003.008\n"
        await wait_until(lambda: server.context.pending_handshakes == 1)
        with trio.fail_after(2 + 3):
            assert await stream.receive_some(100) == b""
    await wait_until(lambda: server.context.connections == 0)


def _fd_budget(wanted: int) -> int:
    """Raise the soft descriptor limit as far as needed (and allowed); return
    how many half-open connections fit (each costs two descriptors here, the
    test being both client and server)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return min(wanted, (soft - 256) // 2)


@pytest.mark.parametrize("max_connections", [0, 100])
async def test_a_thousand_half_open_connections(
    nursery: trio.Nursery, source: ArraySource, max_connections: int
) -> None:
    count = _fd_budget(1000)
    assert count >= 200, "too few file descriptors for this test"
    timeout = 2.0
    config = trivnc.Config(
        source=source,
        rfb_port=0,
        insecure_no_auth=True,
        handshake_timeout=timeout,
        max_connections=max_connections,
    )
    server: Server = await nursery.start(trivnc.serve, config)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.context.connections)
            await trio.sleep(0.005)

    half_open: list[trio.SocketStream] = []
    async with trio.open_nursery() as watcher:
        watcher.start_soon(watch)
        for _ in range(count):
            half_open.append(await trio.open_tcp_stream("127.0.0.1", server.rfb_port))
        if max_connections:
            # Full: a clean client is told why.
            with pytest.raises(HandshakeError, match="too many connections"):
                async with open_test_client("127.0.0.1", server.rfb_port):
                    pass
        else:
            # No limit: the accept loop still serves a clean client at once.
            async with open_test_client("127.0.0.1", server.rfb_port) as early:
                await early.screenshot()
        # All of them are closed once the handshake timeout has passed.
        with trio.fail_after(timeout + 10):
            for stream in half_open:
                with pytest.raises(EOFError):
                    while True:
                        data = await stream.receive_some(4096)
                        if not data:
                            raise EOFError
        await wait_until(lambda: server.context.connections == 0)
        watcher.cancel_scope.cancel()
    for stream in half_open:
        await trio.aclose_forcefully(stream)
    if max_connections:
        assert peak <= max_connections
        assert server.context.refused >= count - max_connections
    else:
        assert peak >= count // 2  # they were held, not refused
    assert not server.sessions
    async with open_test_client("127.0.0.1", server.rfb_port) as clean:
        await clean.screenshot()


async def test_tls_handshakes_are_timed_out_too(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The handshake timeout covers the TLS handshake of VeNCrypt on the RFB
    port, the TLS handshake on the web port, and the RFB handshake inside a
    WebSocket."""
    users = tmp_path / "users"
    UserStore(users).create("alice", "alice-secret", read=True, write=True, owner=False)
    config = trivnc.Config(
        source=ArraySource(64, 64),
        rfb_port=0,
        web_port=0,
        users_file=users,
        handshake_timeout=1,
    )
    server: Server = await nursery.start(trivnc.serve, config)

    async def closed_within(stream: trio.SocketStream, seconds: float) -> None:
        with trio.fail_after(seconds):
            while await stream.receive_some(4096):
                pass

    # VeNCrypt up to StartTLS, then silence.
    rfb = await trio.open_tcp_stream("127.0.0.1", server.rfb_port)
    async with rfb:
        await read_exact(rfb, 12)
        await rfb.send_all(b"RFB 003.008\n")
        types = await read_exact(rfb, (await read_exact(rfb, 1))[0])
        assert 19 in types
        await rfb.send_all(b"\x13")
        assert await read_exact(rfb, 2) == b"\0\x02"
        await rfb.send_all(b"\0\x02")
        head = await read_exact(rfb, 2)
        await read_exact(rfb, 4 * head[1])
        await rfb.send_all(struct.pack(">I", 262))  # X509Plain
        assert await read_exact(rfb, 1) == b"\x01"
        await closed_within(rfb, 4)
    # The web port: no TLS ClientHello.
    web = await trio.open_tcp_stream("127.0.0.1", server.web_port)
    async with web:
        await closed_within(web, 4)
    await wait_until(lambda: server.context.connections == 0)


async def test_websocket_rfb_handshake_is_timed_out(nursery: trio.Nursery, tmp_path: Path) -> None:
    users = tmp_path / "users"
    UserStore(users).create("alice", "alice-secret", read=True, write=True, owner=False)
    config = trivnc.Config(
        source=ArraySource(64, 64),
        rfb_port=None,
        web_port=0,
        users_file=users,
        no_tls=True,
        handshake_timeout=1,
    )
    server: Server = await nursery.start(trivnc.serve, config)
    auth = "Basic " + base64.b64encode(b"alice:alice-secret").decode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.web_port)
    async with stream:
        await stream.send_all(
            (
                "GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: {auth}\r\n\r\n"
            ).encode()
        )
        data = b""
        with trio.fail_after(5):
            while b"RFB 003.008\n" not in data:
                data += await stream.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 101 ")
        assert server.context.connections == 1
        # Silence after the server's version: closed after the timeout.
        with trio.fail_after(1 + 4):
            while await stream.receive_some(4096):
                pass
    await wait_until(lambda: server.context.connections == 0)


async def test_a_never_reading_websocket_client_is_dropped(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """hypercorn's socket writes cannot be cancelled; TCP_USER_TIMEOUT ends
    them, so a browser that stops reading does not hold its session for ever."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux only")
    users = tmp_path / "users"
    UserStore(users).create("alice", "alice-secret", read=True, write=True, owner=False)
    source = ArraySource.from_array(noise(2))
    config = trivnc.Config(
        source=source,
        rfb_port=0,
        web_port=0,
        users_file=users,
        no_tls=True,
        insecure_no_auth=True,
        send_timeout=SEND_TIMEOUT,
    )
    server: Server = await nursery.start(trivnc.serve, config)
    auth = "Basic " + base64.b64encode(b"alice:alice-secret").decode()
    async with open_websocket_url(
        f"ws://127.0.0.1:{server.web_port}/websockify",
        subprotocols=["binary"],
        extra_headers=[(b"Authorization", auth.encode())],
        message_queue_size=0,
    ) as ws:
        received = b""

        async def take(n: int) -> bytes:
            nonlocal received
            while len(received) < n:
                message = await ws.get_message()
                assert isinstance(message, bytes)
                received += message
            out, received = received[:n], received[n:]
            return out

        await take(12)
        await ws.send_message(b"RFB 003.008\n")
        await take((await take(1))[0])
        await ws.send_message(b"\x01")
        await take(4)
        await ws.send_message(b"\x01")
        await take(20)
        await take(struct.unpack(">I", await take(4))[0])
        await ws.send_message(set_encodings(Encoding.RAW))
        await wait_until(lambda: len(server.sessions) == 1)
        (session,) = server.sessions
        for _ in range(20):  # whole frames, never read
            await ws.send_message(update_request(incremental=False))
        await changes_arrive(server, source, rounds=3)
        await wait_until(lambda: session not in server.sessions, timeout=SEND_TIMEOUT + 20)
        assert "send timed out" in session.close_reason
    await wait_until(lambda: server.context.connections == 0)

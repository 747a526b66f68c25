"""trivnc.serve end to end over TCP on loopback, with the decoding test client."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio

import trivnc
from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.rfb.pixelformat import BGR233, BGRX, RGB565, RGBX, PixelFormat
from trivnc.server import Server
from trivnc.server.vncpasswd import read_vnc_password_file, write_vnc_password_file
from trivnc.sources.array import ArraySource
from trivnc.testing.aclient import HandshakeError, VncClient, open_test_client
from trivnc.testing.client import ExtendedDesktopSize
from trivnc.testing.images import desktop_like, psnr

W, H = 320, 200
BIG_ENDIAN_BGRX = PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0)


@pytest.fixture
async def source() -> ArraySource:
    return ArraySource.from_array(desktop_like(W, H, seed=3), name="test desk", resizable=True)


@pytest.fixture
async def server(nursery: trio.Nursery, source: ArraySource) -> AsyncIterator[Server]:
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True, handshake_timeout=2)
    yield await nursery.start(trivnc.serve, config)


def client(server: Server, **kw: Any) -> AbstractAsyncContextManager[VncClient]:
    return open_test_client("127.0.0.1", server.rfb_port, **kw)


def expected(source: ArraySource, pf: PixelFormat) -> npt.NDArray[np.uint8]:
    """What a lossless encoding must deliver: the source at the format's precision."""
    values = pf.values_to_bgrx(pf.pixel_values(source.pixels))
    return values[..., :3]


async def test_serve_reports_address_and_stops(nursery: trio.Nursery, source: ArraySource) -> None:
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True)
    with trio.CancelScope() as scope:
        srv: Server = await nursery.start(trivnc.serve, config)
    host, port = srv.rfb_addresses[0]
    assert host == "127.0.0.1" and port > 0
    stream = await trio.open_tcp_stream(host, port)
    assert await stream.receive_some(12) == b"RFB 003.008\n"
    await stream.aclose()
    srv.stop()
    await trio.sleep(0.1)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)
    assert not scope.cancelled_caught


LOSSLESS = [
    Encoding.RAW,
    Encoding.RRE,
    Encoding.HEXTILE,
    Encoding.ZLIB,
    Encoding.ZRLE,
    Encoding.TIGHT,
]


@pytest.mark.parametrize("encoding", LOSSLESS, ids=lambda e: Encoding(e).name)
@pytest.mark.parametrize("pf", [None, RGBX, RGB565, BGR233, BIG_ENDIAN_BGRX], ids=str)
async def test_every_encoding_and_format_is_exact(
    server: Server, source: ArraySource, encoding: int, pf: PixelFormat | None
) -> None:
    async with client(
        server, encodings=[encoding, PseudoEncoding.EXTENDED_DESKTOP_SIZE], pixel_format=pf
    ) as c:
        assert c.name == "test desk"
        shot = await c.screenshot()
    assert np.array_equal(shot[..., :3], expected(source, pf or BGRX))


async def test_tight_jpeg_follows_quality(server: Server, source: ArraySource) -> None:
    scores = {}
    for level in (0, 9):
        async with client(server, encodings=[Encoding.TIGHT, -32 + level]) as c:
            shot = await c.screenshot()
            scores[level] = psnr(shot[..., :3], source.pixels[..., :3])
    assert scores[9] > scores[0] > 20


async def test_incremental_update_carries_exactly_the_change(
    server: Server, source: ArraySource
) -> None:
    async with client(server, encodings=[Encoding.RAW]) as c:
        await c.screenshot()
        await c.request_update(incremental=True)
        source.pixels[50:60, 70:75] = (1, 2, 3, 0)
        source.mark_changed(Rect(70, 50, 5, 10))
        update = await c.next_update()
        rects = [r for r, _ in update.pixel_rects]
        # The marked rect itself, not the 64x64 tiles around it.
        assert rects == [Rect(70, 50, 5, 10)]
        assert np.array_equal(c.framebuffer[..., :3], source.pixels[..., :3])
        # Marking without a real change sends nothing.
        await c.request_update(incremental=True)
        source.mark_changed(Rect(0, 0, 10, 10))
        with pytest.raises(trio.TooSlowError):
            await c.next_update(timeout=0.5)


async def test_updates_are_cut_to_the_damage_of_every_version_not_yet_sent(
    server: Server, source: ArraySource
) -> None:
    async def change(rect: Rect, value: int) -> None:
        assert server.service.latest is not None
        version = server.service.latest.version
        source.pixels[rect.slices()] = (value, value, value, 0)
        source.mark_changed(rect)
        await _published_after(server, version)

    async with client(server, encodings=[Encoding.RAW]) as c:
        await c.screenshot()
        # Two changes in one tile, published as two versions before the
        # client asks: the update covers both (their bounding box in the tile).
        await change(Rect(10, 10, 2, 2), 9)
        await change(Rect(30, 40, 3, 5), 8)
        await c.request_update(incremental=True)
        update = await c.next_update()
        assert [r for r, _ in update.pixel_rects] == [Rect(10, 10, 23, 35)]
        assert np.array_equal(c.framebuffer[..., :3], source.pixels[..., :3])
        # A change outside the area the client asks for stays owed, and is
        # cut to its damage when it is asked for.
        await change(Rect(150, 150, 10, 1), 7)
        await c.request_update(incremental=True, rect=Rect(0, 0, 64, 64))
        with pytest.raises(trio.TooSlowError):
            await c.next_update(timeout=0.3)
        await c.request_update(incremental=True)
        update = await c.next_update()
        assert [r for r, _ in update.pixel_rects] == [Rect(150, 150, 10, 1)]
        assert np.array_equal(c.framebuffer[..., :3], source.pixels[..., :3])


async def test_ten_clients(server: Server, source: ArraySource) -> None:
    results: list[bool] = []

    async def one(i: int) -> None:
        enc = LOSSLESS[i % len(LOSSLESS)]
        async with client(server, encodings=[enc]) as c:
            shot = await c.screenshot()
            results.append(np.array_equal(shot[..., :3], source.pixels[..., :3]))

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(one, i)
    assert results == [True] * 10


async def test_identical_requests_are_encoded_once(server: Server) -> None:
    async with (
        client(server, encodings=[Encoding.HEXTILE]) as a,
        client(server, encodings=[Encoding.HEXTILE]) as b,
    ):
        await a.screenshot()
        misses = server.context.cache.misses
        await b.screenshot()
    assert server.context.cache.hits > 0
    assert server.context.cache.misses == misses  # the second viewer encoded nothing


async def _published_after(server: Server, version: int) -> None:
    with trio.fail_after(5):
        while server.service.latest is None or server.service.latest.version <= version:
            await trio.sleep(0.01)


async def _animate(source: ArraySource, stop: trio.Event) -> None:
    i = 0
    while not stop.is_set():
        source.pixels[0:20, 0:20] = (i % 256, 0, 0, 0)
        source.mark_changed(Rect(0, 0, 20, 20))
        i += 1
        await trio.sleep(0.02)


async def _count_updates(c: VncClient, seconds: float) -> int:
    count = 0
    with trio.move_on_after(seconds):
        while True:
            await c.request_update(incremental=True)
            await c.next_update(timeout=seconds)
            count += 1
    return count


async def _stalled_viewer(port: int) -> socket.socket:
    """A viewer that completes the handshake, asks for Raw updates of the whole
    screen again and again, and never reads a byte."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"RFB 003.008\n\x01\x01")
    sock.sendall(b"\x02\x00\x00\x01" + struct.pack(">i", 0))
    sock.sendall((b"\x03\x00" + struct.pack(">HHHH", 0, 0, W, H)) * 200)
    return sock


async def test_a_client_that_stops_reading_does_not_slow_the_others(
    server: Server, source: ArraySource
) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(_animate, source, stop)
        async with client(server, encodings=[Encoding.RAW]) as c:
            alone = await _count_updates(c, 1.5)
            stalled = [await _stalled_viewer(server.rfb_port) for _ in range(3)]
            await trio.sleep(0.5)  # let their socket buffers fill
            with_stalled = await _count_updates(c, 1.5)
        stop.set()
    for s in stalled:
        s.close()
    assert alone > 10
    assert with_stalled > 0.6 * alone


async def test_garbage_costs_only_its_connection(server: Server, source: ArraySource) -> None:
    async with client(server, encodings=[Encoding.RAW]) as good:
        async with await trio.open_tcp_stream("127.0.0.1", server.rfb_port) as bad:
            await bad.receive_some(12)
            await bad.send_all(b"RFB 003.008\n\x01\x01" + b"\x99" * 100)
            with trio.fail_after(5):
                while await bad.receive_some(4096):
                    pass  # the server closes it
        shot = await good.screenshot()
        assert np.array_equal(shot[..., :3], source.pixels[..., :3])


async def test_silent_client_is_timed_out_of_the_handshake(server: Server) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.rfb_port) as stream:
        with trio.fail_after(5):
            data = b""
            while chunk := await stream.receive_some(100):
                data += chunk
    assert data == b"RFB 003.008\n"


async def test_non_shared_client_disconnects_the_others(server: Server) -> None:
    async with client(server) as first:
        await first.screenshot()
        async with client(server, shared=False) as second:
            await second.screenshot()
            with trio.fail_after(5):
                while True:
                    try:
                        await first.request_update(incremental=False)
                        await first.next_update(timeout=0.5)
                    except trio.TooSlowError:
                        continue
                    except Exception:
                        break
            assert len(server.sessions) == 1


async def test_continuous_updates(server: Server, source: ArraySource) -> None:
    encs = [Encoding.RAW, PseudoEncoding.CONTINUOUS_UPDATES, PseudoEncoding.FENCE]
    async with client(server, encodings=encs) as c:
        await c.screenshot()
        await c.send(b"\x96\x01" + struct.pack(">HHHH", 0, 0, W, H))
        for value in (10, 20, 30):
            source.pixels[100:110, 100:110] = (value, value, value, 0)
            source.mark_changed(Rect(100, 100, 10, 10))
            with trio.fail_after(5):
                while c.framebuffer[105, 105, 0] != value:
                    await c.next_update()


async def test_resize_by_client(server: Server, source: ArraySource) -> None:
    async with client(server) as c:
        await c.screenshot()
        await c.send(
            b"\xfb\x00"
            + struct.pack(">HHB", 200, 100, 1)
            + b"\x00"
            + struct.pack(">IHHHHI", 0, 0, 0, 200, 100, 0)
        )
        reply = await c.wait_for(ExtendedDesktopSize, predicate=lambda e: e.reason == 1)
        assert reply.status == 0
        shot = await c.screenshot()
        assert shot.shape[:2] == (100, 200)
        assert np.array_equal(shot[..., :3], source.pixels[..., :3])


async def test_vnc_authentication_with_a_vncpasswd_file(
    nursery: trio.Nursery, source: ArraySource, tmp_path: Path
) -> None:
    path = tmp_path / "passwd"
    write_vnc_password_file(path, "s3cret")
    assert read_vnc_password_file(path) == "s3cret"
    assert path.stat().st_mode & 0o777 == 0o600
    config = trivnc.Config(source=source, rfb_port=0, vnc_password_file=path)
    srv: Server = await nursery.start(trivnc.serve, config)
    async with open_test_client("127.0.0.1", srv.rfb_port, vnc_password="s3cret") as c:
        await c.screenshot()
    with pytest.raises(HandshakeError):
        async with open_test_client("127.0.0.1", srv.rfb_port, vnc_password="wrong"):
            pass


def test_config_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    from trivnc.cli import main

    assert main(["--insecure-no-auth", "--listen", "0.0.0.0"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert main(["--rfb-port", "off", "--web-port", "off"]) == 2
    assert main(["--insecure-no-auth", "--", "xterm"]) == 2  # a command needs --xvfb
    assert main(["--cert", "c.pem", "--insecure-no-auth"]) == 2
    with pytest.raises(SystemExit):
        main(["--display", ":1", "--xvfb", "100x100"])


@pytest.mark.parametrize(
    "encoding", [Encoding.ZLIB, Encoding.ZRLE, Encoding.TIGHT], ids=lambda e: Encoding(e).name
)
async def test_pixel_format_change_keeps_streams_in_step(
    server: Server, source: ArraySource, encoding: int
) -> None:
    async with client(server, encodings=[encoding]) as c:
        await c.screenshot()
        await c.set_pixel_format(RGB565)
        shot = await c.screenshot()
        diff = np.argwhere((shot[..., :3] != expected(source, RGB565)).any(axis=2))
        assert len(diff) == 0, (diff[:3], diff[-3:], len(diff))
        await c.set_pixel_format(RGBX)
        version = server.service.latest.version if server.service.latest else 0
        source.pixels[:40, :40] = (9, 99, 199, 0)
        source.mark_changed(Rect(0, 0, 40, 40))
        await _published_after(server, version)
        shot = await c.screenshot()
        assert np.array_equal(shot[..., :3], source.pixels[..., :3])


async def test_tight_jpeg_rects_are_shared(server: Server) -> None:
    encodings = [Encoding.TIGHT, -32 + 6]
    async with client(server, encodings=encodings) as a, client(server, encodings=encodings) as b:
        await a.screenshot()
        hits = server.context.cache.hits
        await b.screenshot()
    assert server.context.cache.hits > hits


async def test_a_viewer_that_leaves_releases_what_it_held(
    server: Server, source: ArraySource
) -> None:
    from trivnc.sources.array import KeyInput, PointerInput

    events = source.input_events()
    async with client(server) as c:
        await c.screenshot()
        await c.key(0xFFE1, True)  # Shift_L down
        await c.pointer(5, 6, 1)  # button 1 down
        await c.screenshot()  # the server has read both
    seen: list[object] = []
    with trio.move_on_after(2):
        while len(seen) < 4:
            seen.append(await events.receive())
    assert seen[-2:] == [KeyInput(0xFFE1, False), PointerInput(5, 6, 0)]

"""KasmVNC's web client against trivnc (issue 8): dialect detection on the
WebSocket, the Kasm messages, frame stats, WebP and QOI rects, with the
Kasm-dialect test client (trivnc.testing.kasm) against a real server; and the
standard clients on the same port."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from tls_files import issue
from trio_websocket import open_websocket_url

import trivnc
from trivnc.encodings.tight import TightEncoder
from trivnc.geometry import Rect
from trivnc.rfb import events as ev
from trivnc.rfb.capabilities import ClientCapabilities
from trivnc.rfb.connection import NEED_DATA, Dialect, SecurityConfig, ServerConnection
from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.rfb.pixelformat import RGBX
from trivnc.server import Server
from trivnc.server import kasm as server_kasm
from trivnc.server.encoding import SessionEncoders
from trivnc.server.session import ClientSession
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource, ClipboardInput, PointerInput, ScrollInput
from trivnc.testing.aclient import wrap_stream
from trivnc.testing.client import (
    KasmBinaryClipboard,
    KasmUserAdded,
    KasmUserRemoved,
    KasmVideoEncoders,
)
from trivnc.testing.images import photo_like, psnr
from trivnc.testing.kasm import KasmClient, kasm_encodings, open_kasm_client
from trivnc.testing.websocket import WebSocketByteStream

USERS = {"boss": ("boss-secret", "rwo"), "typist": ("typist-secret", "rw")}
W, H = 512, 256
CLIPBOARD_LIMIT = 1000


def smooth_and_photo() -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Left half a smooth full-colour gradient (QOI's case), right half a
    photo (WebP's), BGRX."""
    out = np.zeros((H, W, 4), np.uint8)
    y, x = np.mgrid[0:H, 0 : W // 2]
    out[:, : W // 2, 0] = (x * 3 // 2) % 256
    out[:, : W // 2, 1] = (y * 3 // 2) % 256
    out[:, : W // 2, 2] = (x + y) // 3 % 256
    out[:, W // 2 :] = photo_like(W // 2, H, seed=4)
    return out


@dataclass
class Setup:
    server: Server
    source: ArraySource
    client_ssl: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.server.web_port}/websockify"

    def kasm(self, name: str = "typist", **kw: Any) -> AbstractAsyncContextManager[KasmClient]:
        return open_kasm_client(self.url, name, USERS[name][0], ssl_context=self.client_ssl, **kw)

    def session(self) -> ClientSession:
        (session,) = self.server.sessions
        return session


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    tls = issue(tmp_path)
    store = UserStore(tmp_path / "users")
    for name, (password, perms) in USERS.items():
        store.create(name, password, read="r" in perms, write="w" in perms, owner="o" in perms)
    source = ArraySource.from_array(smooth_and_photo())
    config = trivnc.Config(
        source=source,
        rfb_port=None,
        web_port=0,
        listen=["127.0.0.1"],
        users_file=tmp_path / "users",
        cert=tls.cert,
        key=tls.key,
        clipboard_max_size=CLIPBOARD_LIMIT,
    )
    server = await nursery.start(trivnc.serve, config)
    yield Setup(server, source, tls.client_context())


async def _inputs(source: ArraySource, seconds: float = 0.5) -> list[object]:
    events = source.input_events()
    seen: list[object] = []
    with trio.move_on_after(seconds):
        while True:
            seen.append(await events.receive())
    return seen


# -- dialect detection (sans-io) --------------------------------------------------------


def _connected(dialect: Dialect = Dialect.AUTO) -> ServerConnection:
    conn = ServerConnection(SecurityConfig(allow_none=True), dialect=dialect)
    conn.receive_data(b"RFB 003.008\n\x01\x01")
    events = _drain(conn)
    assert isinstance(events[-1], ev.ClientInit)
    conn.send_server_init(W, H, "t")
    conn.data_to_send()
    return conn


def _drain(conn: ServerConnection) -> list[ev.Event]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, ev.Event)
        out.append(event)
    return out


def _set_encodings(*encodings: int) -> bytes:
    return (
        bytes((2, 0))
        + len(encodings).to_bytes(2, "big")
        + b"".join(e.to_bytes(4, "big", signed=True) for e in encodings)
    )


def test_detection_184_selects_kasm() -> None:
    conn = _connected()
    conn.receive_data(bytes((0, 0, 0, 0)) + RGBX.pack())  # shared by both dialects
    assert [type(e) for e in _drain(conn)] == [ev.SetPixelFormat]
    assert conn.dialect is Dialect.AUTO
    conn.receive_data(bytes((184, 1)) + (-1025).to_bytes(4, "big", signed=True))
    # The 11-byte pointer is read as Kasm's once the dialect is chosen.
    conn.receive_data(bytes((5, 0, 1, 0, 10, 0, 20, 0, 0, 0xFF, 0xFD)))
    events = _drain(conn)
    assert events == [
        ev.DialectSelected(Dialect.KASM),
        ev.KasmVideoEncodersRequest((-1025,)),
        ev.PointerEvent(10, 20, 1, 0, -3),
    ]
    assert conn.dialect.value == "kasm"  # (mypy narrowed it to AUTO above)


@pytest.mark.parametrize("kasm_value", [-1024, -1886, -1885, -1884, -2048, -770, -992])
def test_detection_kasm_set_encodings_selects_kasm(kasm_value: int) -> None:
    conn = _connected()
    conn.receive_data(_set_encodings(Encoding.TIGHT, PseudoEncoding.EXTENDED_CLIPBOARD))
    assert [type(e) for e in _drain(conn)] == [ev.SetEncodings]
    replies = conn.data_to_send()  # standard until decided: Extended Clipboard caps
    assert replies[:1] == b"\x03"
    conn.receive_data(_set_encodings(Encoding.TIGHT, PseudoEncoding.EXTENDED_CLIPBOARD, kasm_value))
    events = _drain(conn)
    assert [type(e) for e in events] == [ev.DialectSelected, ev.SetEncodings]
    assert events[0] == ev.DialectSelected(Dialect.KASM)
    assert conn.data_to_send() == b""  # no clipboard caps for a Kasm client


@pytest.mark.parametrize(
    "message",
    [bytes((5, 1, 0, 10, 0, 20)), bytes((6, 0, 0, 0, 0, 0, 0, 2)) + b"hi"],
    ids=["pointer", "cut-text"],
)
def test_detection_locks_standard(message: bytes) -> None:
    conn = _connected()
    conn.receive_data(message)
    events = _drain(conn)
    assert events[0] == ev.DialectSelected(Dialect.STANDARD)
    assert type(events[1]) in (ev.PointerEvent, ev.ClientCutText)
    # Locked for good: Kasm encodings are now just unknown pseudo-encodings,
    # and 184 is an unknown message.
    conn.receive_data(_set_encodings(Encoding.TIGHT, -1024, -2048))
    assert [type(e) for e in _drain(conn)] == [ev.SetEncodings]
    assert conn.dialect is Dialect.STANDARD
    conn.receive_data(bytes((184, 0)))
    with pytest.raises(Exception, match="unknown message type 184"):
        _drain(conn)


def test_fixed_dialects_never_switch() -> None:
    for dialect in (Dialect.STANDARD, Dialect.KASM):
        conn = _connected(dialect)
        conn.receive_data(_set_encodings(-1024))
        assert [type(e) for e in _drain(conn)] == [ev.SetEncodings]
        assert conn.dialect is dialect


def test_kasm_settings_earlier_entries_win() -> None:
    caps = ClientCapabilities.from_encodings(
        (*kasm_encodings(frame_rate=30, dynamic_quality=(3, 8)), -2048 + 50, -991 + 1)
    )
    kasm = caps.kasm
    assert kasm.frame_rate == 30 and kasm.dynamic_quality_min == 3
    assert kasm.dynamic_quality_max == 8 and kasm.treat_lossless == 7
    assert kasm.jpeg_video_quality == 5 and kasm.webp_video_quality == 5
    assert (kasm.video_area, kasm.video_time, kasm.video_out_time) == (65, 5, 3)
    assert kasm.video_scaling == 2 and kasm.streaming_mode_jpeg_webp
    assert not kasm.prefer_bandwidth
    assert ClientCapabilities.from_encodings(
        tuple(kasm_encodings(prefer_bandwidth=True))
    ).kasm.prefer_bandwidth


def test_webp_only_while_the_cpu_keeps_up() -> None:
    assert server_kasm.use_webp(True, 10.0) and server_kasm.use_webp(True, 9.0)
    assert not server_kasm.use_webp(True, 8.9) and not server_kasm.use_webp(False, 10.0)
    encoders = SessionEncoders()
    encoders.configure(ClientCapabilities.from_encodings((Encoding.TIGHT, -26, -1024)))
    tight = encoders.encoder(Encoding.TIGHT)
    assert isinstance(tight, TightEncoder) and tight.settings.allow_webp
    encoders.set_webp_affordable(False)
    tight = encoders.encoder(Encoding.TIGHT)
    assert isinstance(tight, TightEncoder) and not tight.settings.allow_webp
    assert tight.settings.jpeg_allowed  # JPEG instead


def test_stats_text_is_kasmvnc_format() -> None:
    assert server_kasm.stats_text([9.5, 10.0, 3.25, 0.0]) == "[ 9.5, 10.0, 3.2, 0.0 ]"


# -- against a server -------------------------------------------------------------------


async def test_handshake_selects_kasm_and_answers_184(setup: Setup) -> None:
    async with setup.kasm() as c:
        reply = await c.wait_for(KasmVideoEncoders)
        # KasmVNC lists only the video encoders it has; trivnc has none.
        assert reply.encoders == ()
        shot = await c.screenshot()
        assert psnr(shot[..., :3], setup.source.pixels[..., :3]) > 30
        session = setup.session()
        assert session.conn.dialect is Dialect.KASM
        assert session.conn.capabilities.kasm.frame_rate == 60
        await c.keep_alive()
        await c.set_max_video_resolution(1280, 720)
        await c.screenshot()  # the server read both by now, and kept the connection
        assert session.max_video_resolution == (1280, 720)


async def test_webp_and_qoi_rects(setup: Setup) -> None:
    async with setup.kasm(encodings=kasm_encodings(webp=True, qoi=True)) as c:
        shot = await c.screenshot()
        kinds = c.conn.decode_state.tight_kinds
        assert kinds.get("webp", 0) >= 1 and kinds.get("qoi", 0) >= 1, kinds
        src = setup.source.pixels
        left, right = slice(0, W // 2), slice(W // 2, W)
        assert np.array_equal(shot[:, left, :3], src[:, left, :3])  # QOI is exact
        assert psnr(shot[:, right, :3], src[:, right, :3]) > 30


async def test_jpeg_without_webp(setup: Setup) -> None:
    async with setup.kasm(encodings=kasm_encodings(webp=False, qoi=False)) as c:
        await c.screenshot()
        kinds = c.conn.decode_state.tight_kinds
        assert "webp" not in kinds and "qoi" not in kinds and kinds.get("jpeg", 0) >= 1


async def test_pointer_with_scroll_reaches_the_source(setup: Setup) -> None:
    setup.source.input_events()
    async with setup.kasm() as c:
        await c.screenshot()
        await c.scroll(10, 20, 0, -3)
        await c.pointer(11, 21, 1)
        await c.pointer(11, 21, 0)
        await c.screenshot()
    seen = await _inputs(setup.source)
    assert seen[:4] == [
        PointerInput(10, 20, 0),
        ScrollInput(10, 20, 0, -3),
        PointerInput(11, 21, 1),
        PointerInput(11, 21, 0),
    ]


async def test_clipboard_both_ways(setup: Setup) -> None:
    setup.source.input_events()
    async with setup.kasm() as c:
        await c.screenshot()
        await c.clipboard([("image/png", b"\x89PNG..."), ("text/plain", "héllo".encode())])
        await c.clipboard([("image/png", b"\x89PNG...")])  # not taken, politely
        await c.clipboard([("text/plain", b"x" * (CLIPBOARD_LIMIT + 1))])  # over the limit
        await c.screenshot()
        assert await _inputs(setup.source) == [ClipboardInput("héllo")]
        setup.server.context.clipboard_changed("from the desktop")
        reply = await c.wait_for(KasmBinaryClipboard)
        ((_, mime, data),) = reply.items
        assert (mime, data) == ("text/plain", b"from the desktop")
        setup.server.context.clipboard_changed("y" * (CLIPBOARD_LIMIT + 1))
        with pytest.raises(trio.TooSlowError):
            await c.wait_for(KasmBinaryClipboard, timeout=0.5)
        assert not setup.server.sessions.pop().conn.error


async def test_bottleneck_stats(setup: Setup) -> None:
    async with setup.kasm() as c:
        await c.screenshot()
        scores = await c.request_stats()
        assert len(scores) == 4 and all(0 <= s <= 10 for s in scores)


async def test_frame_stats_from_the_kasm_client(setup: Setup) -> None:
    headers = {"Authorization": "Basic " + _b64("boss:boss-secret")}
    async with (
        setup.kasm() as c,
        httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{setup.server.web_port}",
            verify=setup.client_ssl,
            headers=headers,
        ) as http,
    ):
        await c.screenshot()

        async def keep_changing() -> None:
            n = 0
            while True:
                n += 1
                setup.source.pixels[:8, :8, :3] = n % 256
                setup.source.mark_changed()
                await c.request_update(incremental=True)
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_changing)
            r = await http.get("/api/get_frame_stats", params={"client": "all"})
            nursery.cancel_scope.cancel()
        assert r.status_code == 200, r.text
        (client,) = r.json()["client_side"]
        assert client["client"].endswith("::websocket")
        assert client["client_time"] > 0
        assert c.frame_stats_sent >= 1


async def test_user_joined_and_left(setup: Setup) -> None:
    async with setup.kasm("typist") as first:
        await first.screenshot()
        async with setup.kasm("boss") as second:
            await second.screenshot()
            assert (await first.wait_for(KasmUserAdded)).username == "boss"
        assert (await first.wait_for(KasmUserRemoved)).username == "boss"


async def test_standard_websocket_clients_on_the_same_port(setup: Setup) -> None:
    setup.source.input_events()
    for subprotocols in (["binary"], []):
        async with (
            open_websocket_url(
                setup.url,
                ssl_context=setup.client_ssl,
                subprotocols=subprotocols,
                extra_headers=[
                    (b"Authorization", b"Basic " + _b64("typist:typist-secret").encode())
                ],
                message_queue_size=64,
            ) as ws,
            wrap_stream(WebSocketByteStream(ws), encodings=[Encoding.TIGHT, Encoding.RAW]) as c,
        ):
            shot = await c.screenshot()
            assert np.array_equal(shot[..., :3], setup.source.pixels[..., :3])
            session = setup.session()
            expected = Dialect.AUTO if subprotocols else Dialect.STANDARD
            assert session.conn.dialect is expected
            await c.pointer(3, 4, 1)
            await c.pointer(3, 4, 0)
            await c.screenshot()
            assert session.conn.dialect is Dialect.STANDARD
        while setup.server.sessions:
            await trio.sleep(0.01)
    seen = await _inputs(setup.source)
    assert seen == [PointerInput(3, 4, 1), PointerInput(3, 4, 0)] * 2


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


# -- video-mode scaling -----------------------------------------------------------------


def _gradient(shift: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A smooth full-screen picture that moves with `shift` (a video)."""
    y, x = np.mgrid[0:H, 0:W]
    out = np.zeros((H, W, 4), np.uint8)
    out[..., 0] = 128 + 100 * np.sin((x + shift) / 40)
    out[..., 1] = 128 + 100 * np.cos((y + shift) / 30)
    out[..., 2] = (x + y + shift) // 4 % 256
    return out


async def test_video_mode_scales_to_the_clients_max_video_resolution(setup: Setup) -> None:
    """In video mode a Kasm client that asked for at most half the screen
    (message 252) gets images of half the size in full-size rects, which it
    stretches back; when the video stops, full size again."""
    encodings = kasm_encodings(video_time=0, video_out_time=1, video_area=40, qoi=False)
    async with setup.kasm(encodings=encodings) as c:
        await c.screenshot()
        await c.set_max_video_resolution(W // 2, H // 2)
        session = setup.session()
        shift = 0
        with trio.fail_after(10):
            while not c.conn.decode_state.scaled_rects:
                shift += 3
                setup.source.pixels[...] = _gradient(shift)
                setup.source.mark_changed()
                await c.request_update(incremental=True)
                await c.next_update()
        assert session.encoders.video_scale == 0.5
        # The stretched picture is the source's, a little softer.
        await c.request_update(incremental=True)
        await c.next_update()
        assert psnr(c.framebuffer[..., :3], setup.source.pixels[..., :3]) > 25
        timing = setup.server.service.timings.latest()
        assert timing is not None and timing.videoscaling > 0
        # Small changes for longer than the video out-time: full size again.
        with trio.fail_after(10):
            while session.encoders.video:
                setup.source.pixels[0:4, 0:4] = shift % 256
                shift += 1
                setup.source.mark_changed()
                await c.request_update(incremental=True)
                await c.next_update()
                await trio.sleep(0.05)
        scaled = c.conn.decode_state.scaled_rects
        # A change below the video area threshold goes at full size.
        setup.source.pixels[:, : W // 4] = _gradient(shift + 50)[:, : W // 4]
        setup.source.mark_changed()
        await c.request_update(incremental=True)
        await c.next_update()
        assert c.conn.decode_state.scaled_rects == scaled
        assert session.encoders.video_scale == 1.0


async def test_frame_rate_pseudo_encoding_caps_this_clients_updates(setup: Setup) -> None:
    """A Kasm client that asks for 10 frames a second gets updates at most
    that often, however fast the desktop changes."""
    async with setup.kasm(encodings=kasm_encodings(frame_rate=10)) as c:
        await c.screenshot()
        session = setup.session()
        assert session.frame_rate == 10

        async def animate() -> None:
            i = 0
            while True:
                setup.source.pixels[0:16, 0:16] = i % 256
                setup.source.mark_changed()
                i += 1
                await trio.sleep(1 / 60)

        count = 0
        async with trio.open_nursery() as n:
            n.start_soon(animate)
            start = trio.current_time()
            with trio.move_on_after(2.0):
                while True:
                    await c.request_update(incremental=True)
                    await c.next_update()
                    count += 1
            elapsed = trio.current_time() - start
            n.cancel_scope.cancel()
    assert 10 * elapsed * 0.6 <= count <= 10 * elapsed + 2


async def test_every_update_is_one_the_web_client_shows(setup: Setup) -> None:
    """KasmVNC's web client draws an update only when it counted more than
    one rect in it, LastRect included: a change that fits in one rect must
    still end with LastRect (as KasmVNC sends every update)."""
    async with setup.kasm() as c:
        await c.screenshot()
        setup.source.pixels[10:20, 10:20] = (0, 0, 255, 0)
        setup.source.mark_changed(Rect(10, 10, 10, 10))  # one small rect: a fill
        single = []
        with trio.fail_after(10):
            while not (c.framebuffer[10:20, 10:20, :3] == (0, 0, 255)).all():
                await c.request_update(incremental=True)
                update = await c.next_update()
                if len(update.pixel_rects) == 1:
                    single.append(update)
        assert single and all(u.last_rect for u in single)
        assert c.unshown_updates == 0

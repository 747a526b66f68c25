"""The whole server with users: VeNCrypt (X509Plain) on the RFB port, RFB over
WebSocket on the HTTPS port, and the developer API against the running server
(frame stats, screenshots, full frames, users changed under open sessions)."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import imagecodecs
import numpy as np
import pytest
import trio
from tls_files import issue
from trio_websocket import open_websocket_url

import trivnc
from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.server import Server
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource, KeyInput
from trivnc.testing.aclient import HandshakeError, VncClient, open_test_client, wrap_stream
from trivnc.testing.images import desktop_like, psnr
from trivnc.testing.websocket import WebSocketByteStream

USERS = {
    "boss": ("boss-secret", "rwo"),
    "typist": ("typist-secret", "rw"),
    "watcher": ("watcher-secret", "r"),
}
W, H = 320, 200


@dataclass
class Setup:
    server: Server
    source: ArraySource
    users: Path
    client_ssl: ssl.SSLContext


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    tls = issue(tmp_path)
    users = tmp_path / "users"
    store = UserStore(users)
    for name, (password, perms) in USERS.items():
        store.create(name, password, read="r" in perms, write="w" in perms, owner="o" in perms)
    source = ArraySource.from_array(desktop_like(W, H, seed=5))
    config = trivnc.Config(
        source=source, rfb_port=0, web_port=0, users_file=users, cert=tls.cert, key=tls.key
    )
    server = await nursery.start(trivnc.serve, config)
    yield Setup(server, source, users, tls.client_context())


def user_client(setup: Setup, name: str, **kw: Any) -> AbstractAsyncContextManager[VncClient]:
    """A VeNCrypt X509Plain client on the RFB port, logged in as `name`."""
    return open_test_client(
        "127.0.0.1",
        setup.server.rfb_port,
        username=name,
        password=USERS[name][0],
        ssl_context=setup.client_ssl,
        **kw,
    )


def basic(name: str) -> str:
    password = USERS[name][0] if name in USERS else "nope"
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


# -- VeNCrypt on the RFB port ---------------------------------------------------------


async def test_vencrypt_x509plain_with_the_users_file(setup: Setup) -> None:
    port = setup.server.rfb_port
    async with user_client(setup, "typist") as c:
        shot = await c.screenshot()
        assert np.array_equal(shot[..., :3], setup.source.pixels[..., :3])
    with pytest.raises(HandshakeError):
        async with open_test_client(
            "127.0.0.1", port, username="typist", password="wrong", ssl_context=setup.client_ssl
        ):
            pass


async def test_read_only_user_cannot_type(setup: Setup) -> None:
    events = setup.source.input_events()
    for name in ("watcher", "typist"):
        async with user_client(setup, name) as c:
            await c.screenshot()
            await c.key(ord("x"))
            await c.pointer(3, 4, 1)
            await c.screenshot()  # the server has read the input by now
    seen = []
    with trio.move_on_after(0.5):
        while True:
            seen.append(await events.receive())
    # Only the writer's input arrived (press, release, pointer, then the
    # release of the button it left pressed).
    assert seen[:2] == [KeyInput(ord("x"), True), KeyInput(ord("x"), False)]
    assert len(seen) == 4


# -- RFB over WebSocket ---------------------------------------------------------------


async def test_rfb_over_websocket(setup: Setup) -> None:
    url = f"wss://127.0.0.1:{setup.server.web_port}/websockify"
    headers = [(b"Authorization", basic("watcher").encode())]
    async with open_websocket_url(
        url,
        ssl_context=setup.client_ssl,
        subprotocols=["binary"],
        extra_headers=headers,
        message_queue_size=64,
    ) as ws:
        assert ws.subprotocol == "binary"
        async with wrap_stream(
            WebSocketByteStream(ws), encodings=[Encoding.TIGHT, Encoding.ZRLE]
        ) as c:
            shot = await c.screenshot()
            assert np.array_equal(shot[..., :3], setup.source.pixels[..., :3])


async def _upgrade_status(setup: Setup, authorization: str | None) -> bytes:
    """The status line the server answers a WebSocket upgrade with."""
    tcp = await trio.open_tcp_stream("127.0.0.1", setup.server.web_port)
    async with trio.SSLStream(tcp, setup.client_ssl, server_hostname="127.0.0.1") as tls:
        request = (
            "GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        )
        if authorization:
            request += f"Authorization: {authorization}\r\n"
        await tls.send_all((request + "\r\n").encode())
        data = b""
        with trio.fail_after(5):
            while b"\r\n" not in data:
                data += await tls.receive_some(1024)
        return data.split(b"\r\n", 1)[0]


async def test_websocket_needs_credentials(setup: Setup) -> None:
    assert b" 401 " in await _upgrade_status(setup, None)
    assert b" 401 " in await _upgrade_status(setup, basic("nobody"))
    assert b" 101 " in await _upgrade_status(setup, basic("watcher"))


# -- the developer API on the running server ------------------------------------------


def api(setup: Setup, user: str = "boss") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{setup.server.web_port}",
        verify=setup.client_ssl,
        headers={"Authorization": basic(user)},
        timeout=20,
    )


async def test_page_and_api_need_the_right_user(setup: Setup) -> None:
    async with api(setup, "nobody") as http:
        assert (await http.get("/")).status_code == 401
        assert (await http.get("/api/get_users")).status_code == 401
    async with api(setup, "watcher") as http:
        assert (await http.get("/")).status_code in (200, 302)
        assert (await http.get("/api/get_users")).status_code == 403


async def test_screenshot_matches_the_screen(setup: Setup) -> None:
    async with api(setup) as http:
        r = await http.get("/api/get_screenshot", params={"quality": 9})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        image = imagecodecs.jpeg8_decode(r.content)
        assert image.shape == (H, W, 3)
        assert psnr(image, np.ascontiguousarray(setup.source.pixels[..., 2::-1])) > 35
        r = await http.get("/api/get_screenshot", params={"width": 160})
        assert imagecodecs.jpeg8_decode(r.content).shape == (100, 160, 3)
        r1 = await http.get("/api/get_screenshot", params={"deduplicate": "true"})
        r2 = await http.get("/api/get_screenshot", params={"deduplicate": "true"})
        assert r1.status_code == 200 and r2.status_code == 204


async def test_frame_and_bottleneck_stats_come_from_sessions(setup: Setup) -> None:
    encodings = [Encoding.RAW, PseudoEncoding.FENCE]
    async with (
        user_client(setup, "typist", encodings=encodings) as c,
        api(setup) as http,
    ):
        await c.screenshot()

        async def keep_requesting() -> None:
            while True:
                await c.request_update(incremental=True)
                await trio.sleep(0.05)

        async with trio.open_nursery() as n:
            n.start_soon(keep_requesting)
            r = await http.get("/api/get_frame_stats", params={"client": "all"})
            n.cancel_scope.cancel()
        assert r.status_code == 200, r.text
        stats = r.json()
        assert stats["frame"]["resx"] == W and stats["frame"]["resy"] == H
        names = {p["process_name"] for p in stats["server_side"]}
        assert {"Screenshot", "Analysis", "Encoding_total", "RawEncoder"} <= names
        (client,) = stats["client_side"]
        assert client["client"].endswith("::tcp") and client["client_time"] > 0
        assert 0 < client["ping"] < 1000
        r = await http.get("/api/get_bottleneck_stats")
        scores = r.json()["typist"]
        (values,) = scores.values()
        assert len(values) == 4 and all(0 <= v <= 10 for v in values)
        assert (await http.get("/api/get_frame_stats")).status_code == 400


async def test_send_full_frame(setup: Setup) -> None:
    async with (
        user_client(setup, "watcher", encodings=[Encoding.RAW]) as c,
        api(setup) as http,
    ):
        await c.screenshot()
        await c.request_update(incremental=True)
        assert (await http.get("/api/send_full_frame")).status_code == 200
        update = await c.next_update()
        assert sum(r.area for r, _ in update.pixel_rects) == W * H


async def test_users_changed_under_open_sessions(setup: Setup) -> None:
    events = setup.source.input_events()
    async with (
        user_client(setup, "typist") as c,
        api(setup) as http,
    ):
        await c.screenshot()
        r = await http.get("/api/update_user", params={"name": "typist", "write": "false"})
        assert r.status_code == 200, r.text
        await c.key(ord("q"))
        await c.screenshot()
        with trio.move_on_after(0.3):
            assert await events.receive() is None  # nothing may arrive
        assert "typist:" in setup.users.read_text() and ":r\n" in setup.users.read_text()
        assert (await http.get("/api/remove_user", params={"name": "typist"})).status_code == 200
        with trio.fail_after(5):
            while True:
                try:
                    await c.request_update(incremental=False)
                    await c.next_update(timeout=0.5)
                except trio.TooSlowError:
                    continue
                except Exception:
                    break  # the connection was closed
    assert "typist" not in setup.users.read_text()
    async with api(setup) as http:
        users = (await http.get("/api/get_users")).json()
        assert {u["user"] for u in users} == {"boss", "watcher"}

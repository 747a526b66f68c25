# KasmVNC's own web client (kasmtech/noVNC, built) in headless Chromium
# against trivnc's web port: it connects, speaks the Kasm dialect, shows the
# desktop and every later change, and answers frame stats.
#
# The client is not packaged anywhere this suite can install it from (it is
# not on npm, and CI has no GitHub), and trivnc does not copy it, so this test
# runs where a built copy is given: TRIVNC_KASM_WEB_ROOT=<kasmtech/noVNC>/dist
# (see docs/pages/kasm.md, "Trying KasmVNC's own web client"). Elsewhere it
# is skipped; tests/test_kasm.py covers the same flow with the Kasm-dialect
# test client, including the client's rule that found a real bug here (an
# update is drawn only after more than one counted rect).
from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import numpy.typing as npt
import pytest
import trio
from test_browser import CHROMIUM, BrowserThread

import trivnc
from trivnc.api.server_backend import ServerBackend
from trivnc.geometry import Rect
from trivnc.rfb.constants import Dialect
from trivnc.server import Server
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource
from trivnc.testing.images import desktop_like, psnr

KASM_ROOT = Path(os.environ.get("TRIVNC_KASM_WEB_ROOT", "/nonexistent"))
W, H = 640, 400
USER = ("kasm", "kasm-password")

pytestmark = [
    pytest.mark.realclient,
    pytest.mark.skipif(
        not (KASM_ROOT / "vnc.html").is_file() or not CHROMIUM.is_file(),
        reason="needs a built kasmtech/noVNC in $TRIVNC_KASM_WEB_ROOT (docs/pages/kasm.md) "
        "and Chromium",
    ),
]


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Server, Path]]:
    store = UserStore(tmp_path / "users")
    store.create(USER[0], USER[1], read=True, write=True, owner=True)
    source = ArraySource.from_array(desktop_like(W, H, seed=3))
    config = trivnc.Config(
        source=source,
        rfb_port=None,
        web_port=0,
        listen=["127.0.0.1"],
        users_file=tmp_path / "users",
        no_tls=True,
        web_root=KASM_ROOT,  # `npm run build` writes vnc.html beside index.html
    )
    yield await nursery.start(trivnc.serve, config), tmp_path


async def test_kasm_web_client_shows_the_desktop_and_its_changes(
    server: tuple[Server, Path],
) -> None:
    srv, tmp_path = server
    source = srv.source
    assert isinstance(source, ArraySource)
    browser = BrowserThread()
    await browser.start()
    try:
        page: Any = None

        def open_page() -> None:
            nonlocal page
            context = browser.browser.new_context(
                http_credentials={"username": USER[0], "password": USER[1]},
                viewport={"width": W + 300, "height": H + 200},
            )
            page = context.new_page()
            page.goto(
                f"http://127.0.0.1:{srv.web_port}/vnc.html"
                "?autoconnect=true&path=websockify&resize=off"
            )

        await browser.call(open_page)

        async def canvas() -> npt.NDArray[np.uint8]:
            # The client draws into the canvas the size of the desktop.
            url = await browser.call(
                lambda: page.evaluate(
                    """([w, h]) => {
                        const c = [...document.querySelectorAll('canvas')]
                            .find(c => c.width === w && c.height === h);
                        return c ? c.toDataURL('image/png') : null;
                    }""",
                    [W, H],
                )
            )
            if url is None:
                return np.zeros((H, W, 3), np.uint8)
            png = base64.b64decode(url.split(",", 1)[1])
            return np.asarray(imagecodecs.png_decode(png))[..., :3]

        def shown() -> npt.NDArray[np.uint8]:
            return source.pixels[..., 2::-1]  # BGRX -> RGB

        with trio.fail_after(30):
            while psnr(await canvas(), shown()) < 35:
                await trio.sleep(0.2)
        (session,) = srv.sessions
        assert session.conn.dialect is Dialect.KASM
        # One small change: a one-rect update, which the client draws only
        # because it ends with LastRect.
        source.pixels[100:130, 200:260] = (0, 0, 255, 0)
        source.mark_changed(Rect(200, 100, 60, 30))
        with trio.fail_after(10):
            while (await canvas())[100:130, 200:260].tolist() != [[[255, 0, 0]] * 60] * 30:
                await trio.sleep(0.1)
        backend = ServerBackend(srv.context, UserStore(tmp_path / "users"))
        source.pixels[0:8, 0:8] = 1
        source.mark_changed(Rect(0, 0, 8, 8))
        stats = await backend.frame_stats("all", USER[0])
        (client,) = stats["client_side"]
        assert client["client_time"] > 0  # from the client's 179 reply
    finally:
        await browser.stop()

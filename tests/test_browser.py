# End to end in a real browser: headless Debian Chromium, driven by
# Playwright for Python (its sync API, with executable_path: no browser
# download), opens the noVNC client that trivnc serves on its HTTPS port, logs
# in with HTTP Basic credentials, and shows the desktop. The canvas screenshot
# is compared with the server's latest frame, and clicks and keys typed in the
# page are looked for on the source's input channel: they arrive for a user
# with write permission and never for a read-only one.
#
# Playwright's sync API runs its own asyncio loop in the thread that starts
# it, and every object it hands out belongs to that thread; trio runs the
# server in the test's nursery. So the browser lives in one dedicated thread
# (a single-worker executor) and the trio side awaits each browser step with
# trio.to_thread.run_sync, keeping the server responsive meanwhile.
from __future__ import annotations

import concurrent.futures
import math
import struct
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import imagecodecs
import numpy as np
import numpy.typing as npt
import pytest
import trio
import trustme

import trivnc
from trivnc.server import Server
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource, InputEvent, KeyInput, PointerInput
from trivnc.sources.demo import DemoSource
from trivnc.testing.images import desktop_like

CHROMIUM = Path("/usr/bin/chromium")
NOVNC = Path("/usr/share/novnc")

pytestmark = [
    pytest.mark.realclient,
    pytest.mark.skipif(
        not CHROMIUM.is_file() or not (NOVNC / "vnc.html").is_file(),
        reason="needs Debian's chromium (/usr/bin/chromium) and novnc (/usr/share/novnc); "
        "CI installs both (apt-get install chromium novnc)",
    ),
]

WIDTH, HEIGHT = 640, 400
WRITER = ("writer", "writer-password")
VIEWER = ("viewer", "viewer-password")
#: Query parameters for 1:1 pixels: no scaling, no remote resize.
PAGE = "/vnc.html?autoconnect=true&path=websockify&resize=off"
#: How Chromium runs here (root, no sandbox, closed network): see the machine notes.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_TIMEOUT = 60.0
MIN_PSNR = 30.0
CLICK_AT = (123, 77)
XK_h, XK_i = 0x68, 0x69

T = TypeVar("T")
Rgb = npt.NDArray[np.uint8]


# -- the browser thread ---------------------------------------------------------------


class BrowserThread:
    """Headless Chromium under Playwright's sync API, confined to one thread.
    `call` runs a function there and awaits its result from trio."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "playwright")
        self._playwright: Any = None
        self.browser: Any = None

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float = STEP_TIMEOUT) -> T:
        future = self._executor.submit(fn, *args)
        return await trio.to_thread.run_sync(future.result, timeout, abandon_on_cancel=True)

    async def start(self) -> None:
        def launch() -> None:
            # Playwright's launch gives Chromium --headless and its own empty
            # --user-data-dir; the rest is what this machine needs.
            # Imported here so that a machine without Chromium skips cleanly;
            # with Chromium and noVNC present a missing Playwright is an error.
            from playwright.sync_api import sync_playwright

            self._playwright = sync_playwright().start()
            self.browser = self._playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )

        await self.call(launch)

    async def stop(self) -> None:
        def close() -> None:
            try:
                if self.browser is not None:
                    self.browser.close()
            finally:
                if self._playwright is not None:
                    self._playwright.stop()

        try:
            await self.call(close, timeout=30)
        finally:
            self._executor.shutdown(wait=False)


@dataclass
class DesktopPage:
    """One browser context and page on trivnc's noVNC, with the RFB messages
    the page sent over its WebSocket (recorded in the browser thread)."""

    browser: BrowserThread
    page: Any = None
    status: int | None = None
    url: str = ""
    canvas: tuple[float, float] = (0.0, 0.0)
    sent: list[bytes] = field(default_factory=list)
    sent_lock: threading.Lock = field(default_factory=threading.Lock)

    async def open(
        self,
        url: str,
        user: tuple[str, str],
        *,
        expect_desktop: bool = True,
        one_to_one: bool = True,
    ) -> None:
        def go() -> None:
            context = self.browser.browser.new_context(
                http_credentials={"username": user[0], "password": user[1]},
                ignore_https_errors=True,  # trustme's CA is not Chromium's
                viewport={"width": WIDTH + 300, "height": HEIGHT + 200},
                device_scale_factor=1,
            )
            self.page = context.new_page()
            self.page.set_default_timeout(STEP_TIMEOUT * 1000 / 2)
            self.page.on("websocket", self._watch)
            response = self.page.goto(url)
            self.status = None if response is None else response.status
            self.url = self.page.url
            if not expect_desktop:
                return
            # Connected: noVNC marks the document and sizes its canvas to the
            # desktop (resize=off: canvas pixels are desktop pixels).
            self.page.wait_for_function(
                """([w, h]) => {
                    const c = document.querySelector('canvas');
                    return document.documentElement.classList.contains('noVNC_connected')
                        && c !== null && c.width === w && c.height === h;
                }""",
                arg=[WIDTH, HEIGHT],
            )
            if not one_to_one:
                return
            box = self.page.locator("canvas").bounding_box()
            assert box is not None
            assert (box["width"], box["height"]) == (WIDTH, HEIGHT)
            self.canvas = (box["x"], box["y"])

        await self.browser.call(go)

    def _watch(self, ws: Any) -> None:
        def sent(payload: bytes | str) -> None:
            if isinstance(payload, bytes):
                with self.sent_lock:
                    self.sent.append(payload)

        ws.on("framesent", sent)

    async def canvas_rgb(self) -> Rgb:
        """A screenshot of the canvas element as (HEIGHT, WIDTH, 3) RGB."""
        png = await self.browser.call(lambda: self.page.locator("canvas").screenshot())
        image = np.asarray(imagecodecs.png_decode(png))
        return np.ascontiguousarray(image[..., :3])

    async def evaluate(self, script: str) -> Any:
        return await self.browser.call(lambda: self.page.evaluate(script))

    async def click(self, x: int, y: int) -> None:
        left, top = self.canvas
        await self.browser.call(lambda: self.page.mouse.click(left + x, top + y))

    async def type(self, text: str) -> None:
        await self.browser.call(lambda: self.page.keyboard.type(text))

    async def pump(self, ms: int = 50) -> None:
        """Let Playwright deliver pending events: its sync API dispatches them
        (framesent here) only while a call of it runs in the browser thread."""
        await self.browser.call(lambda: self.page.wait_for_timeout(ms))

    def sent_keys(self) -> list[tuple[int, bool]]:
        """(keysym, down) of every key event the page sent: RFB KeyEvent, or
        QEMU's extended key event, which noVNC prefers when the server offers it."""
        keys = [(keysym, bool(down)) for down, keysym in self._messages(4, "!xB2xI")]
        keys += [
            (keysym, bool(down))
            for sub, down, keysym, _keycode in self._messages(255, "!xBHII")
            if sub == 0
        ]
        return keys

    def sent_pointer(self) -> list[tuple[int, int, int]]:
        """(x, y, buttons) of every RFB PointerEvent the page sent."""
        return [(x, y, buttons) for buttons, x, y in self._messages(5, "!xBHH")]

    def _messages(self, kind: int, fmt: str) -> list[tuple[int, ...]]:
        # noVNC flushes each input event as its own WebSocket message (after
        # the handshake); messages of other sizes are something else.
        size = struct.calcsize(fmt)
        with self.sent_lock:
            return [struct.unpack(fmt, m) for m in self.sent if len(m) == size and m[0] == kind]


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    issued = trustme.CA().issue_cert("127.0.0.1")
    cert, key = where / "cert.pem", where / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    store = UserStore(path)
    store.create(*WRITER, read=True, write=True, owner=False)
    store.create(*VIEWER, read=True, write=False, owner=False)
    return path


async def serve(
    nursery: trio.Nursery, source: trivnc.Source, users: Path, certificate: tuple[Path, Path]
) -> Server:
    config = trivnc.Config(
        source=source,
        rfb_port=None,
        web_port=0,
        users_file=users,
        cert=certificate[0],
        key=certificate[1],
    )
    server: Server = await nursery.start(trivnc.serve, config)
    return server


@pytest.fixture
async def array_desktop(
    nursery: trio.Nursery, users_file: Path, certificate: tuple[Path, Path]
) -> AsyncIterator[tuple[Server, ArraySource, trio.MemoryReceiveChannel[InputEvent]]]:
    source = ArraySource.from_array(desktop_like(WIDTH, HEIGHT, seed=5), name="browser")
    events = source.input_events()  # queued from now on
    server = await serve(nursery, source, users_file, certificate)
    yield server, source, events
    server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[BrowserThread]:
    thread = BrowserThread()
    try:
        with trio.fail_after(STEP_TIMEOUT):
            await thread.start()
        yield thread
    finally:
        with trio.move_on_after(30):
            await thread.stop()


# -- helpers --------------------------------------------------------------------------


def url(server: Server, path: str = PAGE) -> str:
    return f"https://127.0.0.1:{server.web_port}{path}"


def latest_rgb(server: Server) -> Rgb:
    frame = server.service.latest
    assert frame is not None
    return np.ascontiguousarray(frame.pixels[..., 2::-1])


def psnr(a: Rgb, b: Rgb) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


async def shows_framebuffer(page: DesktopPage, server: Server, timeout: float = 20.0) -> float:
    """Wait until the canvas matches the server's latest frame; its PSNR."""
    best = -math.inf
    with trio.move_on_after(timeout):
        while True:
            best = psnr(await page.canvas_rgb(), latest_rgb(server))
            if best > MIN_PSNR:
                return best
            await trio.sleep(0.2)
    pytest.fail(f"the canvas never matched the framebuffer: PSNR {best:.1f} dB")


async def drain(
    events: trio.MemoryReceiveChannel[InputEvent], until: Callable[[list[InputEvent]], bool]
) -> list[InputEvent]:
    got: list[InputEvent] = []
    with trio.move_on_after(10):
        while not until(got):
            got.append(await events.receive())
    return got


def web_sessions(server: Server) -> list[tuple[str | None, str, bool]]:
    return [(s.username, s.transport, s.can_write) for s in server.sessions]


# -- tests ----------------------------------------------------------------------------


async def test_writer_sees_desktop_and_input_reaches_it(
    array_desktop: tuple[Server, ArraySource, trio.MemoryReceiveChannel[InputEvent]],
    browser: BrowserThread,
) -> None:
    server, _source, events = array_desktop
    page = DesktopPage(browser)
    await page.open(url(server), WRITER)
    assert page.status == 200
    # The WebSocket upgrade carried the Basic credentials: /websockify admits
    # nobody without them, and the session is the HTTP user's.
    assert web_sessions(server) == [("writer", "websocket", True)]
    assert await shows_framebuffer(page, server) > MIN_PSNR

    x, y = CLICK_AT
    await page.click(x, y)
    await page.type("hi")

    def complete(got: list[InputEvent]) -> bool:
        keys = [e for e in got if isinstance(e, KeyInput)]
        return KeyInput(XK_i, False) in keys

    got = await drain(events, complete)
    pointer = [e for e in got if isinstance(e, PointerInput)]
    keys = [e for e in got if isinstance(e, KeyInput)]
    assert PointerInput(x, y, 1) in pointer, got
    assert PointerInput(x, y, 0) in pointer[pointer.index(PointerInput(x, y, 1)) :], got
    assert keys == [
        KeyInput(XK_h, True),
        KeyInput(XK_h, False),
        KeyInput(XK_i, True),
        KeyInput(XK_i, False),
    ], got


async def test_viewer_sees_desktop_but_input_never_arrives(
    array_desktop: tuple[Server, ArraySource, trio.MemoryReceiveChannel[InputEvent]],
    browser: BrowserThread,
) -> None:
    server, _source, events = array_desktop
    page = DesktopPage(browser)
    await page.open(url(server), VIEWER)
    assert page.status == 200
    assert web_sessions(server) == [("viewer", "websocket", False)]
    assert await shows_framebuffer(page, server) > MIN_PSNR

    x, y = CLICK_AT
    await page.click(x, y)
    await page.type("hi")
    # noVNC did send them (so the silence below is the server's doing)...
    with trio.move_on_after(10):
        while (XK_i, False) not in page.sent_keys():
            await page.pump()
    assert (XK_i, False) in page.sent_keys(), [m.hex() for m in page.sent]
    assert (x, y, 1) in page.sent_pointer(), [m.hex() for m in page.sent]
    # ...and none reaches the desktop.
    await trio.sleep(2)
    with pytest.raises(trio.WouldBlock):
        event = events.receive_nowait()
        pytest.fail(f"a read-only user's input reached the desktop: {event}")
    assert web_sessions(server) == [("viewer", "websocket", False)]


async def test_root_page_opens_the_connected_client(
    array_desktop: tuple[Server, ArraySource, trio.MemoryReceiveChannel[InputEvent]],
    browser: BrowserThread,
) -> None:
    # What a user types: the bare address. It redirects to noVNC, scaled to
    # the window, connecting back to /websockify.
    server, _source, _events = array_desktop
    page = DesktopPage(browser)
    await page.open(url(server, "/"), WRITER, one_to_one=False)
    assert page.status == 200
    assert page.url == url(server, "/vnc.html?autoconnect=true&resize=scale&path=websockify")
    assert web_sessions(server) == [("writer", "websocket", True)]


async def test_wrong_password_gets_401_and_no_desktop(
    array_desktop: tuple[Server, ArraySource, trio.MemoryReceiveChannel[InputEvent]],
    browser: BrowserThread,
) -> None:
    server, _source, _events = array_desktop
    page = DesktopPage(browser)
    await page.open(url(server), (WRITER[0], "not-the-password"), expect_desktop=False)
    assert page.status == 401
    assert await page.evaluate("document.querySelectorAll('canvas').length") == 0
    assert page.sent == []
    assert server.sessions == set()


async def test_demo_desktop_shows_and_typing_draws_on_it(
    nursery: trio.Nursery,
    users_file: Path,
    certificate: tuple[Path, Path],
    browser: BrowserThread,
) -> None:
    # The built-in demo desktop, still (nothing animates but typed text).
    source = DemoSource(WIDTH, HEIGHT, animate=False, font="builtin", wall_clock=lambda: 0.0)
    server = await serve(nursery, source, users_file, certificate)
    page = DesktopPage(browser)
    await page.open(url(server), WRITER)
    await shows_framebuffer(page, server)
    before = latest_rgb(server)

    await page.click(WIDTH // 2, HEIGHT // 2)
    await page.type("hi")
    with trio.fail_after(10):
        while np.array_equal(latest_rgb(server), before):
            await trio.sleep(0.05)
    # The typed text is on the desktop, and the browser shows the new frame:
    # in the changed area the canvas matches it, not the frame before.
    await trio.sleep(0.5)
    changed = latest_rgb(server)
    assert await shows_framebuffer(page, server) > MIN_PSNR
    rows, cols = np.nonzero(np.any(changed != before, axis=2))
    area = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    canvas = await page.canvas_rgb()
    assert psnr(canvas[area], changed[area]) > MIN_PSNR
    assert psnr(canvas[area], before[area]) < psnr(canvas[area], changed[area]) - 10
    server.stop()

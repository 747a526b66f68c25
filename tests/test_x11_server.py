"""trivnc sharing a real X display (its own Xvfb, -noreset), seen and driven
from the viewer's side: pixels exactly, input through vncdotool into a test
window, the clipboard both ways against xclip, resizing, and an idle desktop
that costs no bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from Xlib import XK, X, display

import trivnc
from trivnc.rfb.constants import ClipboardFlags, Encoding, PseudoEncoding
from trivnc.server import Server
from trivnc.sources.x11 import X11Source
from trivnc.testing.aclient import VncClient, open_test_client
from trivnc.testing.client import ClipboardNotify, ClipboardProvide, ExtendedDesktopSize
from trivnc.testing.images import desktop_like, psnr
from trivnc.testing.xvfb import Xvfb

pytestmark = [
    pytest.mark.xvfb,
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed"),
]
W, H = 640, 480


def put_image(d: Any, drawable: Any, bgrx: np.ndarray, x: int = 0, y: int = 0) -> None:
    """Draw BGRX pixels exactly, in strips under the core request size limit."""
    gc = drawable.create_gc()
    h, w = bgrx.shape[:2]
    rows = max(1, 200_000 // (w * 4))
    for top in range(0, h, rows):
        strip = np.ascontiguousarray(bgrx[top : top + rows])
        drawable.put_image(gc, x, y + top, w, strip.shape[0], X.ZPixmap, 24, 0, strip.tobytes())
    gc.free()
    d.sync()


@pytest.fixture
def xvfb() -> Iterator[Xvfb]:
    with Xvfb(W, H) as x:
        yield x


@pytest.fixture
def painter(xvfb: Xvfb) -> Iterator[Any]:
    d = display.Display(xvfb.display)
    yield d
    d.close()


@pytest.fixture
async def server(nursery: trio.Nursery, xvfb: Xvfb) -> AsyncIterator[Server]:
    config = trivnc.Config(source=X11Source(xvfb.display), rfb_port=0, insecure_no_auth=True)
    yield await nursery.start(trivnc.serve, config)


async def converge(c: VncClient, xvfb: Xvfb) -> None:
    """Request incremental updates until the client shows the X screen."""
    expected = xvfb.screenshot()[..., :3]
    with trio.fail_after(10):
        while not np.array_equal(c.framebuffer[..., :3], expected):
            await c.request_update(incremental=True)
            await c.next_update()


@pytest.mark.parametrize(
    "encodings",
    [[Encoding.RAW], [Encoding.ZRLE], [Encoding.HEXTILE], [Encoding.TIGHT]],
    ids=["raw", "zrle", "hextile", "tight-lossless"],
)
async def test_known_image_comes_back_exactly(
    server: Server, xvfb: Xvfb, painter: Any, encodings: list[int]
) -> None:
    picture = desktop_like(W, H, seed=11)
    put_image(painter, painter.screen().root, picture)
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=encodings) as c:
        await converge(c, xvfb)
        assert np.array_equal(c.framebuffer[..., :3], picture[..., :3])
        # Draw again: the incremental update carries exactly the new pixels.
        patch = desktop_like(100, 80, seed=12)
        put_image(painter, painter.screen().root, patch, 300, 200)
        await converge(c, xvfb)
        assert np.array_equal(c.framebuffer[200:280, 300:400, :3], patch[..., :3])


async def test_tight_jpeg_quality_8(server: Server, xvfb: Xvfb, painter: Any) -> None:
    picture = desktop_like(W, H, seed=13)
    put_image(painter, painter.screen().root, picture)
    async with open_test_client(
        "127.0.0.1", server.rfb_port, encodings=[Encoding.TIGHT, -32 + 8]
    ) as c:
        with trio.fail_after(10):
            while True:
                shot = await c.screenshot()
                if psnr(shot[..., :3], picture[..., :3]) > 30:
                    break
                await trio.sleep(0.1)


def _test_window(d: Any) -> Any:
    root = d.screen().root
    window = root.create_window(
        50,
        50,
        400,
        300,
        0,
        X.CopyFromParent,
        background_pixel=0xFFFFFF,
        event_mask=X.KeyPressMask
        | X.KeyReleaseMask
        | X.ButtonPressMask
        | X.ButtonReleaseMask
        | X.PointerMotionMask,
    )
    window.map()
    d.sync()
    window.set_input_focus(X.RevertToParent, X.CurrentTime)
    d.sync()
    return window


def _drain(d: Any) -> list[Any]:
    events = []
    d.sync()
    while d.pending_events():
        events.append(d.next_event())
    return events


async def test_vncdotool_points_clicks_and_types_into_a_window(
    server: Server, xvfb: Xvfb, painter: Any
) -> None:
    window = _test_window(painter)
    vncdo = shutil.which("vncdo") or str(Path(sys.executable).parent / "vncdo")
    result = await trio.run_process(
        [
            vncdo,
            "-s",
            f"127.0.0.1::{server.rfb_port}",
            "move",
            "150",
            "160",
            "click",
            "1",
            "type",
            "Hi!",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    await trio.sleep(0.3)
    events = _drain(painter)
    pointer = painter.screen().root.query_pointer()
    assert (pointer.root_x, pointer.root_y) == (150, 160)
    presses = [e for e in events if e.type == X.ButtonPress]
    assert (
        presses
        and presses[0].detail == 1
        and (presses[0].event_x, presses[0].event_y) == (100, 110)
    )
    typed = []
    for e in events:
        if e.type == X.KeyPress:
            shifted = bool(e.state & X.ShiftMask)
            keysym = painter.keycode_to_keysym(e.detail, 1 if shifted else 0)
            if keysym not in (XK.XK_Shift_L, XK.XK_Shift_R):
                typed.append(chr(keysym))
    assert "".join(typed) == "Hi!"
    assert window is not None


async def test_clipboard_both_ways_with_xclip(server: Server, xvfb: Xvfb) -> None:
    if shutil.which("xclip") is None:
        pytest.fail("xclip is not installed (Debian package xclip)")
    env = {**xvfb.env(), "LC_ALL": "C.UTF-8"}
    encodings = [Encoding.RAW, PseudoEncoding.EXTENDED_CLIPBOARD]
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=encodings) as c:
        await c.screenshot()
        # Viewer -> X selection.
        await c.cut_text("from the viewer ✓")
        with trio.fail_after(5):
            while True:
                out = await trio.run_process(
                    ["xclip", "-o", "-selection", "clipboard"],
                    env=env,
                    capture_stdout=True,
                    check=False,
                )
                if out.stdout.decode() == "from the viewer ✓":
                    break
                await trio.sleep(0.1)
        # X selection -> viewer. xclip stays in the foreground serving the
        # selection until something else takes it; stop it by PID afterwards.
        proc = subprocess.Popen(
            ["xclip", "-quiet", "-selection", "clipboard"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None
        proc.stdin.write("from X ✓".encode())
        proc.stdin.close()
        try:
            await c.wait_for(ClipboardNotify, timeout=5)
            await c.send(c.conn.clipboard_request(ClipboardFlags.TEXT))
            provide = await c.wait_for(ClipboardProvide, timeout=5)
            assert provide.text == "from X ✓"
        finally:
            proc.terminate()
            proc.wait(5)


async def test_resize_through_set_desktop_size(server: Server, xvfb: Xvfb) -> None:
    async with open_test_client("127.0.0.1", server.rfb_port) as c:
        await c.screenshot()
        (screen,) = c.conn.screens
        await c.send(c.conn.set_desktop_size(320, 240, [screen._replace(width=320, height=240)]))
        reply = await c.wait_for(ExtendedDesktopSize, timeout=10, predicate=lambda e: e.reason == 1)
        assert reply.status == 0 and (reply.width, reply.height) == (320, 240)
        shot = await c.screenshot()
        assert shot.shape[:2] == (240, 320)
        assert np.array_equal(shot[..., :3], xvfb.screenshot()[..., :3])


async def test_an_idle_desktop_sends_nothing(server: Server, xvfb: Xvfb) -> None:
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=[Encoding.TIGHT]) as c:
        await c.screenshot()
        await converge(c, xvfb)
        (session,) = server.sessions
        sent = session.stats.bytes_sent
        version = server.service.latest.version if server.service.latest else 0
        await c.request_update(incremental=True)
        await trio.sleep(5)
        assert session.stats.bytes_sent == sent
        assert server.service.latest is not None and server.service.latest.version == version


async def test_tigervnc_viewer_points_clicks_and_types_into_a_window(
    server: Server, xvfb: Xvfb, painter: Any, tmp_path: Path
) -> None:
    for program in ("xtigervncviewer", "xdotool"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is not installed; run tests/system-deps.sh")
    _test_window(painter)
    with Xvfb(W, H) as viewer_screen, (tmp_path / "viewer.log").open("wb") as log:
        viewer = subprocess.Popen(
            [
                "xtigervncviewer",
                "-FullScreen",
                "-SecurityTypes=None",
                "-Shared=1",
                f"127.0.0.1::{server.rfb_port}",
            ],
            env=viewer_screen.env(),
            stdout=log,
            stderr=log,
        )
        try:
            # Wait until the viewer shows the desktop (the white test window).
            with trio.fail_after(20):
                while not (viewer_screen.screenshot()[200, 200, :3] == 255).all():
                    await trio.sleep(0.2)
            _drain(painter)
            xdotool = ["xdotool", "mousemove", "170", "180", "click", "1", "type", "ok"]
            await trio.run_process(xdotool, env=viewer_screen.env(), capture_stdout=True)
            typed: list[str] = []
            presses: list[Any] = []
            with trio.move_on_after(5):
                while "".join(typed) != "ok" or not presses:
                    await trio.sleep(0.1)
                    for e in _drain(painter):
                        if e.type == X.ButtonPress:
                            presses.append(e)
                        elif e.type == X.KeyPress:
                            typed.append(chr(painter.keycode_to_keysym(e.detail, 0)))
            assert "".join(typed) == "ok"
            assert presses[0].detail == 1
            assert (presses[0].event_x, presses[0].event_y) == (120, 130)
        finally:
            viewer.terminate()
            viewer.wait(5)

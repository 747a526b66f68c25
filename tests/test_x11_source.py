"""The X11 source against a real Xvfb: capture (MIT-SHM and the fallbacks),
XDamage, RandR in both directions, the X server going away, serving the
desktop to a VNC client, and the Xvfb launcher."""

from __future__ import annotations

import shutil
import subprocess
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import trio
from Xlib import X, display

import trivnc
from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding
from trivnc.sources.base import CursorImage, Damage
from trivnc.sources.x11 import X11Source, XvfbDesktop, XvfbError
from trivnc.sources.x11.shm import ShmCapture, XGetImageCapture, XlibCapture, open_capture
from trivnc.sources.x11.source import _plan_grabs
from trivnc.testing.aclient import open_test_client
from trivnc.testing.xvfb import Xvfb

needs_xvfb = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")


class Painter:
    """A python-xlib client that draws known colours. Windows vanish with
    their client, so it stays connected for the whole test."""

    def __init__(self, name: str) -> None:
        self.d = display.Display(name)
        self.root = self.d.screen().root

    def window(self, rect: Rect, rgb: int) -> Any:
        w = self.root.create_window(
            rect.x, rect.y, rect.w, rect.h, 0, X.CopyFromParent, background_pixel=rgb
        )
        w.map()
        self.d.sync()
        return w

    def fill(self, drawable: Any, rect: Rect, rgb: int) -> None:
        gc = drawable.create_gc(foreground=rgb)
        drawable.fill_rectangle(gc, rect.x, rect.y, rect.w, rect.h)
        gc.free()
        self.d.sync()

    def scatter(self, count: int, seed: int = 7) -> None:
        """`count` rects of random colours on the root window."""
        rng = np.random.default_rng(seed)
        geometry = self.root.get_geometry()
        for _ in range(count):
            w, h = (int(v) for v in rng.integers(1, 80, 2))
            x = int(rng.integers(0, geometry.width - 1))
            y = int(rng.integers(0, geometry.height - 1))
            self.fill(self.root, Rect(x, y, w, h), int(rng.integers(0, 1 << 24)))

    def close(self) -> None:
        self.d.close()


class Listener:
    def __init__(self) -> None:
        self.ended: list[str] = []
        self.got_end = trio.Event()

    def clipboard_changed(self, text: str) -> None:
        pass

    def cursor_changed(self, cursor: CursorImage) -> None:
        pass

    def bell(self) -> None:
        pass

    def source_ended(self, reason: str) -> None:
        self.ended.append(reason)
        self.got_end.set()


@pytest.fixture
def xvfb() -> Iterator[Xvfb]:
    with Xvfb(640, 480) as x:
        yield x


@pytest.fixture
def painter(xvfb: Xvfb) -> Iterator[Painter]:
    p = Painter(xvfb.display)
    yield p
    p.close()


def xrandr(display_name: str, *args: str) -> None:
    subprocess.run(["xrandr", "-d", display_name, *args], check=True, capture_output=True)


async def damage_covering(source: X11Source, rect: Rect, timeout: float = 3.0) -> list[Damage]:
    """Damage hints until one is full or one of their rects contains `rect`."""
    seen: list[Damage] = []
    with trio.fail_after(timeout):
        while True:
            damage = await source.wait_damage()
            seen.append(damage)
            if damage.full or any(r.intersect(rect) == rect for r in damage.rects):
                return seen


# -- no X server needed -----------------------------------------------------------


def test_plan_grabs_prefers_one_box_for_many_small_rects() -> None:
    near = [Rect(10 * i, 0, 8, 8) for i in range(10)]
    assert _plan_grabs(near) == [Rect(0, 0, 98, 8)]
    far = [Rect(0, 0, 300, 300), Rect(1500, 900, 300, 300)]
    assert _plan_grabs(far) == far
    assert _plan_grabs([Rect(1, 2, 3, 4)]) == [Rect(1, 2, 3, 4)]


# -- capture ----------------------------------------------------------------------------


@needs_xvfb
@pytest.mark.xvfb
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "xgetimage"])
def test_capture_equals_what_was_drawn(xvfb: Xvfb, painter: Painter, use_shm: bool) -> None:
    window = painter.window(Rect(100, 50, 200, 150), 0x3366CC)
    painter.fill(window, Rect(10, 20, 30, 40), 0xFF8000)
    painter.fill(painter.root, Rect(400, 300, 60, 70), 0x00FF00)
    source = X11Source(xvfb.display, use_shm=use_shm)
    assert source.capture_method == ("shm" if use_shm else "xgetimage")
    assert source.size == (640, 480)
    frame = source.capture(Damage(full=True))
    source.close()
    assert np.array_equal(source.capture(Damage(full=True)), frame)  # closed: the last frame
    assert frame.shape == (480, 640, 4)
    assert np.array_equal(frame, xvfb.screenshot())
    # BGRX: the window's 0x3366CC is blue CC, green 66, red 33.
    assert tuple(frame[60, 105, :3]) == (0xCC, 0x66, 0x33)
    assert tuple(frame[75, 115, :3]) == (0x00, 0x80, 0xFF)


@needs_xvfb
@pytest.mark.xvfb
def test_shm_and_fallbacks_give_identical_pixels(xvfb: Xvfb, painter: Painter) -> None:
    painter.scatter(300)
    shot = xvfb.screenshot()
    captures = [ShmCapture(xvfb.display), XGetImageCapture(xvfb.display), XlibCapture(xvfb.display)]
    try:
        frames = [c.capture_screen() for c in captures]
        for frame in frames:
            assert np.array_equal(frame, shot)
        # Rects at every edge, of odd sizes, through each backend.
        for rect in (
            Rect(0, 0, 1, 1),
            Rect(639, 479, 1, 1),
            Rect(3, 470, 637, 10),
            Rect(37, 11, 13, 457),
        ):
            outs = []
            for c in captures:
                out = np.zeros_like(shot)
                c.grab(rect, out)
                outs.append(out)
                assert np.array_equal(out[rect.slices()], shot[rect.slices()])
            assert all(np.array_equal(outs[0], o) for o in outs[1:])
    finally:
        for c in captures:
            c.close()


@needs_xvfb
@pytest.mark.xvfb
def test_open_capture_falls_back_without_shm(xvfb: Xvfb) -> None:
    capture = open_capture(xvfb.display, use_shm=False)
    try:
        assert capture.method == "xgetimage"
    finally:
        capture.close()


# -- damage -------------------------------------------------------------------------------


@needs_xvfb
@pytest.mark.xvfb
async def test_damage_reports_drawing_and_partial_capture_follows(
    xvfb: Xvfb, painter: Painter, nursery: trio.Nursery
) -> None:
    window = painter.window(Rect(100, 100, 300, 200), 0x202020)
    source = X11Source(xvfb.display)
    nursery.start_soon(source.run)
    first = await source.wait_damage()
    assert first.full
    before = await trio.to_thread.run_sync(source.capture, first)
    before_copy = before.copy()

    painter.fill(window, Rect(50, 40, 30, 20), 0xFF0000)
    drawn = Rect(150, 140, 30, 20)  # in root coordinates
    seen = await damage_covering(source, drawn)
    assert not any(d.full for d in seen)  # a precise hint, not "everything"
    after = await trio.to_thread.run_sync(source.capture, seen[-1])
    assert np.array_equal(after, xvfb.screenshot())
    assert tuple(after[145, 155, :3]) == (0, 0, 0xFF)
    # Frames once returned are never written again.
    assert np.array_equal(before, before_copy)
    assert after is not before

    # An idle desktop is quiet.
    with trio.move_on_after(0.5):
        extra = await source.wait_damage()
        pytest.fail(f"damage on an idle desktop: {extra}")


@needs_xvfb
@pytest.mark.xvfb
async def test_damage_from_many_scattered_draws_is_captured_exactly(
    xvfb: Xvfb, painter: Painter, nursery: trio.Nursery
) -> None:
    source = X11Source(xvfb.display)
    nursery.start_soon(source.run)
    frame = await trio.to_thread.run_sync(source.capture, await source.wait_damage())
    painter.scatter(60, seed=11)
    # Capture whatever the hints say until the picture is the screen's.
    with trio.fail_after(5):
        while not np.array_equal(frame, xvfb.screenshot()):
            frame = await trio.to_thread.run_sync(source.capture, await source.wait_damage())


# -- RandR ---------------------------------------------------------------------------------


@needs_xvfb
@pytest.mark.xvfb
async def test_resize_by_another_client_updates_size(
    xvfb: Xvfb, painter: Painter, nursery: trio.Nursery
) -> None:
    source = X11Source(xvfb.display)
    nursery.start_soon(source.run)
    assert (await source.wait_damage()).full
    xrandr(
        xvfb.display,
        "--newmode",
        "t400",
        "30",
        "400",
        "400",
        "400",
        "400",
        "300",
        "300",
        "300",
        "300",
    )
    xrandr(xvfb.display, "--addmode", "screen", "t400")
    xrandr(xvfb.display, "--output", "screen", "--mode", "t400")
    with trio.fail_after(3):
        damage = await source.wait_damage()
    assert damage.full
    assert source.size == (400, 300)
    frame = await trio.to_thread.run_sync(source.capture, damage)
    assert frame.shape == (300, 400, 4)
    assert np.array_equal(frame, xvfb.screenshot())


@needs_xvfb
@pytest.mark.xvfb
async def test_set_size_shrinks_and_refuses_to_outgrow_xvfb(
    xvfb: Xvfb, painter: Painter, nursery: trio.Nursery
) -> None:
    source = X11Source(xvfb.display)
    assert not await source.set_size(320, 200)  # not running yet: no X connection
    nursery.start_soon(source.run)
    assert (await source.wait_damage()).full
    assert await source.set_size(320, 200)
    assert source.size == (320, 200)
    assert xvfb.screenshot().shape == (200, 320, 4)
    with trio.fail_after(3):
        assert (await source.wait_damage()).full
    frame = await trio.to_thread.run_sync(source.capture, Damage(full=True))
    assert frame.shape == (200, 320, 4)
    # Back up to the -screen size works; beyond it Xvfb cannot go.
    assert await source.set_size(640, 480)
    assert not await source.set_size(1024, 768)
    assert source.size == (640, 480)
    # The event loop still runs after our own round trips (it was woken).
    painter.fill(painter.root, Rect(5, 5, 10, 10), 0xFFFFFF)
    await damage_covering(source, Rect(5, 5, 10, 10))


# -- the X server going away -------------------------------------------------------------


@needs_xvfb
@pytest.mark.xvfb
@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "xgetimage"])
async def test_x_server_exit_ends_run_cleanly(xvfb: Xvfb, use_shm: bool) -> None:
    source = X11Source(xvfb.display, use_shm=use_shm)
    listener = Listener()
    source.listener = listener
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        last = await trio.to_thread.run_sync(source.capture, await source.wait_damage())
        await trio.to_thread.run_sync(xvfb.stop)
        with trio.fail_after(5):
            await listener.got_end.wait()
    # run() returned by itself (the nursery closed without a cancel) and said why.
    assert listener.ended == [f"X server {xvfb.display} went away"]
    # Capturing now neither raises nor kills the process (libX11 would exit()).
    frame = await trio.to_thread.run_sync(source.capture, Damage(full=True))
    assert np.array_equal(frame, last)
    await source.key_event(0x61, True)  # input to a dead desktop is dropped quietly
    assert not await source.set_size(100, 100)


# -- served to a VNC client ---------------------------------------------------------------


@needs_xvfb
@pytest.mark.xvfb
async def test_serve_x11_desktop_exactly(
    xvfb: Xvfb, painter: Painter, nursery: trio.Nursery
) -> None:
    painter.scatter(120, seed=3)
    window = painter.window(Rect(200, 100, 240, 160), 0x4080C0)
    source = X11Source(xvfb.display)
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True)
    server = await nursery.start(trivnc.serve, config)
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=[Encoding.ZRLE]) as c:
        shot = await c.screenshot()
        assert shot.shape == (480, 640, 4)
        assert np.array_equal(shot[..., :3], xvfb.screenshot()[..., :3])
        # A change on the X desktop reaches the viewer.
        painter.fill(window, Rect(20, 20, 50, 50), 0xFFFF00)
        expected = xvfb.screenshot()[..., :3]
        with trio.fail_after(5):
            while not np.array_equal(c.framebuffer[..., :3], expected):
                await c.request_update(incremental=True)
                await c.next_update()


# -- the Xvfb launcher ------------------------------------------------------------------------


@needs_xvfb
@pytest.mark.xvfb
async def test_xvfb_desktop_runs_command_and_resizes_up_to_its_maximum() -> None:
    async with XvfbDesktop(320, 240, ["sleep", "60"], max_size=(1280, 1024)) as desktop:
        assert desktop.display.startswith(":")
        assert desktop.xvfb is not None and desktop.process is not None
        source = X11Source(desktop.display)
        assert source.size == (320, 240)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            await source.wait_damage()
            assert await source.set_size(1024, 768)  # larger than it started
            assert not await source.set_size(1600, 1200)  # beyond -screen
            nursery.cancel_scope.cancel()
        assert not desktop.ended.is_set()
    assert desktop.ended.is_set()
    assert desktop.xvfb.returncode is not None
    assert desktop.process.returncode is not None


@needs_xvfb
@pytest.mark.xvfb
async def test_xvfb_desktop_ends_when_its_command_exits(nursery: trio.Nursery) -> None:
    desktop = XvfbDesktop(200, 100, ["sh", "-c", 'test -n "$DISPLAY" && exit 3'])
    with trio.fail_after(20):
        started = await nursery.start(desktop.run)
        assert started is desktop
        await desktop.ended.wait()
    assert desktop.returncode == 3
    assert "exited with status 3" in desktop.end_reason
    with trio.fail_after(10):
        assert desktop.xvfb is not None
        await desktop.xvfb.wait()  # run() stopped Xvfb too


@needs_xvfb
@pytest.mark.xvfb
async def test_xvfb_desktop_reports_a_failed_start() -> None:
    with pytest.raises(XvfbError):
        async with XvfbDesktop(64, 64, depth=7):
            pass  # pragma: no cover


def test_recycled_frame_buffers_are_current_and_never_touch_held_frames() -> None:
    """FrameBuffers against a model: every frame equals the screen at its
    time, and frames still held by someone are never written again."""
    from trivnc.sources.x11.source import FrameBuffers

    rng = np.random.default_rng(21)
    h, w = 90, 120
    truth = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    buffers = FrameBuffers()
    prev = truth.copy()
    buffers.reset(prev)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    returned: list[weakref.ref[np.ndarray]] = []
    reused = 0
    for _ in range(300):
        damage = []
        for _ in range(int(rng.integers(1, 4))):
            x, y = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
            rect = Rect(x, y, int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1)))
            truth[rect.slices()] = rng.integers(0, 256, (rect.h, rect.w, 4), dtype=np.uint8)
            damage.append(rect)
        frame = buffers.take(prev, damage)
        reused += any(ref() is frame for ref in returned)
        returned.append(weakref.ref(frame))
        for rect in damage:  # what the X grab does
            frame[rect.slices()] = truth[rect.slices()]
        frame.flags.writeable = False  # as the framebuffer service does
        assert np.array_equal(frame, truth)
        for kept, copy in held:
            assert np.array_equal(kept, copy)
        if rng.random() < 0.3:
            held.append((frame, frame.copy()))
        if held and rng.random() < 0.3:
            held.pop(0)
        prev = frame
    assert reused > 100  # buffers were recycled, not copied afresh each time

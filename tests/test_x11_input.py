"""X11Input, X11Clipboard and X11Cursor against a real Xvfb: a test window of
our own receives the injected input; xclip is the other clipboard client."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
from Xlib import XK, X
from Xlib import display as xdisplay

from trivnc.sources.base import CursorImage
from trivnc.sources.x11.clipboard import X11Clipboard
from trivnc.sources.x11.cursor import X11Cursor
from trivnc.sources.x11.input import X11Input
from trivnc.testing.xvfb import Xvfb

pytestmark = [
    pytest.mark.xvfb,
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb"),
]

WIDTH, HEIGHT = 640, 480
ISO_LEVEL3_SHIFT = 0xFE03  # AltGr; not among python-xlib's default keysym names


@pytest.fixture
def xvfb() -> Iterator[Xvfb]:
    with Xvfb(WIDTH, HEIGHT) as server:
        yield server


class InputWindow:
    """A focused full-screen window on its own connection that records the
    input it gets, translating keys with the keymap current at that moment."""

    def __init__(self, display_name: str) -> None:
        self.d: Any = xdisplay.Display(display_name)
        root = self.d.screen().root
        self.window = root.create_window(
            0,
            0,
            WIDTH,
            HEIGHT,
            0,
            X.CopyFromParent,
            override_redirect=True,
            event_mask=X.KeyPressMask
            | X.KeyReleaseMask
            | X.ButtonPressMask
            | X.ButtonReleaseMask
            | X.PointerMotionMask
            | X.StructureNotifyMask,
        )
        self.window.map()
        self.d.sync()
        self.events: list[tuple[int, int]] = []  # (event type, button or keycode)
        self.typed: list[int] = []  # keysyms of KeyPress events
        self.states: list[int] = []  # modifier state of KeyPress events

    def focus(self) -> None:
        self.window.set_input_focus(X.RevertToParent, X.CurrentTime)
        self.d.sync()

    def keysym_of(self, keycode: int, state: int) -> int:
        """The core protocol's choice (X11 protocol section 5) for group 1."""
        row = self.d.get_keyboard_mapping(keycode, 1)[0]
        first, second = row[0], row[1]
        if second == X.NoSymbol:
            char = chr(first) if first < 0x100 else ""
            second = ord(char.upper()) if char.isalpha() else first
        return int(second if state & X.ShiftMask else first)

    def _drain(self) -> None:
        while self.d.pending_events():
            ev = self.d.next_event()
            if ev.type in (X.KeyPress, X.KeyRelease, X.ButtonPress, X.ButtonRelease):
                self.events.append((ev.type, ev.detail))
                if ev.type == X.KeyPress:
                    self.typed.append(self.keysym_of(ev.detail, ev.state))
                    self.states.append(ev.state)
            elif ev.type == X.MotionNotify:
                self.events.append((ev.type, 0))

    async def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while True:
                self._drain()
                if until():
                    return
                await trio.sleep(0.01)

    async def settle(self) -> None:
        """Collect whatever arrives within a short while (for "nothing more
        happened" checks)."""
        self.d.sync()
        await trio.sleep(0.2)
        self._drain()

    def keys_down(self) -> list[int]:
        bits = self.d.query_keymap()
        return [i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte & (1 << b)]

    def close(self) -> None:
        self.d.close()


@asynccontextmanager
async def running(service: Any) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def input_and_window(xvfb: Xvfb) -> AsyncIterator[tuple[X11Input, InputWindow]]:
    window = InputWindow(xvfb.display)
    inp = X11Input(xvfb.display)
    try:
        async with running(inp):
            await inp.pointer_event(WIDTH // 2, HEIGHT // 2, 0)
            window.focus()
            await window.pump(lambda: bool(window.events))
            window.events.clear()
            yield inp, window
    finally:
        window.close()


# -- pointer --------------------------------------------------------------------------


async def test_pointer_moves_and_buttons(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await inp.pointer_event(100, 120, 0)
        await win.pump(lambda: bool(win.events))
        pointer = win.d.screen().root.query_pointer()
        assert (pointer.root_x, pointer.root_y) == (100, 120)
        win.events.clear()

        # Same position: buttons only, no motion.
        for mask in (1, 0, 4, 0, 1 | 4, 0):
            await inp.pointer_event(100, 120, mask)
        await win.pump(lambda: len(win.events) >= 8)
        await win.settle()
        press, release = X.ButtonPress, X.ButtonRelease
        assert win.events == [
            (press, 1),
            (release, 1),
            (press, 3),
            (release, 3),
            (press, 1),
            (press, 3),
            (release, 1),
            (release, 3),
        ]


async def test_wheel_bits_click_once(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        for mask in (8, 0, 16, 0, 32, 0, 64, 0):
            await inp.pointer_event(50, 50, mask)
        await win.pump(lambda: sum(t == X.ButtonRelease for t, _ in win.events) >= 4)
        await win.settle()
        buttons = [(t, b) for t, b in win.events if t in (X.ButtonPress, X.ButtonRelease)]
        assert buttons == [(t, b) for b in (4, 5, 6, 7) for t in (X.ButtonPress, X.ButtonRelease)]


async def test_back_forward_buttons_are_held(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        for mask in (128, 0, 256, 0):
            await inp.pointer_event(50, 50, mask)
        await win.pump(lambda: sum(t == X.ButtonRelease for t, _ in win.events) >= 2)
        buttons = [(t, b) for t, b in win.events if t in (X.ButtonPress, X.ButtonRelease)]
        assert buttons == [
            (X.ButtonPress, 8),
            (X.ButtonRelease, 8),
            (X.ButtonPress, 9),
            (X.ButtonRelease, 9),
        ]


async def test_scroll_deltas_become_wheel_clicks(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await inp.scroll_event(60, 70, 0, 3)
        await inp.scroll_event(60, 70, 0, -2)
        await inp.scroll_event(60, 70, 1, 0)
        await win.pump(lambda: sum(t == X.ButtonRelease for t, _ in win.events) >= 6)
        presses = [b for t, b in win.events if t == X.ButtonPress]
        assert presses == [5, 5, 5, 4, 4, 7]
        pointer = win.d.screen().root.query_pointer()
        assert (pointer.root_x, pointer.root_y) == (60, 70)


# -- keyboard -------------------------------------------------------------------------

TEXT = "Hello, World!"


async def type_text(inp: X11Input, text: str, *, viewer_shift: bool) -> None:
    """Type like a viewer: each character's keysym down and up; with
    `viewer_shift`, the viewer's own Shift is held around shifted characters,
    as a real keyboard would do it."""
    for char in text:
        shifted = viewer_shift and (char.isupper() or char in '!@#$%^&*()_+{}|:"<>?~')
        if shifted:
            await inp.key_event(XK.XK_Shift_L, True)
        await inp.key_event(ord(char), True)
        await inp.key_event(ord(char), False)
        if shifted:
            await inp.key_event(XK.XK_Shift_L, False)


@pytest.mark.parametrize("viewer_shift", [False, True])
async def test_typed_text_arrives_as_keysyms(xvfb: Xvfb, viewer_shift: bool) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await type_text(inp, TEXT, viewer_shift=viewer_shift)
        await win.pump(lambda: len([k for k in win.typed if k < 0x100]) >= len(TEXT))
        printable = [k for k in win.typed if k < 0x100]
        assert "".join(map(chr, printable)) == TEXT
        # No Shift (or anything else) is left down.
        assert win.keys_down() == []
        assert win.d.screen().root.query_pointer().mask & X.ShiftMask == 0


async def test_lowercase_while_viewer_holds_shift(xvfb: Xvfb) -> None:
    # A viewer whose layout differs may hold Shift and still send "1".
    async with input_and_window(xvfb) as (inp, win):
        await inp.key_event(XK.XK_Shift_L, True)
        await inp.key_event(ord("1"), True)
        await inp.key_event(ord("1"), False)
        await inp.key_event(ord("A"), True)
        await inp.key_event(ord("A"), False)
        await inp.key_event(XK.XK_Shift_L, False)
        await win.pump(lambda: len([k for k in win.typed if k < 0x100]) >= 2)
        assert [chr(k) for k in win.typed if k < 0x100] == ["1", "A"]
        assert win.keys_down() == []


@pytest.mark.parametrize("keysym", [0x20AC, 0x1000416, 0xFE51])  # €, Ж, dead_acute
async def test_missing_keysym_goes_to_a_spare_keycode(xvfb: Xvfb, keysym: int) -> None:
    async with input_and_window(xvfb) as (inp, win):
        assert win.d.keysym_to_keycode(keysym) == 0  # not on the US map
        for _ in range(2):  # the second time reuses the assignment
            await inp.key_event(keysym, True)
            await inp.key_event(keysym, False)
        await win.pump(lambda: win.typed.count(keysym) >= 2)
        await win.pump(lambda: sum(t == X.KeyRelease for t, _ in win.events) >= 2)
        assert win.keys_down() == []  # pressed and released: a dead key does not stick
        keycodes = {kc for t, kc in win.events if t == X.KeyPress}
        assert len(keycodes) == 1
    # Closing gives the spare keycode back.
    d: Any = xdisplay.Display(xvfb.display)
    try:
        assert d.get_keyboard_mapping(keycodes.pop(), 1)[0][0] == X.NoSymbol
    finally:
        d.close()


async def test_release_of_a_different_keysym_releases_the_key(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await inp.key_event(ord("!"), True)
        await inp.key_event(ord("1"), False)  # the viewer let Shift go first
        await win.pump(lambda: any(t == X.KeyRelease for t, _ in win.events))
        assert [chr(k) for k in win.typed if k < 0x100] == ["!"]
        await win.settle()
        assert win.keys_down() == []


async def test_altgr_held_does_not_move_plain_keys_to_level_three(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await inp.key_event(ISO_LEVEL3_SHIFT, True)
        await inp.key_event(ord("q"), True)
        await inp.key_event(ord("q"), False)
        await inp.key_event(ISO_LEVEL3_SHIFT, False)
        await win.pump(lambda: ord("q") in win.typed)
        q_state = win.states[win.typed.index(ord("q"))]
        assert q_state & (X.Mod5Mask | X.ShiftMask) == 0
        assert win.keys_down() == []


async def test_out_of_range_input_is_harmless(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await inp.key_event(0, True)  # NoSymbol
        await inp.key_event(0xFFFFFFFF, True)  # not a keysym
        await inp.pointer_event(65535, 65535, 0)  # RFB's U16 beyond INT16
        await inp.pointer_event(WIDTH + 100, -5, 0)
        pointer = win.d.screen().root.query_pointer()
        assert (pointer.root_x, pointer.root_y) == (WIDTH - 1, 0)
        await inp.key_event(ord("k"), True)
        await inp.key_event(ord("k"), False)
        await win.pump(lambda: ord("k") in win.typed)
        assert win.keys_down() == []


async def test_release_all_lifts_held_keys_and_buttons(xvfb: Xvfb) -> None:
    async with input_and_window(xvfb) as (inp, win):
        await inp.key_event(XK.XK_Control_L, True)
        await inp.key_event(XK.XK_Shift_L, True)
        await inp.key_event(ord("a"), True)
        await inp.key_event(0x20AC, True)
        await inp.pointer_event(10, 10, 1)
        await win.pump(lambda: len(win.keys_down()) == 4)
        await inp.release_all()
        await win.pump(lambda: win.keys_down() == [])
        assert win.d.screen().root.query_pointer().mask & 0xFF1D == 0  # no mods, no buttons
        # The viewer's late releases are harmless now.
        await inp.key_event(ord("a"), False)
        await inp.pointer_event(10, 10, 0)
        await win.settle()
        assert win.keys_down() == []


# -- clipboard ------------------------------------------------------------------------


class RecordingListener:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.cursors: list[CursorImage] = []

    def clipboard_changed(self, text: str) -> None:
        self.texts.append(text)

    def cursor_changed(self, cursor: CursorImage) -> None:
        self.cursors.append(cursor)

    def bell(self) -> None:
        pass

    def source_ended(self, reason: str) -> None:
        pass


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


@asynccontextmanager
async def xclip_owning(xvfb: Xvfb, text: str, selection: str = "clipboard") -> AsyncIterator[None]:
    """xclip in the foreground (-quiet) owns the selection until we stop it."""
    proc = subprocess.Popen(
        ["xclip", "-quiet", "-selection", selection, "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=xvfb.env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(text.encode("utf-8"))
    proc.stdin.close()
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(5)


async def xclip_read(xvfb: Xvfb, selection: str = "clipboard") -> str:
    result = await trio.run_process(
        ["xclip", "-o", "-selection", selection],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=xvfb.env(),
    )
    return bytes(result.stdout).decode("utf-8")


needs_xclip = pytest.mark.skipif(shutil.which("xclip") is None, reason="needs xclip")


@needs_xclip
async def test_clipboard_from_another_client(xvfb: Xvfb) -> None:
    listener = RecordingListener()
    clip = X11Clipboard(xvfb.display, listener)
    async with running(clip):
        async with xclip_owning(xvfb, "héllo ✓"):
            await wait_for(lambda: "héllo ✓" in listener.texts)
        async with xclip_owning(xvfb, "from primary", "primary"):
            await wait_for(lambda: "from primary" in listener.texts)
        # The same text again is no news.
        async with xclip_owning(xvfb, "from primary"):
            await trio.sleep(0.5)
        assert listener.texts == ["héllo ✓", "from primary"]


@needs_xclip
async def test_clipboard_present_at_start_is_reported(xvfb: Xvfb) -> None:
    listener = RecordingListener()
    async with xclip_owning(xvfb, "already there"):
        await wait_for(lambda: "already" in _sync_xclip_read(xvfb))
        async with running(X11Clipboard(xvfb.display, listener)):
            await wait_for(lambda: listener.texts == ["already there"])


def _sync_xclip_read(xvfb: Xvfb) -> str:
    out = subprocess.run(
        ["xclip", "-o", "-selection", "clipboard"],
        capture_output=True,
        env=xvfb.env(),
        timeout=5,
        check=False,
    )
    return out.stdout.decode("utf-8", errors="replace")


@needs_xclip
async def test_set_text_serves_clipboard_and_primary(xvfb: Xvfb) -> None:
    listener = RecordingListener()
    clip = X11Clipboard(xvfb.display, listener)
    async with running(clip):
        await clip.set_text("from trivnc ✓")
        assert await xclip_read(xvfb) == "from trivnc ✓"
        assert await xclip_read(xvfb, "primary") == "from trivnc ✓"
        targets = await trio.run_process(
            ["xclip", "-o", "-selection", "clipboard", "-t", "TARGETS"],
            capture_stdout=True,
            env=xvfb.env(),
        )
        assert {"TARGETS", "UTF8_STRING", "STRING", "TEXT"} <= set(
            bytes(targets.stdout).decode().split()
        )
        # Our own ownership is not reported back as a desktop change.
        await trio.sleep(0.3)
        assert listener.texts == []
        # A later copy elsewhere takes over; then we can take it back.
        async with xclip_owning(xvfb, "theirs"):
            await wait_for(lambda: listener.texts == ["theirs"])
            await clip.set_text("ours again")
            assert await xclip_read(xvfb) == "ours again"


@needs_xclip
async def test_set_text_before_run_takes_effect_on_start(xvfb: Xvfb) -> None:
    clip = X11Clipboard(xvfb.display, RecordingListener())
    await clip.set_text("early")
    async with running(clip):
        assert await xclip_read(xvfb) == "early"


@needs_xclip
async def test_oversize_text_is_refused_both_ways(xvfb: Xvfb) -> None:
    listener = RecordingListener()
    clip = X11Clipboard(xvfb.display, listener, max_size=1000)
    async with running(clip):
        await clip.set_text("small")
        await clip.set_text("x" * 1001)
        assert await xclip_read(xvfb) == "small"
        async with xclip_owning(xvfb, "y" * 5000):
            await trio.sleep(0.5)
        async with xclip_owning(xvfb, "z" * 300_000):  # xclip sends this INCR
            await trio.sleep(0.8)
        async with xclip_owning(xvfb, "fits"):
            await wait_for(lambda: listener.texts == ["fits"])


@needs_xclip
async def test_big_text_uses_incr_both_ways(xvfb: Xvfb) -> None:
    listener = RecordingListener()
    clip = X11Clipboard(xvfb.display, listener)
    big = "".join(chr(0x41 + i % 26) for i in range(600_000)) + " ✓"
    async with running(clip):
        async with xclip_owning(xvfb, big):
            await wait_for(lambda: bool(listener.texts), timeout=10)
        assert listener.texts == [big]
        other = big[::-1]
        await clip.set_text(other)
        assert await xclip_read(xvfb) == other


# -- cursor ---------------------------------------------------------------------------


async def test_cursor_changes_are_reported(xvfb: Xvfb) -> None:
    listener = RecordingListener()
    async with running(X11Cursor(xvfb.display, listener)):
        await wait_for(lambda: bool(listener.cursors))
        first = listener.cursors[0]
        d: Any = xdisplay.Display(xvfb.display)
        try:
            font = d.open_font("cursor")
            watch = 150  # XC_watch in the cursor font; its mask is the next glyph
            cursor = font.create_glyph_cursor(
                font, watch, watch + 1, (0, 0, 0), (0xFFFF, 0xFFFF, 0xFFFF)
            )
            d.screen().root.change_attributes(cursor=cursor)
            d.sync()
            await wait_for(lambda: len(listener.cursors) >= 2)
        finally:
            d.close()
    second = listener.cursors[1]
    assert second.serial != first.serial
    for image in (first, second):
        h, w, channels = image.rgba.shape
        assert channels == 4 and image.rgba.dtype == np.uint8
        assert 4 <= w <= 64 and 4 <= h <= 64
        assert 0 <= image.hotspot[0] < w and 0 <= image.hotspot[1] < h
        # Premultiplied: no colour channel exceeds alpha, and something shows.
        assert (image.rgba[..., :3] <= image.rgba[..., 3:4]).all()
        assert image.rgba[..., 3].any()
    assert not np.array_equal(first.rgba, second.rgba)

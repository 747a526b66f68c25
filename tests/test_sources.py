# The two in-process sources: ArraySource (an application's numpy array) and
# DemoSource (the built-in desktop). Pixels are checked by capturing, never by
# trusting the damage hints: a hint must cover every pixel that changed.
from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import trio
import trio.testing

from trivnc.geometry import Rect
from trivnc.sources import ArraySource, Damage, DemoSource, Pixels
from trivnc.sources.array import (
    ClipboardInput,
    DamageAccumulator,
    DamageQueue,
    InputEvent,
    KeyInput,
    PointerInput,
    ResizeRequest,
    ScrollInput,
)
from trivnc.sources.demo import GlyphFont, _keysym_text

XK_BackSpace, XK_Return = 0xFF08, 0xFF0D


def changed_mask(a: Pixels, b: Pixels) -> np.ndarray:
    """(h, w) bool: pixels whose B, G or R differ (byte 3 is padding)."""
    return np.asarray((a[..., :3] != b[..., :3]).any(axis=2))


def covered(damage: Damage, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    if damage.full:
        mask[...] = True
    for r in damage.rects:
        mask[r.slices()] = True
    return mask


def inside(r: Rect, outer: Rect) -> bool:
    return outer.intersect(r) == r


async def no_damage_within(source: ArraySource | DemoSource, seconds: float) -> bool:
    with trio.move_on_after(seconds) as scope:
        await source.wait_damage()
    return scope.cancelled_caught


# -- damage bookkeeping -----------------------------------------------------


def test_accumulator_merges_overlaps_and_ignores_contained() -> None:
    acc = DamageAccumulator(100, 100)
    assert acc.add(Rect(10, 10, 10, 10))
    assert not acc.add(Rect(12, 12, 2, 2))  # already covered
    assert acc.add(Rect(15, 10, 10, 10))  # overlaps: merged into one box
    assert acc.add(Rect(80, 80, 5, 5))  # far away: kept apart
    damage = acc.take()
    assert damage == Damage(rects=(Rect(10, 10, 15, 10), Rect(80, 80, 5, 5)))
    assert acc.take() is None


def test_accumulator_clips_and_turns_full() -> None:
    acc = DamageAccumulator(50, 40)
    assert not acc.add(Rect(60, 60, 5, 5))  # outside: nothing
    acc.add(Rect(-10, -10, 20, 20))
    assert acc.take() == Damage(rects=(Rect(0, 0, 10, 10),))
    acc.add(Rect(0, 0, 50, 20))
    acc.add(Rect(0, 20, 50, 20))
    assert acc.take() == Damage(full=True)


def test_accumulator_is_bounded() -> None:
    acc = DamageAccumulator(1000, 1000, max_rects=8)
    points = [(37 * i % 997, 91 * i % 991) for i in range(200)]
    for x, y in points:
        acc.add(Rect(x, y, 1, 1))
    damage = acc.take()
    assert damage is not None
    assert len(damage.rects) <= 8 or damage.full
    mask = covered(damage, (1000, 1000))
    assert all(mask[y, x] for x, y in points)


# -- ArraySource: damage and capture -----------------------------------------


async def test_array_damage_accumulates_until_taken(autojump_clock: trio.abc.Clock) -> None:
    source = ArraySource(64, 48)
    assert source.size == (64, 48)
    assert await no_damage_within(source, 10)  # nothing marked, nothing reported
    source.mark_changed(Rect(0, 0, 8, 8))
    source.mark_changed(Rect(40, 30, 4, 4))
    source.mark_changed(Rect(4, 0, 8, 8))  # overlaps the first: one box
    source.mark_changed(Rect(1, 1, 2, 2))  # inside it: nothing new
    damage = await source.wait_damage()
    assert not damage.full
    assert sorted(damage.rects) == [Rect(0, 0, 12, 8), Rect(40, 30, 4, 4)]
    assert await no_damage_within(source, 10)  # taken: nothing left
    source.mark_changed()
    assert (await source.wait_damage()).full


async def test_array_wait_wakes_on_mark(autojump_clock: trio.abc.Clock) -> None:
    source = ArraySource(32, 32)
    got: list[Damage] = []

    async def consumer() -> None:
        got.append(await source.wait_damage())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.sleep(1)  # the consumer is parked on an empty queue
        assert got == []
        source.mark_changed(Rect(1, 2, 3, 4))
    assert got == [Damage(rects=(Rect(1, 2, 3, 4),))]


async def test_array_cancelled_wait_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    source = ArraySource(32, 32)
    assert await no_damage_within(source, 1)  # a waiter was cancelled
    source.mark_changed(Rect(0, 0, 2, 2))
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await source.wait_damage()  # cancelled before taking anything
    assert await source.wait_damage() == Damage(rects=(Rect(0, 0, 2, 2),))


async def test_array_capture_is_a_snapshot() -> None:
    source = ArraySource(40, 30)
    source.pixels[5:10, 5:10] = (255, 0, 0, 0)  # blue in BGRX
    source.mark_changed(Rect(5, 5, 5, 5))
    damage = await source.wait_damage()
    first = await trio.to_thread.run_sync(source.capture, damage)
    assert first.shape == (30, 40, 4) and first.dtype == np.uint8
    assert np.array_equal(first, source.pixels)
    assert not np.shares_memory(first, source.pixels)

    source.pixels[0:3, 0:3] = (0, 0, 255, 0)  # drawing goes on
    source.mark_changed(Rect(0, 0, 3, 3))
    second = await trio.to_thread.run_sync(source.capture, await source.wait_damage())
    assert (first[0:3, 0:3, 2] == 0).all()  # the earlier capture did not move
    assert (first[5:10, 5:10, 0] == 255).all()
    assert (second[0:3, 0:3, 2] == 255).all()
    assert np.array_equal(second, source.pixels)


def test_array_rgb_view_writes_bgrx() -> None:
    source = ArraySource(4, 2)
    source.rgb = (10, 20, 30)
    assert source.pixels[0, 0].tolist() == [30, 20, 10, 0]
    source.rgb[1, 3] = (200, 100, 50)
    assert source.pixels[1, 3].tolist() == [50, 100, 200, 0]
    assert source.rgb[1, 3].tolist() == [200, 100, 50]


def test_from_array_serves_the_array_in_place() -> None:
    pixels = np.zeros((6, 8, 4), np.uint8)
    source = ArraySource.from_array(pixels, name="mine")
    assert source.size == (8, 6) and source.name == "mine"
    pixels[2, 3] = (1, 2, 3, 0)
    assert source.capture(Damage(full=True))[2, 3].tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="BGRX"):
        ArraySource.from_array(np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="BGRX"):
        ArraySource.from_array(np.zeros((6, 8, 4), np.float32))


async def test_mark_changed_threadsafe_from_foreign_thread() -> None:
    source = ArraySource(100, 100)
    release = threading.Event()

    def painter() -> None:
        release.wait()
        for i in range(500):
            source.pixels[i % 100, i % 100] = 255
            source.mark_changed_threadsafe(Rect(i % 100, i % 100, 1, 1))

    thread = threading.Thread(target=painter)
    thread.start()
    try:
        with trio.fail_after(5):
            release.set()
            seen = np.zeros((100, 100), bool)
            while not seen.diagonal().all():
                seen |= covered(await source.wait_damage(), (100, 100))
    finally:
        release.set()
        await trio.to_thread.run_sync(thread.join)
    assert np.array_equal(np.diagonal(source.capture(Damage(full=True))[..., 0]), [255] * 100)


async def test_mark_changed_threadsafe_before_anyone_waits() -> None:
    source = ArraySource(10, 10)
    await trio.to_thread.run_sync(source.mark_changed_threadsafe, Rect(1, 1, 2, 2))
    with trio.fail_after(1):
        assert await source.wait_damage() == Damage(rects=(Rect(1, 1, 2, 2),))


async def test_damage_queue_threadsafe_wakes_a_parked_waiter() -> None:
    queue = DamageQueue(10, 10)
    result: list[Damage] = []

    async def consumer() -> None:
        result.append(await queue.wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            await trio.to_thread.run_sync(queue.add_threadsafe, None)
    assert result == [Damage(full=True)]


# -- ArraySource: input --------------------------------------------------------


async def test_array_input_channel_in_order() -> None:
    source = ArraySource(10, 10)
    await source.key_event(0x61, True)  # before subscribing: not queued
    events = source.input_events()
    await source.key_event(0x61, True)
    await source.pointer_event(3, 4, 1)
    await source.scroll_event(3, 4, 0, -2)
    await source.clipboard_text("hello")
    received = [events.receive_nowait() for _ in range(4)]
    assert received == [
        KeyInput(0x61, True),
        PointerInput(3, 4, 1),
        ScrollInput(3, 4, 0, -2),
        ClipboardInput("hello"),
    ]
    with pytest.raises(trio.WouldBlock):
        events.receive_nowait()
    assert source.dropped_events == 0


async def test_array_input_overflow_drops_and_counts() -> None:
    source = ArraySource(10, 10, input_capacity=4)
    events = source.input_events()
    for keysym in range(10):  # nobody reads: the server must not block
        with trio.fail_after(1):
            await source.key_event(keysym, True)
    assert source.dropped_events == 6
    assert [events.receive_nowait() for _ in range(4)] == [KeyInput(k, True) for k in range(4)]
    await source.key_event(99, False)  # room again
    assert events.receive_nowait() == KeyInput(99, False)
    await events.aclose()
    await source.key_event(100, True)  # a closed channel is not an error
    assert source.dropped_events == 6


async def test_array_input_callback() -> None:
    seen: list[InputEvent] = []

    async def on_input(event: InputEvent) -> None:
        seen.append(event)

    source = ArraySource(10, 10, on_input=on_input)
    await source.pointer_event(1, 2, 4)
    await source.clipboard_text("x")
    assert seen == [PointerInput(1, 2, 4), ClipboardInput("x")]


async def test_array_set_size(autojump_clock: trio.abc.Clock) -> None:
    fixed = ArraySource(20, 10)
    events = fixed.input_events()
    assert not await fixed.set_size(40, 30)
    assert fixed.size == (20, 10)
    assert events.receive_nowait() == ResizeRequest(40, 30, applied=False)

    source = ArraySource(20, 10, resizable=True)
    events = source.input_events()
    source.pixels[...] = 7
    assert await source.set_size(40, 30)
    assert source.size == (40, 30) and source.pixels.shape == (30, 40, 4)
    assert (source.pixels[:10, :20] == 7).all() and (source.pixels[10:, :] == 0).all()
    assert events.receive_nowait() == ResizeRequest(40, 30, applied=True)
    assert (await source.wait_damage()).full
    assert source.capture(Damage(full=True)).shape == (30, 40, 4)
    assert not await source.set_size(0, 30)


# -- DemoSource ----------------------------------------------------------------


async def drain(source: DemoSource) -> Damage:
    with trio.fail_after(1):
        return await source.wait_damage()


async def capture_checked(source: DemoSource, before: Pixels) -> tuple[Pixels, Damage]:
    """Take the pending damage and capture: every changed pixel is covered,
    and the capture (refreshed only where the source recorded changes) shows
    everything that was drawn."""
    damage = await drain(source)
    after = source.capture(damage)
    assert not (changed_mask(before, after) & ~covered(damage, after.shape)).any()
    assert np.array_equal(after, source._work)
    return after, damage


async def test_demo_static_is_quiet(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360, animate=False)
    assert (await drain(source)).full  # the first frame
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        assert await no_damage_within(source, 60)
    frame = source.capture(Damage(full=True))
    assert frame.shape == (360, 640, 4)
    assert len(np.unique(frame.reshape(-1, 4), axis=0)) > 100  # not a blank screen


async def test_demo_typing_changes_only_the_text_line(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360, animate=False)
    await drain(source)
    before = source.capture(Damage(full=True))
    for ch in "hi":
        await source.key_event(ord(ch), True)
        await source.key_event(ord(ch), False)
    after, damage = await capture_checked(source, before)
    changed = changed_mask(before, after)
    assert changed.any()
    rows = source.layout.rows
    assert all(inside(r, rows) for r in damage.rects)
    assert all(r.h == source.font.line_height for r in damage.rects)  # one line
    ys, xs = np.nonzero(changed)
    assert inside(Rect(xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1), rows)

    # A release alone types nothing; BackSpace twice restores the pixels.
    await source.key_event(ord("x"), False)
    assert await no_damage_within(source, 1)
    await source.key_event(XK_BackSpace, True)
    await source.key_event(XK_BackSpace, True)
    assert np.array_equal(source.capture(await drain(source)), before)


async def test_demo_return_and_latin1_and_paste() -> None:
    source = DemoSource(640, 360, animate=False)
    await drain(source)
    frame = source.capture(Damage(full=True))
    history = [frame]
    for keysym in (0xE9, XK_Return, ord("a"), XK_Return):  # é, a new line, ...
        await source.key_event(keysym, True)
        frame, _ = await capture_checked(source, frame)
        history.append(frame)
    await source.clipboard_text("pasted\r\ntext")
    frame, _ = await capture_checked(source, frame)
    lh, rows = source.font.line_height, source.layout.rows
    changed = changed_mask(history[0], frame)
    for row in range(4):  # four lines hold ink now
        assert changed[rows.y + row * lh : rows.y + (row + 1) * lh, rows.x : rows.right].any()
    assert not changed[rows.y + 4 * lh :, :].any()
    for _ in "pasted\ntext":
        await source.key_event(XK_BackSpace, True)
        frame, _ = await capture_checked(source, frame)
    # Erasing retraces every earlier frame exactly, across line breaks.
    for earlier in reversed(history[:-1]):
        await source.key_event(XK_BackSpace, True)
        frame, _ = await capture_checked(source, frame)
        assert np.array_equal(frame, earlier)


async def test_demo_drag_paints_along_the_path(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360, animate=False)
    await drain(source)
    before = frame = source.capture(Damage(full=True))
    c = source.layout.canvas
    path = [(c.x + 30, c.bottom - 30), (c.x + 90, c.bottom - 40), (c.x + 150, c.bottom - 100)]
    for x, y in path:
        await source.pointer_event(x, y, 1)
        frame, _ = await capture_checked(source, frame)
    await source.pointer_event(*path[-1], 0)
    changed = changed_mask(before, frame)
    for (x0, y0), (x1, y1) in itertools.pairwise(path):
        for t in np.linspace(0, 1, 9):  # every point along each segment
            assert changed[round(y0 + (y1 - y0) * t), round(x0 + (x1 - x0) * t)]
    assert not changed[c.y + 5, c.right - 5]  # far from the stroke
    ys, xs = np.nonzero(changed)
    assert inside(Rect(xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1), c)

    # Moving without a button paints nothing; the right button clears.
    await source.pointer_event(c.x + 200, c.y + 100, 0)
    assert await no_damage_within(source, 1)
    await source.pointer_event(c.x + 200, c.y + 100, 4)
    await source.pointer_event(c.x + 200, c.y + 100, 0)
    assert np.array_equal(source.capture(await drain(source)), before)


async def test_demo_clock_ticks_each_second(autojump_clock: trio.abc.Clock) -> None:
    start = 1_700_000_000.5  # half a second into a wall-clock second

    def wall() -> float:
        return start + trio.current_time()

    source = DemoSource(640, 360, ball_fps=0, photo_fps=0, wall_clock=wall)
    await drain(source)
    before = source.capture(Damage(full=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        t0 = trio.current_time()
        damage = await source.wait_damage()
        assert 0.4 < trio.current_time() - t0 < 0.6  # at the wall-clock second
        assert damage == Damage(rects=(source.layout.clock,))
        after = source.capture(damage)
        changed = changed_mask(before, after)
        assert changed.any()
        assert not (changed & ~covered(damage, after.shape)).any()
        ticks = 0
        with trio.move_on_after(10):
            while True:
                assert await source.wait_damage() == damage
                ticks += 1
        assert 9 <= ticks <= 10  # once a second, not more
        nursery.cancel_scope.cancel()


async def test_demo_animation_rates_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360, ball_fps=30, photo_fps=10)
    await drain(source)
    lay = source.layout
    small = lay.canvas.area // 20
    ball = photo = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        with trio.move_on_after(2):
            while True:
                damage = await source.wait_damage()
                assert not damage.full
                moved = [r for r in damage.rects if r not in (lay.photo, lay.clock)]
                photo += lay.photo in damage.rects
                ball += bool(moved)
                for r in moved:  # the ball's old and new box, nothing bigger
                    assert inside(r, lay.canvas)
                    assert r.area <= small
        nursery.cancel_scope.cancel()
    assert 19 <= photo <= 21
    assert 58 <= ball <= 61


async def test_demo_ball_leaves_no_trail(autojump_clock: trio.abc.Clock) -> None:
    # At 2 fps the ball jumps further than its size: its old box does not
    # overlap the new one and must be restored on its own.
    source = DemoSource(640, 360, ball_fps=2, photo_fps=0)
    await drain(source)
    c = source.layout.canvas

    def ball_pixels(frame: Pixels) -> int:
        b, g, r = (frame[c.slices()][..., i].astype(int) for i in range(3))
        return int(((r - b > 100) & (r - g > 40)).sum())  # orange, not the canvas

    frame = source.capture(Damage(full=True))
    expected = ball_pixels(frame)
    assert expected > 100
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        for _ in range(8):
            frame, _ = await capture_checked(source, frame)
            assert abs(ball_pixels(frame) - expected) < expected * 0.15  # one ball
        nursery.cancel_scope.cancel()


async def test_demo_pause_stops_all_damage(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360)
    await drain(source)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        await source.wait_damage()
        source.animating = False
        await trio.sleep(0.1)  # let the step that was due finish
        while not await no_damage_within(source, 1):
            pass  # what was drawn before the pause took effect
        assert await no_damage_within(source, 30)
        source.animating = True
        with trio.fail_after(1):
            await source.wait_damage()
        nursery.cancel_scope.cancel()


async def test_demo_capture_follows_incremental_updates(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360, ball_fps=60, photo_fps=20)
    frames: list[Pixels] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        for _ in range(30):
            damage = await source.wait_damage()
            # Called here, not in a worker thread, so no step runs meanwhile
            # and the incremental capture must equal what was drawn.
            frames.append(source.capture(damage))
            assert np.array_equal(frames[-1], source._work)
        nursery.cancel_scope.cancel()
    assert not np.array_equal(frames[0], frames[-1])  # it did animate
    assert len({f.ctypes.data for f in frames}) == len(frames)  # fresh arrays


async def test_demo_resize(autojump_clock: trio.abc.Clock) -> None:
    source = DemoSource(640, 360, animate=False)
    await drain(source)
    source.type_text("kept")
    assert await source.set_size(800, 600)
    assert source.size == (800, 600)
    assert (await drain(source)).full
    frame = source.capture(Damage(full=True))
    assert frame.shape == (600, 800, 4)
    rows = source.layout.rows
    kept = frame[rows.y : rows.y + source.font.line_height, rows.x : rows.x + 20]
    assert (kept != frame[rows.bottom - 1, rows.right - 1]).any()  # ink on the panel
    assert not await source.set_size(100, 100)  # too small for the layout
    assert not await DemoSource(640, 360, animate=False, resizable=False).set_size(800, 600)


# -- text ------------------------------------------------------------------------


def test_builtin_font_renders_without_pillow() -> None:
    font = GlyphFont.builtin(20)  # scale 2: 12x20 cells
    assert font.line_height == 20
    a = font.glyph("A")
    assert a.shape == (20, 12) and a.any()
    assert not font.glyph(" ").any()
    assert font.mask("AB").shape == (20, 24)
    e, e_acute = font.glyph("e"), font.glyph("\u00e9")
    assert not np.array_equal(e, e_acute) and (e_acute >= e).all()  # e plus an accent
    assert font.width("\u00df") == font.width("ss")
    assert np.array_equal(font.glyph("\u4e2d"), font.glyph("\ufffd"))  # unknown: a box


@pytest.mark.parametrize("choice", ["builtin", "pillow"])
def test_demo_draws_with_either_font(choice: str) -> None:
    if choice == "pillow":
        pytest.importorskip("PIL")
    source = DemoSource(320, 200, animate=False, font=choice)  # type: ignore[arg-type]
    source.type_text("abc")
    assert source.capture(Damage(full=True)).shape == (200, 320, 4)


def test_keysym_text() -> None:
    assert _keysym_text(ord("a")) == "a"
    assert _keysym_text(0xE9) == "\u00e9"
    assert _keysym_text(0x010020AC) == "\u20ac"  # Unicode keysym
    assert _keysym_text(XK_BackSpace) == "\b"
    assert _keysym_text(XK_Return) == "\n"
    assert _keysym_text(0xFFE1) is None  # Shift_L

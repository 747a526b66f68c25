"""Scroll detection (trivnc.framebuffer.scroll) and scrolls sent as CopyRect
(trivnc.server.copyrect), from the detector up to a real server and client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio

import trivnc
from trivnc.framebuffer import scroll
from trivnc.framebuffer.scroll import MIN_RUN, Move, ScrollDetector, detect_moves, search_areas
from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding
from trivnc.server import Server
from trivnc.server.copyrect import subtract
from trivnc.sources.array import ArraySource
from trivnc.testing.aclient import VncClient, open_test_client

Pixels = npt.NDArray[np.uint8]
BG = (24, 20, 16, 0)
LINE = 16  # text line height in the test documents


def document(width: int, lines: int, seed: int = 0) -> Pixels:
    """A text-like page: lines of 7x11 glyphs from a small font, on a flat
    background, each line of random length (blank rows and blank ends)."""
    rng = np.random.default_rng(seed)
    font = rng.random((40, 11, 7)) < 0.4
    page = np.empty((lines * LINE, width, 4), np.uint8)
    page[...] = BG
    for n in range(lines):
        for c in range(int(rng.integers(0, (width - 4) // 8))):
            glyph = font[rng.integers(0, len(font))]
            cell = page[n * LINE + 3 : n * LINE + 14, 2 + c * 8 : 9 + c * 8]
            cell[glyph] = (210, 210, 200, 0)
    return page


def screen_with(page: Pixels, offset: int, area: Rect, size: tuple[int, int]) -> Pixels:
    """A desktop showing `page` scrolled by `offset` rows inside `area`."""
    out = np.empty((size[1], size[0], 4), np.uint8)
    out[...] = (90, 60, 30, 0)
    out[area.slices()] = page[offset : offset + area.h, : area.w]
    return out


def apply(old: Pixels, moves: list[Move]) -> Pixels:
    """What a client does with CopyRects: copy from its own framebuffer."""
    out = old.copy()
    for m in moves:
        out[m.dst.slices()] = out[m.src.slices()].copy()
    return out


# -- the detector ------------------------------------------------------------------


def test_a_scroll_is_found_exactly() -> None:
    page = document(800, 80)
    area = Rect(40, 30, 800, 600)
    old = screen_with(page, 0, area, (900, 700))
    new = screen_with(page, 3 * LINE, area, (900, 700))
    moves = detect_moves(old, new, area)
    assert len(moves) == 1
    (move,) = moves
    assert (move.dx, move.dy) == (0, 3 * LINE)
    # Everything but the newly exposed lines comes from the old frame.
    assert move.dst == Rect(40, 30, 800, 600 - 3 * LINE)
    assert np.array_equal(new[move.dst.slices()], old[move.src.slices()])


@pytest.mark.parametrize("dy", [1, 5, LINE, -LINE, -7, 250])
def test_moves_up_and_down_by_any_amount(dy: int) -> None:
    page = document(640, 80, seed=2)
    area = Rect(0, 0, 640, 480)
    base = 300
    old = screen_with(page, base, area, (640, 480))
    new = screen_with(page, base + dy, area, (640, 480))
    moves = detect_moves(old, new, area)
    assert [m.dy for m in moves] == [dy]
    assert moves[0].dst.h == 480 - abs(dy)
    assert np.array_equal(apply(old, moves)[moves[0].dst.slices()], new[moves[0].dst.slices()])


def test_a_scrolling_column_inside_a_wider_damage_box() -> None:
    # A browser-like page scrolls at x 200..840 while the sidebar at its left
    # and a panel at its right change in other ways: the move is found for
    # the column alone, to the pixel.
    rng = np.random.default_rng(4)
    page = document(640, 70, seed=4)
    size = (1000, 600)
    column = Rect(200, 0, 640, 600)
    old = screen_with(page, 0, column, size)
    new = screen_with(page, 2 * LINE + 3, column, size)
    old[:, :200] = rng.integers(0, 256, (600, 200, 4), dtype=np.uint8)
    new[:, :200] = rng.integers(0, 256, (600, 200, 4), dtype=np.uint8)
    new[100:300, 840:1000] = (0, 0, 255, 0)
    moves = detect_moves(old, new, Rect(0, 0, *size))
    assert len(moves) == 1
    dst = moves[0].dst
    assert moves[0].dy == 2 * LINE + 3
    assert (dst.x, dst.right) == (200, 840)
    assert np.array_equal(new[dst.slices()], old[moves[0].src.slices()])


def test_video_and_noise_give_no_moves() -> None:
    rng = np.random.default_rng(7)
    old = rng.integers(0, 256, (480, 640, 4), dtype=np.uint8)
    new = rng.integers(0, 256, (480, 640, 4), dtype=np.uint8)
    assert detect_moves(old, new, Rect(0, 0, 640, 480)) == []
    # A smooth picture that changes a little everywhere (a fade)...
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.zeros((480, 640, 4), np.uint8)
    smooth[..., 1] = (x + y) % 256
    faded = smooth.copy()
    faded[..., 2] += 1
    assert detect_moves(smooth, faded, Rect(0, 0, 640, 480)) == []
    # ...unless the change really is a move: a gradient one step on is the
    # same gradient one row further.
    moved = smooth.copy()
    moved[..., 1] += 1
    (move,) = detect_moves(smooth, moved, Rect(0, 0, 640, 480))
    assert move.dy == 1 and np.array_equal(moved[move.dst.slices()], smooth[move.src.slices()])


def test_blank_areas_and_tiny_areas_give_no_moves() -> None:
    blank = np.zeros((480, 640, 4), np.uint8)
    assert detect_moves(blank, blank.copy(), Rect(0, 0, 640, 480)) == []
    other = blank.copy()
    other[...] = 7
    assert detect_moves(blank, other, Rect(0, 0, 640, 480)) == []
    page = document(640, 40)
    old = screen_with(page, 0, Rect(0, 0, 640, 480), (640, 480))
    new = screen_with(page, LINE, Rect(0, 0, 640, 480), (640, 480))
    assert detect_moves(old, new, Rect(0, 0, 40, 40)) == []  # too small to search
    assert detect_moves(old, new, Rect(0, 0, 640, MIN_RUN)) == []


def test_unchanged_frames_give_no_moves() -> None:
    page = document(640, 40)
    frame = screen_with(page, 0, Rect(0, 0, 640, 480), (640, 480))
    assert detect_moves(frame, frame.copy(), Rect(0, 0, 640, 480)) == []


def test_hash_collisions_cannot_produce_wrong_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    # With every weight zero, every row of every strip hashes alike: the hashes
    # propose nothing worth trying, and nothing unverified is ever returned.
    page = document(640, 40)
    area = Rect(0, 0, 640, 480)
    old = screen_with(page, 0, area, (640, 480))
    new = screen_with(page, LINE, area, (640, 480))
    monkeypatch.setattr(scroll, "_WEIGHTS", np.zeros_like(scroll._WEIGHTS))
    assert detect_moves(old, new, area) == []
    # Weights that ignore every pixel but the first column of each strip:
    # rows collide all the time; whatever is returned is still exact.
    weights = np.zeros_like(scroll._WEIGHTS)
    weights[:: scroll.STRIP] = 1
    monkeypatch.setattr(scroll, "_WEIGHTS", weights)
    rng = np.random.default_rng(1)
    noisy = new.copy()
    noisy[::3, 5::7] = rng.integers(0, 256, noisy[::3, 5::7].shape, dtype=np.uint8)
    for move in detect_moves(old, noisy, area):
        assert np.array_equal(noisy[move.dst.slices()], old[move.src.slices()])


def test_the_detector_follows_a_steady_scroll(monkeypatch: pytest.MonkeyPatch) -> None:
    page = document(800, 100, seed=3)
    area = Rect(0, 0, 800, 600)
    frames = [screen_with(page, i * LINE, area, (800, 600)) for i in range(6)]
    detector = ScrollDetector()
    searches = []
    real = scroll._detect

    def counting(old: Pixels, new: Pixels, where: Rect) -> list[Move]:
        searches.append(where)
        return real(old, new, where)

    monkeypatch.setattr(scroll, "_detect", counting)
    for v in range(1, 6):
        moves = detector.detect(v, frames[v - 1], v + 1, frames[v], [area])
        assert [m.dy for m in moves] == [LINE]
        dst = moves[0].dst
        assert np.array_equal(apply(frames[v - 1], moves)[dst.slices()], frames[v][dst.slices()])
    assert len(searches) == 1  # then the first frame's move was followed
    # The scroll turns around: followed moves explain nothing, so it searches.
    moves = detector.detect(6, frames[5], 7, frames[3], [area])
    assert [m.dy for m in moves] == [-2 * LINE] and len(searches) == 2
    # A version it did not see last: a search from scratch, same result.
    assert [m.dy for m in detector.detect(9, frames[0], 10, frames[1], [area])] == [LINE]
    assert len(searches) == 3


def test_search_areas_follow_the_changed_tiles_and_damage() -> None:
    mask = np.zeros((10, 10), bool)
    mask[1:9, 1:8] = True
    assert search_areas(mask, None, 640, 640) == [Rect(64, 64, 448, 512)]
    assert search_areas(mask, Rect(80, 80, 400, 300), 640, 640) == [Rect(80, 80, 400, 300)]
    assert search_areas(np.zeros((10, 10), bool), None, 640, 640) == []


def test_subtract_leaves_up_to_four_pieces() -> None:
    r = Rect(0, 0, 100, 100)
    pieces = subtract(r, Rect(10, 20, 30, 40))
    assert sum(p.area for p in pieces) == 100 * 100 - 30 * 40
    assert len(pieces) == 4
    assert subtract(r, Rect(200, 0, 10, 10)) == [r]
    assert subtract(r, Rect(-5, -5, 200, 200)) == []
    assert subtract(r, Rect(0, 50, 100, 50)) == [Rect(0, 0, 100, 50)]


# -- end to end ----------------------------------------------------------------------

SIZE = (640, 480)
AREA = Rect(40, 40, 512, 384)
MARKER = Rect(40, 40, 128, 16)


@pytest.fixture
async def source() -> ArraySource:
    return ArraySource(*SIZE)


@pytest.fixture
async def server(nursery: trio.Nursery, source: ArraySource) -> AsyncIterator[Server]:
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True, handshake_timeout=2)
    yield await nursery.start(trivnc.serve, config)


class Scroller:
    """Scrolls a text page inside AREA by one line per step, with a frame
    counter drawn over the top-left of the area, and waits for each step
    to be published as one new version."""

    def __init__(self, server: Server, source: ArraySource) -> None:
        self.server = server
        self.source = source
        self.page = document(AREA.w, 200, seed=9)
        self.step = 0

    async def show(self) -> None:
        service = self.server.service
        assert service.latest is not None
        version = service.latest.version
        self.source.pixels[AREA.slices()] = self.page[self.step * LINE : self.step * LINE + AREA.h]
        self.source.pixels[MARKER.slices()] = (self.step * 37 % 256, 0, 255, 0)
        self.source.mark_changed(AREA)
        with trio.fail_after(5):
            while service.latest is None or service.latest.version <= version:
                await trio.sleep(0.005)
        self.step += 1


def session_bytes(server: Server) -> list[int]:
    return [s.stats.bytes_sent for s in sorted(server.context.sessions, key=lambda s: s.id)]


async def update(c: VncClient, source: ArraySource) -> set[int]:
    await c.request_update(incremental=True)
    upd = await c.next_update()
    assert np.array_equal(c.framebuffer[..., :3], source.pixels[..., :3])
    return {e for _, e in upd.pixel_rects}


async def test_scrolling_text_goes_as_copyrect_and_stays_exact(
    server: Server, source: ArraySource
) -> None:
    scroller = Scroller(server, source)
    await scroller.show()
    lossless = [Encoding.ZRLE]
    async with (
        open_test_client(
            "127.0.0.1", server.rfb_port, encodings=[*lossless, Encoding.COPY_RECT]
        ) as a,
        open_test_client("127.0.0.1", server.rfb_port, encodings=lossless) as b,
    ):
        await a.screenshot()
        await b.screenshot()
        before = session_bytes(server)
        for _ in range(12):
            await scroller.show()
            frame = server.service.latest
            assert frame is not None and frame.moves
            assert Encoding.COPY_RECT in await update(a, source)
            assert Encoding.COPY_RECT not in await update(b, source)
        after = session_bytes(server)
    with_copy, without = (y - x for x, y in zip(before, after, strict=True))
    assert with_copy * 5 < without, (with_copy, without)


async def test_a_lagging_client_gets_pixels_and_stays_exact(
    server: Server, source: ArraySource
) -> None:
    scroller = Scroller(server, source)
    await scroller.show()
    async with open_test_client("127.0.0.1", server.rfb_port) as c:
        await c.screenshot()
        for i in range(8):
            await scroller.show()
            if i % 2:
                # It missed a version: moves from the one before are no use.
                await scroller.show()
                assert Encoding.COPY_RECT not in await update(c, source)
            else:
                assert Encoding.COPY_RECT in await update(c, source)


async def test_copies_never_read_what_the_client_has_not_been_sent(
    server: Server, source: ArraySource
) -> None:
    scroller = Scroller(server, source)
    await scroller.show()
    async with open_test_client("127.0.0.1", server.rfb_port) as c:
        await c.screenshot()
        await scroller.show()
        # The client asks for the top half only: the bottom half of the
        # scrolled area stays owed to it...
        await c.request_update(incremental=True, rect=Rect(0, 0, SIZE[0], 160))
        await c.next_update()
        await scroller.show()
        # ...so the next scroll must not copy from there.
        await update(c, source)
        for _ in range(3):
            await scroller.show()
            await update(c, source)
        # A non-incremental request is answered with pixels only.
        await scroller.show()
        await c.request_update(incremental=False)
        upd = await c.next_update()
        assert Encoding.COPY_RECT not in {e for _, e in upd.pixel_rects}
        assert np.array_equal(c.framebuffer[..., :3], source.pixels[..., :3])


async def test_scroll_detection_time_is_in_the_frame_spans(
    server: Server, source: ArraySource
) -> None:
    scroller = Scroller(server, source)
    await scroller.show()
    await scroller.show()
    frame = server.service.latest
    assert frame is not None and frame.moves
    assert "ScrollDetection" in frame.timing.spans


def test_an_area_where_nothing_moves_is_searched_less_often() -> None:
    rng = np.random.default_rng(3)
    area = Rect(0, 0, 640, 480)
    frames = [rng.integers(0, 256, (480, 640, 4), dtype=np.uint8) for _ in range(40)]
    page = document(640, 80, seed=5)
    detector = ScrollDetector()
    calls = []
    real = scroll._detect

    def counting(*args: object, **kw: object) -> object:
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scroll, "_detect", counting)
        for v in range(1, 40):
            assert detector.detect(v, frames[v - 1], v + 1, frames[v], [area]) == []
        assert len(calls) < 12
        # A scroll there is found again within BACKOFF frames.
        found = []
        for i in range(scroll.BACKOFF + 1):
            old = screen_with(page, i * LINE, area, (640, 480))
            new = screen_with(page, (i + 1) * LINE, area, (640, 480))
            found += detector.detect(100 + i, old, 101 + i, new, [area])
        assert found and all(m.dy == LINE for m in found)


@pytest.mark.realclient
@pytest.mark.xvfb
async def test_tigervnc_viewer_follows_scrolls_exactly(
    server: Server, source: ArraySource, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TigerVNC's viewer offers CopyRect: after a run of scrolls sent as
    # copies, its screen is the source's, pixel for pixel (ZRLE is lossless).
    import shutil
    import subprocess

    from trivnc.server import copyrect
    from trivnc.testing.xvfb import Xvfb

    viewer_bin = shutil.which("xtigervncviewer")
    if viewer_bin is None or shutil.which("Xvfb") is None:
        pytest.skip("needs xtigervncviewer and Xvfb")
    copies: list[int] = []
    real_plan = copyrect.plan

    def counting_plan(*args: Any) -> tuple[list[Any], list[Rect]]:
        planned, rects = real_plan(*args)
        copies.append(len(planned))
        return planned, rects

    monkeypatch.setattr(copyrect, "plan", counting_plan)
    scroller = Scroller(server, source)
    await scroller.show()
    with Xvfb(*SIZE) as xvfb:
        viewer = subprocess.Popen(
            [
                viewer_bin,
                "-FullScreen",
                "-PreferredEncoding=ZRLE",
                "-AutoSelect=0",
                "-SecurityTypes=None",
                "-Shared=1",
                f"127.0.0.1::{server.rfb_port}",
            ],
            env=xvfb.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            async def screen_matches() -> bool:
                shot = await trio.to_thread.run_sync(xvfb.screenshot)
                want = source.pixels[..., :3]
                return bool(np.array_equal(shot[: SIZE[1], : SIZE[0], :3], want))

            with trio.fail_after(30):
                while not await screen_matches():
                    await trio.sleep(0.2)
                for _ in range(40):
                    await scroller.show()
                    await trio.sleep(0.03)
                while not await screen_matches():
                    await trio.sleep(0.2)
        finally:
            viewer.terminate()
            viewer.wait(5)
    assert sum(copies) >= 10, copies

"""Tile damage, rect merging and the framebuffer service's versions."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from trivnc.framebuffer.damage import TILE, changed_tiles, full_mask, mask_to_rects, rect_to_mask
from trivnc.framebuffer.service import FramebufferService
from trivnc.geometry import Rect
from trivnc.sources.array import ArraySource
from trivnc.sources.base import Damage
from trivnc.testing.images import desktop_like


def reference_tiles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    out = np.zeros((-(-h // TILE), -(-w // TILE)), bool)
    for ty in range(out.shape[0]):
        for tx in range(out.shape[1]):
            sl = (slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
            out[ty, tx] = not np.array_equal(a[sl], b[sl])
    return out


@pytest.mark.parametrize(("w", "h"), [(1, 1), (64, 64), (65, 63), (200, 130), (333, 77)])
def test_changed_tiles_matches_reference(w: int, h: int) -> None:
    rng = np.random.default_rng(w * h)
    a = rng.integers(0, 256, (h, w, 4), np.uint8)
    b = a.copy()
    for _ in range(5):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        b[y, x, int(rng.integers(0, 3))] ^= 0xFF
    assert np.array_equal(changed_tiles(a, b, Damage(full=True)), reference_tiles(a, b))
    # A hint covering the changed pixels finds the same tiles; one that misses finds none.
    assert np.array_equal(changed_tiles(a, b, Damage((Rect(0, 0, w, h),))), reference_tiles(a, b))
    assert not changed_tiles(a, a.copy(), Damage(full=True)).any()


@pytest.mark.parametrize("seed", range(6))
def test_changed_tiles_in_hinted_regions_matches_reference(seed: int) -> None:
    # Hints at odd and even offsets and widths, inside and at the frame's edges.
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(100, 700)), int(rng.integers(100, 500))
    a = rng.integers(0, 256, (h, w, 4), np.uint8)
    b = a.copy()
    hints = []
    for _ in range(3):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        rw, rh = int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1))
        hints.append(Rect(x, y, rw, rh))
        for _ in range(4):
            px, py = x + int(rng.integers(0, rw)), y + int(rng.integers(0, rh))
            b[py, px, int(rng.integers(0, 4))] ^= 0x5A
    expected = reference_tiles(a, b)
    got = changed_tiles(a, b, Damage(tuple(hints)))
    # Every change lies under a hint, so the hinted compare finds them all.
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("width", [700, 701])
def test_changed_tiles_mixes_wholly_changed_bands_and_single_pixels(width: int) -> None:
    # A band where a video plays (found from sampled rows) above bands where
    # one pixel changed (found only by comparing every row), both widths'
    # word sizes, and a hint that starts mid-tile.
    rng = np.random.default_rng(width)
    a = rng.integers(0, 256, (300, width, 4), np.uint8)
    b = a.copy()
    b[10:140] ^= 0x33
    b[203, 333, 1] ^= 1
    b[299, width - 1, 0] ^= 1
    for hint in (Damage(full=True), Damage((Rect(5, 3, width - 5, 297),))):
        assert np.array_equal(changed_tiles(a, b, hint), reference_tiles(a, b))


def test_hints_restrict_the_search() -> None:
    a = np.zeros((256, 256, 4), np.uint8)
    b = a.copy()
    b[10, 10] = 1
    b[200, 200] = 1
    mask = changed_tiles(a, b, Damage((Rect(0, 0, 20, 20),)))
    assert mask[0, 0] and mask.sum() == 1


def test_mask_to_rects_covers_exactly_the_dirty_tiles() -> None:
    rng = np.random.default_rng(5)
    w, h = 300, 250
    for _ in range(20):
        mask = rng.random((-(-h // TILE), -(-w // TILE))) < 0.4
        rects = mask_to_rects(mask, w, h)
        covered = np.zeros((h, w), np.int32)
        for r in rects:
            covered[r.slices()] += 1
        assert covered.max() <= 1  # no overlaps
        for ty in range(mask.shape[0]):
            for tx in range(mask.shape[1]):
                tile = covered[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]
                assert (tile == 1).all() if mask[ty, tx] else (tile == 0).all()
    assert mask_to_rects(full_mask(w, h), w, h) == [Rect(0, 0, w, h)]
    assert rect_to_mask(Rect(63, 0, 2, 1), w, h).sum() == 2


async def test_service_versions_and_damage_history() -> None:
    source = ArraySource.from_array(desktop_like(200, 150))
    service = FramebufferService(source, max_frame_rate=30)
    published = []
    service.subscribe(lambda: published.append(service.latest.version if service.latest else 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        first = service.latest
        assert first is not None and first.version == 1
        assert not first.pixels.flags.writeable
        source.pixels[0:5, 0:5] = 7
        source.mark_changed(Rect(0, 0, 5, 5))
        with trio.fail_after(5):
            while service.latest is None or service.latest.version < 2:
                await trio.sleep(0.01)
        mask = service.damage_since(1)
        assert mask is not None and mask[0, 0] and mask.sum() == 1
        # A mark with no real change publishes nothing.
        source.mark_changed(Rect(100, 100, 5, 5))
        await trio.sleep(0.5)
        assert service.latest is not None and service.latest.version == 2
        timing = service.timings.get(2)
        assert timing is not None and {"Screenshot", "Analysis"} <= set(timing.spans)
        assert timing.changed_area == 64 * 64
        assert service.damage_since(0) is not None
        nursery.cancel_scope.cancel()
    assert published == [1, 2]


async def test_a_change_drawn_in_steps_within_the_deferral_is_one_frame() -> None:
    source = ArraySource.from_array(np.zeros((256, 256, 4), np.uint8))
    service = FramebufferService(source, defer_update=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await trio.sleep(0.1)  # a quiet spell: the service waits for damage
        source.pixels[0:10, 0:10] = 1
        source.mark_changed(Rect(0, 0, 10, 10))
        await trio.sleep(0.05)  # the application is still drawing its frame
        source.pixels[200:210, 200:210] = 2
        source.mark_changed(Rect(200, 200, 10, 10))
        with trio.fail_after(5):
            while service.latest is None or service.latest.version < 2:
                await trio.sleep(0.01)
        await trio.sleep(0.3)
        latest = service.latest
        assert latest is not None and latest.version == 2  # one capture for both steps
        assert latest.pixels[5, 5, 0] == 1 and latest.pixels[205, 205, 0] == 2
        nursery.cancel_scope.cancel()


async def test_service_keeps_to_max_frame_rate_on_average() -> None:
    """However often the source changes, captures average at most
    max_frame_rate a second (a late one may let the next come sooner, never
    more than one interval's credit)."""
    source = ArraySource.from_array(desktop_like(200, 150))
    service = FramebufferService(source, max_frame_rate=20, defer_update=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)

        async def churn() -> None:
            i = 0
            while True:
                source.pixels[0:5, 0:5] = i % 256
                source.mark_changed(Rect(0, 0, 5, 5))
                i += 1
                await trio.sleep(0.002)

        nursery.start_soon(churn)
        await trio.sleep(0.3)
        assert service.latest is not None
        start_version, start = service.latest.version, trio.current_time()
        await trio.sleep(1.5)
        published = service.latest.version - start_version
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert published <= 20 * elapsed + 2
    assert published >= 20 * elapsed * 0.7

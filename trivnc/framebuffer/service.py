# The framebuffer service: the one owner of the desktop's pixels. It pulls
# from a Source (wait for damage, capture, compare tiles), publishes immutable
# Frames with a version number and timing spans, and keeps a short history of
# which tiles each version changed, so that every client session can ask
# "what changed since the version I last sent?" and get one coalesced answer.
# It never waits for a client: a slow session simply asks later and gets a
# bigger union.
from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import trio

from ..geometry import Rect
from ..sources.base import Damage, Pixels, Source
from .damage import TILE, TileMask, changed_tiles, full_mask
from .scroll import Move, ScrollDetector, search_areas
from .timing import FrameTiming, TimingHistory

log = logging.getLogger(__name__)

#: Damage hints kept per update at most; beyond, updates go as whole tiles.
MAX_HINTS = 64


@dataclass(frozen=True, eq=False)
class Frame:
    """A published picture of the desktop. Its pixels are never written again,
    so encoders read them from worker threads without locks."""

    version: int
    pixels: Pixels
    timing: FrameTiming
    #: Parts of this frame that are exact copies of the previous version's
    #: pixels elsewhere (scrolls), found by content: sessions whose client
    #: has exactly that version may send them as CopyRect.
    moves: tuple[Move, ...] = ()

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


class FramebufferService:
    """The one owner of the desktop's pixels. `run()` (started by
    `trivnc.serve`) waits for the source's damage, defers briefly, captures
    and compares tiles in a worker thread, and publishes an immutable `Frame`
    with a new version, its tile mask and its timing spans; subscribers are
    called on the trio thread. Sessions ask `damage_since(version)` and
    `hints_since(version)` for what changed since the frame they last sent,
    and the developer API reads `timings`."""

    def __init__(
        self,
        source: Source,
        *,
        max_frame_rate: float = 60.0,
        limiter: trio.CapacityLimiter | None = None,
        defer_update: float = 0.004,
        damage_history: int = 120,
        timing_history: int = 256,
        detect_scrolls: bool = True,
    ) -> None:
        if max_frame_rate <= 0:
            raise ValueError("max_frame_rate must be positive")
        self.source = source
        self.max_frame_rate = max_frame_rate
        #: Seconds to wait after the first damage of a quiet spell before
        #: capturing (Xvnc's DeferUpdate): an application draws a frame in
        #: several requests, and one capture of the whole costs less than a
        #: capture and an update for each part.
        self.defer_update = defer_update
        self.limiter = limiter or trio.CapacityLimiter(2)
        self.latest: Frame | None = None
        self.timings = TimingHistory(timing_history)
        #: (version, changed tiles, the damage hints behind them or None).
        self._masks: deque[tuple[int, TileMask, tuple[Rect, ...] | None]] = deque(
            maxlen=damage_history
        )
        self._subscribers: set[Callable[[], None]] = set()
        self._force_full = False
        self._waiting: trio.CancelScope | None = None
        self._ready = trio.Event()
        #: Scroll search (None: off); used only in the capture worker thread.
        self._scroll: ScrollDetector | None = ScrollDetector() if detect_scrolls else None

    # -- consumers -----------------------------------------------------------------

    def subscribe(self, on_publish: Callable[[], None]) -> Callable[[], None]:
        """Call `on_publish` (on the trio thread) after each new frame; returns
        the function that unsubscribes."""
        self._subscribers.add(on_publish)
        return lambda: self._subscribers.discard(on_publish)

    async def wait_ready(self) -> Frame:
        await self._ready.wait()
        assert self.latest is not None
        return self.latest

    def damage_since(self, version: int) -> TileMask | None:
        """Tiles changed after `version` up to the latest frame; None means
        "everything" (the version is too old, or the size changed since)."""
        latest = self.latest
        if latest is None:
            return None
        if version >= latest.version:
            return np.zeros_like(self._masks[-1][1]) if self._masks else None
        if not self._masks or self._masks[0][0] > version + 1:
            return None
        out: TileMask | None = None
        for v, mask, _ in self._masks:
            if v > version:
                out = mask.copy() if out is None else (out | mask)
        return out

    def hints_since(self, version: int) -> list[Rect] | None:
        """The source's damage rects behind the tiles changed after `version`:
        every changed pixel lies in one of them, so an update may be cut to
        them rather than sent as whole tiles. None when unknown (a full or
        rect-less hint, a forced capture, a resize, too many rects)."""
        if not self._masks or self._masks[0][0] > version + 1:
            return None
        out: list[Rect] = []
        for v, _, hints in self._masks:
            if v > version:
                if hints is None:
                    return None
                out.extend(hints)
                if len(out) > MAX_HINTS:
                    return None
        return out

    def record_encoding(
        self, version: int, encoder: str, cpu: float, count: int, area: int
    ) -> None:
        timing = self.timings.get(version)
        if timing is not None:
            timing.add_encoder(encoder, cpu, count, area)

    def record_update_sent(
        self,
        version: int,
        encode_start: float,
        encode_end: float,
        written: float,
        scaling: float = 0.0,
    ) -> None:
        """A session wrote the update of frame `version` (perf_counter marks)."""
        timing = self.timings.get(version)
        if timing is not None:
            timing.update_sent(encode_start, encode_end, written, scaling)

    def request_full_frame(self) -> None:
        """Capture a new frame now, counted as wholly changed, even on a
        still desktop (the API's frame stats and send_full_frame)."""
        self._force_full = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def _next_damage(self) -> Damage:
        """The source's next damage, or a full frame when one is requested
        meanwhile (the wait is cancelled; sources' wait_damage keeps what it
        gathered when cancelled)."""
        if self._force_full:
            return Damage(full=True)
        ready = self.source.take_damage()
        if ready is not None:
            # It gathered while the loop was pacing itself: already deferred.
            return ready
        with trio.CancelScope() as scope:
            self._waiting = scope
            try:
                damage = await self.source.wait_damage()
            finally:
                self._waiting = None
            if self.defer_update > 0 and not damage.full:
                await trio.sleep(self.defer_update)
                more = self.source.take_damage()
                if more is not None:
                    damage = _merge(damage, more)
            return damage
        return Damage(full=True)

    # -- the loop -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.source.run)
            await self._capture(Damage(full=True))
            task_status.started()
            interval = 1.0 / self.max_frame_rate
            next_allowed = slot = trio.current_time()
            while True:
                # Pace first, then collect the damage: whatever changed while
                # we slept is coalesced by the source into one hint.
                await trio.sleep_until(next_allowed)
                damage = await self._next_damage()
                started = trio.current_time()
                await self._capture(damage)
                # Captures keep to a schedule of one per interval on average,
                # not a fixed gap after each: a capture that came late (the
                # application drew late, the machine was busy) lets the next
                # come up to half an interval sooner, so a 60 fps video is not
                # aliased into dropped frames by jitter. Credit is at most one
                # interval, so max_frame_rate holds over any two frames.
                slot = max(slot, started - interval) + interval
                next_allowed = max(slot, started + interval / 2, trio.current_time())

    async def _capture(self, damage: Damage) -> None:
        prev = self.latest
        version = prev.version + 1 if prev else 1
        width, height = self.source.size
        timing = FrameTiming(version, width, height)
        force = self._force_full
        previous = None if prev is None or force else prev.pixels
        scroll = self._scroll

        def capture_and_compare() -> tuple[Pixels, TileMask, list[Move], list[float]]:
            # One worker-thread trip per frame for all steps: each trip to a
            # thread and back costs about as much as comparing the tiles.
            started = time.perf_counter()
            pixels = self.source.capture(damage)
            captured = time.perf_counter()
            h, w = pixels.shape[:2]
            moves: list[Move] = []
            if previous is None or previous.shape != pixels.shape:
                mask = full_mask(w, h)
                return pixels, mask, moves, [captured - started, time.perf_counter() - captured]
            mask = changed_tiles(previous, pixels, damage)
            compared = time.perf_counter()
            spans = [captured - started, compared - captured]
            if scroll is not None and prev is not None:
                areas = search_areas(mask, _damage_box(damage), w, h)
                if areas:
                    moves = scroll.detect(prev.version, previous, version, pixels, areas)
                    spans.append(time.perf_counter() - compared)
            return pixels, mask, moves, spans

        pixels, mask, moves, spans = await trio.to_thread.run_sync(
            capture_and_compare, limiter=self.limiter
        )
        timing.spans["Screenshot"] = spans[0]
        timing.spans["Analysis"] = spans[1]
        if len(spans) > 2:
            timing.spans["ScrollDetection"] = spans[2]
        pixels.flags.writeable = False
        height, width = pixels.shape[:2]
        timing.width, timing.height = width, height
        if prev is not None and not mask.any():
            return  # nothing really changed: no version, no bytes
        if force:
            # Only the request this capture served: one made while it ran
            # gets a capture of its own.
            self._force_full = False
        if prev is not None and prev.pixels.shape != pixels.shape:
            self._masks.clear()  # older masks have another shape; sessions resend all
            log.info("desktop size is now %dx%d", width, height)
        timing.changed_area = _mask_area(mask, width, height)
        frame = Frame(version, pixels, timing, tuple(moves))
        exact = (
            previous is not None
            and previous.shape == pixels.shape
            and not damage.full
            and bool(damage.rects)
        )
        self._masks.append((version, mask, damage.rects if exact else None))
        self.timings.add(timing)
        self.latest = frame
        self._ready.set()
        for notify in list(self._subscribers):
            notify()


def _merge(a: Damage, b: Damage) -> Damage:
    if a.full or b.full or not a.rects or not b.rects:
        # No rects means "look everywhere", which covers the other hint.
        return Damage(full=a.full or b.full)
    return Damage(a.rects + b.rects)


def _damage_box(damage: Damage) -> Rect | None:
    """The bounding box of a damage hint's rects (None: anywhere)."""
    if damage.full or not damage.rects:
        return None
    box = Rect(0, 0, 0, 0)
    for r in damage.rects:
        box = box.union(r)
    return box


def _mask_area(mask: TileMask, width: int, height: int) -> int:
    """Pixels covered by the dirty tiles (edge tiles count only their part)."""
    return int(_tile_areas(width, height)[mask].sum())


@functools.lru_cache(maxsize=4)
def _tile_areas(width: int, height: int) -> npt.NDArray[np.int64]:
    """Each tile's pixel count, for a frame size (computed once per size, not
    per frame)."""
    tiles_y, tiles_x = -(-height // TILE), -(-width // TILE)
    tile_w = np.minimum(TILE, width - np.arange(tiles_x) * TILE)
    tile_h = np.minimum(TILE, height - np.arange(tiles_y) * TILE)
    areas = np.outer(tile_h, tile_w).astype(np.int64)
    areas.flags.writeable = False
    return areas

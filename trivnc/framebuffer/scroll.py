# Scroll detection from pixels. Xvnc learns about scrolls from the X drawing
# requests (CopyArea) and sends them as CopyRect; trivnc only sees captured
# pixels, so it finds them by content: when text scrolls, most rows of the
# damaged area reappear in the previous frame a fixed number of rows away.
#
# How: the damaged area is cut into vertical strips of STRIP pixels and each
# row of each strip gets a 32-bit hash (pixels times fixed odd weights, summed
# with wrap-around, one einsum over the area). Rows whose hash is unique in
# the previous frame's strip vote for the offset at which they reappear;
# blank and repeated rows do not vote. For the best offsets the matching
# strip-rows are grouped into rectangles of at least MIN_RUN rows, and every
# rectangle is then checked pixel for pixel (rows, then the columns it is
# widened by), so a hash collision can only lose a move, never produce wrong
# pixels. Working per strip lets a scrolling column inside a wider damage box
# (a browser page beside a changing sidebar) be found too.
#
# Cost: a first vote uses only PROBES strips, so that a video (nothing
# votes) costs a fraction of one hash of the area. While something scrolls,
# ScrollDetector first tries the last frame's moves again with one exact
# comparison (no hashing); see bench/scroll_detect.py for figures.
#
# Only vertical moves (dx = 0) are detected: horizontal scrolls and window
# moves in two directions would need shift-invariant hashes.
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..geometry import Rect
from ..sources.base import Pixels
from .damage import TILE, TileMask, mask_to_rects

#: Width in pixels of the strips that rows are hashed in.
STRIP = 64
#: Fewest rows a move must span.
MIN_RUN = 16
#: Fewest strip-rows that must vote for an offset before it is tried.
MIN_VOTES = 8
#: Offsets tried per area, best voted first.
MAX_CANDIDATES = 3
#: Strips that vote for offsets when the old frame's hashes are not at hand.
PROBES = 4
#: After this many searches of the same area in a row found nothing (a video
#: playing there), the area is searched only once every BACKOFF frames.
IDLE_SEARCHES = 4
BACKOFF = 8
#: Areas smaller than this are not searched (a move there saves little).
MIN_AREA = 64 * 64
#: Widest frame the weights cover; wider frames are not searched.
MAX_WIDTH = 16384

_U32 = npt.NDArray[np.uint32]
_Bool = npt.NDArray[np.bool_]

# Odd weights, one per pixel column, fixed so that hashes of two frames agree.
_WEIGHTS: _U32 = (
    np.random.default_rng(0x5C7011).integers(0, 1 << 32, MAX_WIDTH, dtype=np.uint32) | 1
).astype(np.uint32)


class Move(NamedTuple):
    """new[dst] == old[dst shifted by (dx, dy)], pixel for pixel: the
    destination can be drawn by copying from the source (CopyRect)."""

    dst: Rect
    dx: int
    dy: int

    @property
    def src(self) -> Rect:
        return Rect(self.dst.x + self.dx, self.dst.y + self.dy, self.dst.w, self.dst.h)


def strip_hashes(pixels: Pixels, area: Rect) -> _U32:
    """(rows, strips) hashes of `area`'s rows, per STRIP-wide strip."""
    words = _pixel_words(pixels[area.slices()])
    weights = _WEIGHTS[area.x : area.right]
    whole = area.w // STRIP * STRIP
    out = np.empty((area.h, -(-area.w // STRIP)), np.uint32)
    if whole:
        # einsum's integer loops are twice as fast as multiply + reduceat.
        out[:, : whole // STRIP] = np.einsum(
            "ijk,jk->ij",
            words[:, :whole].reshape(area.h, -1, STRIP),
            weights[:whole].reshape(-1, STRIP),
        )
    if whole < area.w:
        out[:, -1] = np.einsum("ij,j->i", words[:, whole:], weights[whole:])
    return out


def _probe_hashes(pixels: Pixels, area: Rect, strips: list[int]) -> _U32:
    """strip_hashes for a few strips only: (rows, len(strips))."""
    words = _pixel_words(pixels[area.slices()])
    out = np.empty((area.h, len(strips)), np.uint32)
    for i, s in enumerate(strips):
        x0, x1 = s * STRIP, min((s + 1) * STRIP, area.w)
        out[:, i] = np.einsum("ij,j->i", words[:, x0:x1], _WEIGHTS[area.x + x0 : area.x + x1])
    return out


def _pixel_words(block: Pixels) -> _U32:
    """(rows, columns) uint32 view of an (h, w, 4) block of pixels."""
    if block.strides[1:] != (4, 1):
        block = np.ascontiguousarray(block)
    words: _U32 = block.view(np.uint32)[..., 0]
    return words


def _probe_strips(strips: int) -> list[int]:
    """Up to PROBES strips spread over the width, that vote for offsets."""
    return sorted({round(i * (strips - 1) / max(1, PROBES - 1)) for i in range(PROBES)})


def _words(block: Pixels) -> npt.NDArray[np.unsignedinteger[Any]]:
    """(rows, words) view of an (h, w, 4) block: two pixels per uint64 when
    the width is even (half the elements to compare), else one per uint32."""
    if block.shape[1] % 2 == 0 and block.strides[1:] == (4, 1):
        return block.reshape(block.shape[0], -1).view(np.uint64)
    return _pixel_words(block)


def _runs(flags: _Bool, min_length: int) -> list[tuple[int, int]]:
    """[start, end) of the runs of True at least `min_length` long."""
    padded = np.concatenate(([False], flags, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1]).tolist()
    return [(s, e) for s, e in zip(edges[::2], edges[1::2], strict=True) if e - s >= min_length]


def _vote(new_h: _U32, old_h: _U32) -> list[int]:
    """Offsets dy (new row r shows old row r + dy) voted for by changed
    strip-rows whose hash occurs once in the old strip, best first."""
    rows, strips = old_h.shape
    sid = np.arange(strips, dtype=np.uint64)
    old_keys = ((old_h.astype(np.uint64) << np.uint64(32)) | sid).ravel()
    # Stable is several times faster here: numpy's default quicksort slows
    # down on the many equal keys of blank rows.
    order = np.argsort(old_keys, kind="stable")
    keys = old_keys[order]
    same = keys[1:] == keys[:-1]
    unique = np.ones(keys.size, np.bool_)
    unique[1:] &= ~same
    unique[:-1] &= ~same
    cells = np.flatnonzero((new_h != old_h).ravel())
    new_keys = ((new_h.astype(np.uint64) << np.uint64(32)) | sid).ravel()[cells]
    pos = np.minimum(np.searchsorted(keys, new_keys), keys.size - 1)
    hit = (keys[pos] == new_keys) & unique[pos]
    if np.count_nonzero(hit) < MIN_VOTES:
        return []
    dy = order[pos[hit]] // strips - cells[hit] // strips
    values, counts = np.unique(dy, return_counts=True)
    best = np.argsort(-counts, kind="stable")[:MAX_CANDIDATES]
    return [
        int(values[i])
        for i in best
        if counts[i] >= MIN_VOTES and values[i] != 0 and abs(values[i]) <= rows - MIN_RUN
    ]


def _equal_rows(new: Pixels, old: Pixels, y0: int, y1: int, x0: int, x1: int, dy: int) -> _Bool:
    """Per row y in [y0, y1): new[y, x0:x1] == old[y + dy, x0:x1] exactly."""
    a = _words(new[y0:y1, x0:x1])
    b = _words(old[y0 + dy : y1 + dy, x0:x1])
    result: _Bool = (a == b).all(axis=1)
    return result


def _equal_columns(new: Pixels, old: Pixels, y0: int, y1: int, x0: int, x1: int, dy: int) -> _Bool:
    """Per column x in [x0, x1): new[y0:y1, x] == old[y0+dy:y1+dy, x] exactly."""
    a = _pixel_words(new[y0:y1, x0:x1])
    b = _pixel_words(old[y0 + dy : y1 + dy, x0:x1])
    result: _Bool = (a == b).all(axis=0)
    return result


def _widen(
    new: Pixels, old: Pixels, area: Rect, y0: int, y1: int, x0: int, x1: int, dy: int
) -> tuple[int, int]:
    """Grow [x0, x1) by the pixel columns next to it (up to a strip each
    side, within the area) that match exactly over rows y0..y1."""
    left = max(area.x, x0 - STRIP)
    if left < x0:
        bad = np.flatnonzero(~_equal_columns(new, old, y0, y1, left, x0, dy))
        x0 = left + (int(bad[-1]) + 1 if bad.size else 0)
    right = min(area.right, x1 + STRIP)
    if right > x1:
        bad = np.flatnonzero(~_equal_columns(new, old, y0, y1, x1, right, dy))
        x1 = x1 + (int(bad[0]) if bad.size else right - x1)
    return x0, x1


class _Found(NamedTuple):
    version: int
    area: Rect
    moves: list[Move]


class ScrollDetector:
    """`detect_moves` for a stream of frames. While something scrolls, each
    new frame is first checked for the same moves as the last one (same
    columns and offset, any rows): one exact comparison of the area, no
    hashing. Only when that explains less than half as much as before does
    the full search run. An area where searches keep finding nothing (a
    video) is searched only every BACKOFF frames."""

    def __init__(self) -> None:
        self._last: list[_Found] = []
        #: Searches in a row that found nothing, by area (last frame's areas).
        self._misses: dict[Rect, int] = {}

    def detect(
        self, old_version: int, old: Pixels, version: int, new: Pixels, areas: list[Rect]
    ) -> list[Move]:
        """Moves from `old` (frame `old_version`) to `new` (frame `version`)
        within `areas`; destinations do not overlap."""
        kept: list[_Found] = []
        misses: dict[Rect, int] = {}
        moves: list[Move] = []
        if old.shape != new.shape:
            areas = []
        for wanted in areas:
            area = wanted.intersect(Rect(0, 0, new.shape[1], new.shape[0]))
            if not searchable(area, new):
                continue
            last = next(
                (k for k in self._last if k.version == old_version and k.area == area), None
            )
            missed = self._misses.get(area, 0)
            found: list[Move] = []
            if last is not None:
                found = _follow(old, new, area, last.moves)
                before = sum(m.dst.area for m in last.moves)
                if 2 * sum(m.dst.area for m in found) < before:
                    found = []
            if not found and (missed < IDLE_SEARCHES or missed % BACKOFF == 0):
                found = _detect(old, new, area)
            misses[area] = 0 if found else missed + 1
            if found:
                kept.append(_Found(version, area, found))
            for move in found:
                if not any(_overlap(move.dst, m.dst) for m in moves):
                    moves.append(move)
        self._last = kept
        self._misses = misses
        return moves


def _follow(old: Pixels, new: Pixels, area: Rect, last: list[Move]) -> list[Move]:
    """The last frame's moves again (their columns and offsets), wherever in
    `area` their rows match exactly now. A run of rows that did not change
    at all (blank lines that match blank lines) is left out."""
    out: list[Move] = []
    for prior in last:
        dy = prior.dy
        x0, x1 = prior.dst.x, prior.dst.right
        y0, y1 = max(area.y, area.y - dy), min(area.bottom, area.bottom - dy)
        if x0 < area.x or x1 > area.right or y1 - y0 < MIN_RUN:
            continue
        exact = _equal_rows(new, old, y0, y1, x0, x1, dy)
        for r0, r1 in _runs(exact, MIN_RUN):
            dst = Rect(x0, y0 + r0, x1 - x0, r1 - r0)
            sample = slice(dst.y, dst.bottom, 8)
            if np.array_equal(new[sample, x0:x1], old[sample, x0:x1]):
                continue  # nothing changed there: no use copying
            if not any(_overlap(dst, m.dst) for m in out):
                out.append(Move(dst, 0, dy))
    return out


def searchable(area: Rect, pixels: Pixels) -> bool:
    """Whether `area` of frames like `pixels` is worth a search."""
    return (
        area.area >= MIN_AREA
        and area.h >= 2 * MIN_RUN
        and area.w >= 16
        and pixels.shape[1] <= MAX_WIDTH
        and pixels.dtype == np.uint8
        and pixels.ndim == 3
        and pixels.shape[2] == 4
    )


def detect_moves(old: Pixels, new: Pixels, area: Rect) -> list[Move]:
    """Vertical moves inside `area` from `old` to `new` (frames of the same
    shape): rects of `new` that are exact copies of `old` some rows away.
    Destinations do not overlap one another. Empty for small areas."""
    if old.shape != new.shape:
        return []
    area = area.intersect(Rect(0, 0, new.shape[1], new.shape[0]))
    if not searchable(area, new):
        return []
    return _detect(old, new, area)


def _overlap(a: Rect, b: Rect) -> bool:
    return not a.intersect(b).is_empty()


def _detect(old: Pixels, new: Pixels, area: Rect) -> list[Move]:
    """The moves in one area. A few probe strips vote first, so that a video
    (no offsets) costs a fraction of one hash of the area."""
    strips = -(-area.w // STRIP)
    probes = _probe_strips(strips)
    candidates = _vote(_probe_hashes(new, area, probes), _probe_hashes(old, area, probes))
    if not candidates:
        return []
    old_h = strip_hashes(old, area)
    new_h = strip_hashes(new, area)
    changed = new_h != old_h
    rows = area.h
    covered = np.zeros_like(changed)
    moves: list[Move] = []
    for dy in candidates:
        lo, hi = max(0, -dy), min(rows, rows - dy)
        match = np.zeros_like(changed)
        match[lo:hi] = new_h[lo:hi] == old_h[lo + dy : hi + dy]
        match &= ~covered
        useful = changed & match
        helps = useful.sum(axis=0)
        hurts = (changed & ~match).sum(axis=0)
        active = (helps > 0) & (helps >= hurts)
        quiet = ~changed.any(axis=0)
        for s0, s1 in _runs(active | quiet, 1):
            # The strips that took part, without quiet ones at the ends (a
            # quiet strip of static content would break every row's match).
            inside = np.flatnonzero(active[s0:s1])
            if inside.size == 0:
                continue
            sa, sb = s0 + int(inside[0]), s0 + int(inside[-1]) + 1
            ok = match[:, sa:sb].all(axis=1)
            for r0, r1 in _runs(ok, MIN_RUN):
                if not useful[r0:r1, sa:sb].any():
                    continue
                a, b = sa, sb
                while a > 0 and match[r0:r1, a - 1].all():
                    a -= 1
                while b < strips and match[r0:r1, b].all():
                    b += 1
                covered[r0:r1, a:b] = True
                x0, x1 = area.x + a * STRIP, min(area.x + b * STRIP, area.right)
                y0 = area.y + r0
                # The hashes only proposed this: the pixels decide.
                exact = _equal_rows(new, old, y0, area.y + r1, x0, x1, dy)
                for e0, e1 in _runs(exact, MIN_RUN):
                    if not useful[r0 + e0 : r0 + e1, a:b].any():
                        continue
                    w0, w1 = _widen(new, old, area, y0 + e0, y0 + e1, x0, x1, dy)
                    dst = Rect(w0, y0 + e0, w1 - w0, e1 - e0)
                    if any(_overlap(dst, m.dst) for m in moves):
                        dst = Rect(x0, y0 + e0, x1 - x0, e1 - e0)
                        if any(_overlap(dst, m.dst) for m in moves):
                            continue
                    moves.append(Move(dst, 0, dy))
    return moves


def search_areas(mask: TileMask, damage_box: Rect | None, width: int, height: int) -> list[Rect]:
    """Where to look for moves in a frame: the changed tiles' bounding box
    (or its rects, when they fill little of it), cut to the box of the
    source's damage rects when those are known."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    ty0, ty1, tx0, tx1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = Rect(tx0 * TILE, ty0 * TILE, (tx1 - tx0) * TILE, (ty1 - ty0) * TILE)
    box = box.intersect(Rect(0, 0, width, height))
    if 2 * np.count_nonzero(mask) >= (ty1 - ty0) * (tx1 - tx0):
        rects = [box]
    else:
        rects = mask_to_rects(mask, width, height)
    if damage_box is not None:
        rects = [r.intersect(damage_box) for r in rects]
    return [r for r in rects if r.area >= MIN_AREA]


__all__ = [
    "MIN_RUN",
    "STRIP",
    "Move",
    "ScrollDetector",
    "detect_moves",
    "search_areas",
    "strip_hashes",
]

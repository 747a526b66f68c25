# Change detection by tile comparison. Sources give damage hints (XDamage
# rectangles, an application's mark_changed); hints say where to look, the tile
# compare says what really changed, so a window that redraws identical pixels
# costs no bytes on the wire. Tiles are 64x64, as ZRLE's and KasmVNC's.
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..geometry import Rect
from ..sources.base import Damage, Pixels

TILE = 64
TileMask = npt.NDArray[np.bool_]


def tile_grid(width: int, height: int) -> tuple[int, int]:
    """(tile rows, tile columns) covering a width x height frame."""
    return -(-height // TILE), -(-width // TILE)


def full_mask(width: int, height: int) -> TileMask:
    return np.ones(tile_grid(width, height), np.bool_)


def empty_mask(width: int, height: int) -> TileMask:
    return np.zeros(tile_grid(width, height), np.bool_)


def _compare_region(
    prev: Pixels, cur: Pixels, ty0: int, ty1: int, tx0: int, tx1: int, out: TileMask
) -> None:
    """Mark the changed tiles among rows ty0..ty1 and columns tx0..tx1."""
    h, w = cur.shape[:2]
    y0, y1 = ty0 * TILE, min(ty1 * TILE, h)
    x0, x1 = tx0 * TILE, min(tx1 * TILE, w)
    # One uint32 per pixel: a 4x cheaper compare than per byte. Frames are
    # (h, w, 4) uint8 with a contiguous last axis, so the view needs no copy.
    ne = prev[y0:y1, x0:x1].view(np.uint32)[..., 0] != cur[y0:y1, x0:x1].view(np.uint32)[..., 0]
    row_any = ne.any(axis=1)
    row_starts = np.arange(0, y1 - y0, TILE)
    col_starts = np.arange(0, x1 - x0, TILE)
    dirty_rows = np.logical_or.reduceat(row_any, row_starts)
    for i in np.flatnonzero(dirty_rows):
        band = ne[i * TILE : (i + 1) * TILE]
        out[ty0 + i, tx0 : tx0 + len(col_starts)] |= np.logical_or.reduceat(
            band.any(axis=0), col_starts
        )


def changed_tiles(prev: Pixels | None, cur: Pixels, damage: Damage) -> TileMask:
    """Tiles whose pixels differ between prev and cur, looking only where the
    damage hint points (everywhere for a full or empty hint)."""
    h, w = cur.shape[:2]
    if prev is None or prev.shape != cur.shape:
        return full_mask(w, h)
    out = empty_mask(w, h)
    nty, ntx = out.shape
    if damage.full or not damage.rects:
        _compare_region(prev, cur, 0, nty, 0, ntx, out)
        return out
    for rect in damage.rects:
        r = rect.intersect(Rect(0, 0, w, h))
        if r.is_empty():
            continue
        _compare_region(
            prev, cur, r.y // TILE, -(-r.bottom // TILE), r.x // TILE, -(-r.right // TILE), out
        )
    return out


def mask_to_rects(mask: TileMask, width: int, height: int) -> list[Rect]:
    """Dirty tiles as few rects: runs along each tile row, then runs with the
    same columns merged down, clipped to the frame."""
    open_runs: dict[tuple[int, int], Rect] = {}
    done: list[Rect] = []
    for ty in range(mask.shape[0]):
        row = mask[ty]
        runs: set[tuple[int, int]] = set()
        if row.any():
            padded = np.concatenate(([False], row, [False]))
            edges = np.flatnonzero(padded[1:] != padded[:-1])
            runs = {(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)}
        for key in list(open_runs):
            if key not in runs:
                done.append(open_runs.pop(key))
        for s, e in runs:
            y = ty * TILE
            h = min(TILE, height - y)
            if (s, e) in open_runs:
                r = open_runs[(s, e)]
                open_runs[(s, e)] = Rect(r.x, r.y, r.w, r.h + h)
            else:
                x = s * TILE
                open_runs[(s, e)] = Rect(x, y, min(e * TILE, width) - x, h)
    done.extend(open_runs.values())
    done.sort(key=lambda r: (r.y, r.x))
    return done


def rect_to_mask(rect: Rect, width: int, height: int) -> TileMask:
    """Tiles touched by rect."""
    out = empty_mask(width, height)
    r = rect.intersect(Rect(0, 0, width, height))
    if not r.is_empty():
        out[r.y // TILE : -(-r.bottom // TILE), r.x // TILE : -(-r.right // TILE)] = True
    return out

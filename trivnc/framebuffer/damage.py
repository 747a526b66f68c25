# Change detection by tile comparison. Sources give damage hints (XDamage
# rectangles, an application's mark_changed); hints say where to look, the tile
# compare says what really changed, so a window that redraws identical pixels
# costs no bytes on the wire. Tiles are 64x64, as ZRLE's and KasmVNC's.
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from ..geometry import Rect
from ..sources.base import Damage, Pixels

TILE = 64
#: Rows compared first, one in this many (a divisor of TILE).
ROW_STEP = 16
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
    rows = y1 - y0
    cols = slice(0, tx1 - tx0)
    full_width = (x1 - x0) * 5 >= w * 2 and prev.flags.c_contiguous and cur.flags.c_contiguous
    if full_width:
        # numpy compares contiguous memory about 2.5 times faster than rows
        # with gaps between them, so a wide region is compared across the
        # whole width and the extra columns are dropped afterwards.
        cols = slice(tx0, tx1)
        x0, x1 = 0, w
    pa, pb = prev[y0:y1, x0:x1], cur[y0:y1, x0:x1]
    # Compare whole words: two pixels per uint64 where the width is even (4x
    # and 2x fewer elements than per byte or per pixel). Frames are (h, w, 4)
    # uint8 with contiguous rows of pixels, so these views copy nothing.
    wa: npt.NDArray[np.unsignedinteger[Any]]
    wb: npt.NDArray[np.unsignedinteger[Any]]
    if (x1 - x0) % 2 == 0:
        wa, wb = pa.reshape(rows, -1).view(np.uint64), pb.reshape(rows, -1).view(np.uint64)
        per_tile = TILE // 2
    else:
        wa, wb = pa.view(np.uint32)[..., 0], pb.view(np.uint32)[..., 0]
        per_tile = TILE
    # Every ROW_STEP-th row first: where a video plays, every tile differs
    # there already, and the other rows need not be read. Bands with a tile
    # not found changed this way are compared in full.
    tiles = _tiles(wa[::ROW_STEP] != wb[::ROW_STEP], TILE // ROW_STEP, per_tile)
    unsure = np.flatnonzero(~tiles[:, cols].all(axis=1))
    if unsure.size == tiles.shape[0]:
        tiles |= _tiles(wa != wb, TILE, per_tile)
    else:
        for band in unsure.tolist():
            rs = slice(band * TILE, (band + 1) * TILE)
            tiles[band] |= _tiles(wa[rs] != wb[rs], TILE, per_tile)[0]
    tiles = tiles[:, cols]
    out[ty0 : ty0 + tiles.shape[0], tx0 : tx0 + tiles.shape[1]] |= tiles


def _tiles(ne: npt.NDArray[np.bool_], band_rows: int, per_tile: int) -> TileMask:
    """Per-word differences (rows of one region) -> changed tiles: fold each
    band of rows into one row (a reduction over a reshaped view is several
    times faster than reduceat), then each tile's words."""
    return _fold(_fold(ne, band_rows).T, per_tile).T


def _fold(ne: npt.NDArray[np.bool_], size: int) -> npt.NDArray[np.bool_]:
    """OR together each run of `size` rows of `ne` (the last run may be short)."""
    rows = ne.shape[0]
    whole = rows // size
    parts = []
    if whole:
        parts.append(np.logical_or.reduce(ne[: whole * size].reshape(whole, size, -1), axis=1))
    if rows % size:
        parts.append(ne[whole * size :].any(axis=0, keepdims=True))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


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
    same columns merged down, clipped to the frame. Remembered for the last
    few masks: viewers that keep up all ask for the same one."""
    return list(_mask_rects(np.packbits(mask).tobytes(), mask.shape, width, height))


@functools.lru_cache(maxsize=16)
def _mask_rects(packed: bytes, shape: tuple[int, ...], width: int, height: int) -> tuple[Rect, ...]:
    mask = np.unpackbits(np.frombuffer(packed, np.uint8), count=shape[0] * shape[1])
    return tuple(_runs_to_rects(mask.reshape(shape).astype(np.bool_), width, height))


def _runs_to_rects(mask: TileMask, width: int, height: int) -> list[Rect]:
    open_runs: dict[tuple[int, int], Rect] = {}
    done: list[Rect] = []
    last_row = -2
    # Only rows with dirty tiles are visited: most updates touch a few.
    for ty in np.flatnonzero(mask.any(axis=1)).tolist():
        if ty != last_row + 1:
            done.extend(open_runs.values())
            open_runs = {}
        last_row = ty
        padded = np.concatenate(([False], mask[ty], [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1]).tolist()
        runs = set(zip(edges[::2], edges[1::2], strict=True))
        for key in [k for k in open_runs if k not in runs]:
            done.append(open_runs.pop(key))
        y = ty * TILE
        h = min(TILE, height - y)
        for s, e in runs:
            r = open_runs.get((s, e))
            if r is not None:
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

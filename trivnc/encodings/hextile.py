# The Hextile encoding, RFC 6143 section 7.7.4 (rfbproto "Hextile Encoding").
#
# 16x16 tiles (the last column and row smaller), each either raw or an RRE
# variant: a background, and subrects in one foreground colour (mono) or each
# with its own colour (coloured). Per tile the smaller of raw and the subrect
# form is sent; subrects come from rre.find_subrects (row runs merged down).
#
# Background and foreground carry over from tile to tile, with the rules of
# rfbproto "Hextile Encoding" applied exactly:
#   - the first non-raw tile of the rect specifies its background;
#   - after a raw tile neither background nor foreground carries over;
#   - after a tile with SubrectsColoured the foreground does not carry over;
#   - a tile without subrects passes on the foreground it received.
# The choice of tile form ignores the few bytes that carrying over saves;
# the carry-over flags are then computed for all tiles at once.
#
# A 1080p frame has 8160 tiles, so there is no per-tile Python: tiles are
# classified with numpy in batches (solid from the run counts, two-colour
# from four pixel passes, the rest's background from one sort), and every
# tile's bytes are written into one buffer at computed offsets. Raw tiles
# are copied as whole rows of tiles and joined in tile order at the end.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from ..rfb.constants import Encoding, HextileMask
from ..rfb.pixelformat import PixelFormat
from .base import Payload, Pixels
from .rre import Subrects, find_subrects
from .zrle import (
    IntArray,
    Keys,
    TileBlock,
    TileStream,
    pixel_keys,
    row_changes,
    tile_blocks,
    tile_runs,
    two_colours,
    wire_bytes,
)

TILE: Final = 16
MAX_SUBRECTS: Final = 255  # the count is a U8

# Tile forms.
RAW: Final = 0
SOLID: Final = 1  # background only
MONO: Final = 2  # subrects in the foreground colour
COLOURED: Final = 3  # subrects each with a colour


@dataclass
class _Tiles:
    """What the classification decided for every tile of the rect."""

    ntiles: int
    dtype: np.dtype[np.unsignedinteger]
    form: npt.NDArray[np.int8] = field(init=False)
    background: Keys = field(init=False)
    foreground: Keys = field(init=False)
    subrects: list[tuple[IntArray, Subrects]] = field(default_factory=list)  # (tile ids, rects)

    def __post_init__(self) -> None:
        self.form = np.full(self.ntiles, -1, np.int8)
        self.background = np.zeros(self.ntiles, self.dtype)
        self.foreground = np.zeros(self.ntiles, self.dtype)


def _mode_of_rows(tiles: Keys) -> Keys:
    """The most frequent key of each row of (k, n) keys (one sort)."""
    k, n = tiles.shape
    ordered = np.sort(tiles, axis=1).reshape(-1)
    heads = np.empty(ordered.size, np.bool_)
    heads[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=heads[1:])
    heads[::n] = True
    starts = np.flatnonzero(heads)
    first = np.searchsorted(starts, np.arange(k) * n)
    length = np.diff(starts, append=ordered.size).astype(np.int64)
    # Longest run per row: the length in the high bits picks it, the run's
    # index in the low bits says which one it was.
    best = np.maximum.reduceat((length << 32) | np.arange(len(starts)), first)
    mode: Keys = ordered[starts[best & 0xFFFFFFFF]]
    return mode


def _classify_block(
    tiles_info: _Tiles,
    raw_parts: TileStream,
    keys: Keys,
    changes: npt.NDArray[np.bool_],
    block: TileBlock,
    ntx: int,
    bpp: int,
) -> None:
    th, tw = block.th, block.tw
    n = th * tw
    k4 = block.view(keys)
    ids4 = block.tile_ids(ntx)
    runs = tile_runs(keys, block, changes)

    solid = runs == 1
    ids = ids4[solid]
    tiles_info.form[ids] = SOLID
    tiles_info.background[ids] = k4[:, 0, :, 0][solid]

    ty, tx = np.nonzero(~solid)
    if len(ty) == 0:
        return
    ids = ids4[ty, tx]
    tiles = k4[ty, :, tx, :].reshape(len(ty), n)
    raw = np.zeros(len(ty), np.bool_)

    # Two colours: mono subrects on the more common colour.
    first, second, other, two = two_colours(tiles)
    if two.any():
        first_wins = np.count_nonzero(~other[two], axis=1) * 2 >= n
        bg = np.where(first_wins, first[two], second[two])
        fg = np.where(first_wins, second[two], first[two])
        subs = find_subrects(tiles[two].reshape(-1, th, tw), bg)
        count = np.bincount(subs.tile, minlength=len(bg))
        # mask, bg, fg, count, 2 bytes per subrect; against mask + raw pixels
        fits = (count <= MAX_SUBRECTS) & (2 * bpp + 1 + 2 * count < n * bpp)
        _keep(tiles_info, ids[two], fits, MONO, bg, fg, subs)
        raw[np.flatnonzero(two)[~fits]] = True

    # Three or more colours: coloured subrects on the most common colour.
    # Tiles with more runs than half their pixels are noise-like (photos,
    # dithering) and go raw without a search: bounded work per tile.
    many = ~two
    cheap = many & (runs[ty, tx] * 2 <= n)
    raw |= many & ~cheap
    if cheap.any():
        bg = _mode_of_rows(tiles[cheap])
        subs = find_subrects(tiles[cheap].reshape(-1, th, tw), bg)
        count = np.bincount(subs.tile, minlength=len(bg))
        fits = (count <= MAX_SUBRECTS) & (bpp + 1 + (bpp + 2) * count < n * bpp)
        _keep(tiles_info, ids[cheap], fits, COLOURED, bg, bg, subs)
        raw[np.flatnonzero(cheap)[~fits]] = True

    if raw.any():
        tiles_info.form[ids[raw]] = RAW
        out = np.empty((int(raw.sum()), 1 + n * bpp), np.uint8)
        out[:, 0] = HextileMask.RAW
        out[:, 1:] = wire_bytes(tiles[raw]).reshape(len(out), n * bpp)
        raw_parts.add(ids[raw], out, np.arange(len(out) + 1) * (1 + n * bpp))


def _keep(
    tiles_info: _Tiles,
    ids: IntArray,
    fits: npt.NDArray[np.bool_],
    form: int,
    bg: Keys,
    fg: Keys,
    subs: Subrects,
) -> None:
    """Record the tiles (of a batch) that take the subrect form."""
    tiles_info.form[ids[fits]] = form
    tiles_info.background[ids[fits]] = bg[fits]
    tiles_info.foreground[ids[fits]] = fg[fits]
    keep = fits[subs.tile]
    tiles_info.subrects.append(
        (
            ids,
            Subrects(
                subs.tile[keep],
                subs.x[keep],
                subs.y[keep],
                subs.w[keep],
                subs.h[keep],
                subs.value[keep],
            ),
        )
    )


def _carry_over(
    form: npt.NDArray[np.int8], bg: Keys, fg: Keys
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which tiles must specify their background and foreground."""
    t = len(form)
    prev_form = np.concatenate(([RAW], form[:-1]))
    prev_bg = np.concatenate((bg[:1], bg[:-1]))
    # The first non-raw tile sees prev_form RAW (the rect start counts as raw).
    bg_spec = (form != RAW) & ((prev_form == RAW) | (prev_bg != bg))
    # The foreground state a tile receives is set by the last earlier tile
    # that is not SOLID: valid only if that tile was MONO.
    setter = np.maximum.accumulate(np.where(form != SOLID, np.arange(t), -1))
    before = np.concatenate(([-1], setter[:-1]))
    valid = (before >= 0) & (form[np.maximum(before, 0)] == MONO)
    same = fg[np.maximum(before, 0)] == fg
    fg_spec = (form == MONO) & ~(valid & same)
    return bg_spec, fg_spec


def _write_subrect_tiles(stream: TileStream, tiles_info: _Tiles, bpp: int) -> None:
    """All non-raw tiles into one buffer at computed offsets."""
    form = tiles_info.form
    ids = np.flatnonzero(form != RAW)
    if len(ids) == 0:
        return
    bg_spec, fg_spec = _carry_over(form, tiles_info.background, tiles_info.foreground)
    nsub = np.zeros(len(form), np.intp)
    for batch_ids, subs in tiles_info.subrects:
        nsub += np.bincount(batch_ids[subs.tile], minlength=len(form))
    coloured = form == COLOURED
    sub_size = np.where(coloured, bpp + 2, 2)
    # (bool + bool is a logical or in numpy: count in integers)
    n_pixels = bg_spec.astype(np.intp) + fg_spec.astype(np.intp)
    size = (1 + n_pixels * bpp + np.where(nsub > 0, 1 + nsub * sub_size, 0))[ids]
    bounds = np.zeros(len(ids) + 1, np.intp)
    np.cumsum(size, out=bounds[1:])
    buf = np.empty(bounds[-1], np.uint8)
    start = np.zeros(len(form), np.intp)
    start[ids] = bounds[:-1]

    mask = (
        bg_spec * int(HextileMask.BACKGROUND_SPECIFIED)
        + fg_spec * int(HextileMask.FOREGROUND_SPECIFIED)
        + (nsub > 0) * int(HextileMask.ANY_SUBRECTS)
        + (coloured & (nsub > 0)) * int(HextileMask.SUBRECTS_COLOURED)
    )
    buf[start[ids]] = mask[ids]
    at = start + 1
    _put_pixels(buf, at[bg_spec], tiles_info.background[bg_spec], bpp)
    at = at + bg_spec * bpp
    _put_pixels(buf, at[fg_spec], tiles_info.foreground[fg_spec], bpp)
    at = at + fg_spec * bpp
    has = nsub > 0
    buf[at[has]] = nsub[has]
    first_sub = at + 1

    for batch_ids, subs in tiles_info.subrects:
        if len(subs.x) == 0:
            continue
        tile = batch_ids[subs.tile]
        # Rank of each subrect within its tile: they come grouped by tile.
        counts = np.bincount(subs.tile, minlength=len(batch_ids))
        firsts = np.zeros(len(counts) + 1, np.intp)
        np.cumsum(counts, out=firsts[1:])
        rank = np.arange(len(tile)) - firsts[subs.tile]
        pos = first_sub[tile] + rank * sub_size[tile]
        if coloured[tile[0]]:
            _put_pixels(buf, pos, subs.value, bpp)
            pos = pos + bpp
        buf[pos] = (subs.x << 4) | subs.y
        buf[pos + 1] = ((subs.w - 1) << 4) | (subs.h - 1)
    stream.add(ids, buf, bounds)


def _put_pixels(buf: npt.NDArray[np.uint8], pos: IntArray, values: Keys, bpp: int) -> None:
    if len(pos) == 0:
        return
    pixel = wire_bytes(values)
    for c in range(bpp):
        buf[pos + c] = pixel[:, c]


def encode_hextile(pixels: Pixels, pf: PixelFormat) -> bytes:
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        return b""
    bpp = pf.bytes_per_pixel
    keys = pixel_keys(pixels, pf)
    changes = row_changes(keys, TILE)
    ntx = -(-w // TILE)
    ntiles = -(-h // TILE) * ntx
    tiles_info = _Tiles(ntiles, keys.dtype)
    stream = TileStream(ntiles)
    for block in tile_blocks(h, w, TILE):
        _classify_block(tiles_info, stream, keys, changes, block, ntx, bpp)
    _write_subrect_tiles(stream, tiles_info, bpp)
    return stream.join()


class HextileEncoder:
    """Hextile. Stateless: bg/fg carry-over never crosses rects."""

    encoding = Encoding.HEXTILE

    def encode(self, pixels: Pixels, pf: PixelFormat) -> Payload:
        return [encode_hextile(pixels, pf)]

# The ZRLE encoding, RFC 6143 section 7.7.6 (rfbproto "ZRLE Encoding").
#
# The rect is cut into 64x64 tiles (the last column and row smaller). Each tile
# is sent as raw CPIXELs, one solid CPIXEL, a packed palette of 2-16 colours,
# plain RLE, or palette RLE, whichever is smallest before compression; the
# tile stream then goes through ONE zlib stream per connection, sync-flushed
# per rect, behind a U32 length.
#
# Theory of operation. A 1920x1080 frame has 510 tiles, and the target is
# 100 megapixels/s on one core, about 40 us per tile including zlib. So no
# step loops over pixels or runs in Python, and only the final join loops over
# (runs of consecutive) tiles:
#   1. Pixels become integer keys in the client's format (equal key = equal
#      CPIXEL). Runs are counted for every tile at once from one not-equal pass
#      over the whole rect; a tile with one run is solid.
#   2. Photo-like tiles: if a sample of 4 rows already holds more than 127
#      colours (no palette can exist) and the run count makes plain RLE bigger
#      than raw, the tile is raw. Such tiles cost a sample sort and a copy.
#   3. Text-like tiles: exactly two colours (four pixel passes tell) and at
#      least as many runs as a 1-bit packed tile has index bytes, so palette
#      RLE cannot beat packed: written packed straight from the pixel masks.
#   4. The rest: the runs of all of them are found together (one flatnonzero).
#      Palettes come from "peeling": a tile's first two runs are its first two
#      colours; each further round takes every tile's first run of a colour
#      not seen yet, over the shrinking set of unmatched runs. After a few
#      rounds the rest of bigger palettes comes from one sort.
#   5. Exact sizes of raw, plain RLE, palette RLE and packed palette are
#      computed per tile from run lengths and palette sizes, the smallest
#      wins, and each subencoding is written for all its tiles at once into
#      one buffer at computed offsets.
#   6. The tiles' byte ranges are joined in tile order and compressed.
#
# The helpers for keys, tile blocks and run counts are shared with the
# Hextile and RRE encoders.
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from zlib_ng import zlib_ng

from ..rfb.constants import Encoding
from ..rfb.pixelformat import PixelFormat
from .base import Payload, Pixels

TILE: Final = 64

#: Subencoding bytes (rfbproto "ZRLE Encoding").
RAW: Final = 0
SOLID: Final = 1
PLAIN_RLE: Final = 128
PALETTE_RLE_BASE: Final = 128  # + palette size (2..127)

MAX_PACKED_PALETTE: Final = 16
MAX_RLE_PALETTE: Final = 127
#: Palette colours found by peeling rounds; the rest of a bigger palette comes
#: from one sort. Each round costs a pass over the unmatched runs.
_PEEL_ROUNDS: Final = 5
#: Pixels sampled per tile to prove "more than 127 colours" cheaply.
_SAMPLE_ROWS: Final = 4

_LITTLE_ENDIAN_HOST: Final = sys.byteorder == "little"
_HAVE_POPCOUNT: Final = hasattr(np, "bitwise_count")  # numpy >= 2.0

Keys = npt.NDArray[np.unsignedinteger]
IntArray = npt.NDArray[np.intp]
U8Array = npt.NDArray[np.uint8]


# -- CPIXEL ---------------------------------------------------------------------


@dataclass(frozen=True)
class CPixel:
    """Which bytes of a wire PIXEL make up the CPIXEL: `size` bytes from
    `offset`, both in wire byte order."""

    offset: int
    size: int


def colour_mask(pf: PixelFormat) -> int:
    """The bits of a pixel value that carry colour."""
    return (
        (pf.red_max << pf.red_shift)
        | (pf.green_max << pf.green_shift)
        | (pf.blue_max << pf.blue_shift)
    )


def cpixel_layout(pf: PixelFormat) -> CPixel:
    """RFC 6143 7.7.6: 3 bytes when true colour, 32 bpp, depth <= 24 and the
    colour bits fit in the least (preferred) or most significant 3 bytes."""
    bpp = pf.bytes_per_pixel
    if pf.bits_per_pixel != 32 or pf.depth > 24:
        return CPixel(0, bpp)
    mask = colour_mask(pf)
    if mask < 1 << 24:
        # Least significant bytes: the first three on a little-endian wire.
        return CPixel(1 if pf.big_endian else 0, 3)
    if mask & 0xFF == 0:
        return CPixel(0 if pf.big_endian else 1, 3)
    return CPixel(0, bpp)


def pixel_keys(pixels: Pixels, pf: PixelFormat) -> Keys:
    """(h, w) integers whose native-order bytes are the wire PIXELs, with the
    unused bits cleared, so equal keys mean equal CPIXELs.

    Clearing matters for trivnc's own BGRX format, which passes the frame
    through and whose pad byte is whatever X11 left there. The result is a
    new array: the frame itself is never written.
    """
    bpp = pf.bytes_per_pixel
    wire = pf.encode_pixels(pixels)
    dtype = np.dtype(f"=u{bpp}")
    order: Literal["big", "little"] = "big" if pf.big_endian else "little"
    native_mask = np.frombuffer(colour_mask(pf).to_bytes(bpp, order), dtype)[0]
    keys: Keys = np.bitwise_and(wire.view(dtype)[..., 0], native_mask)
    return keys


def wire_bytes(values: Keys) -> U8Array:
    """Keys of any shape -> their PIXEL bytes, shape (..., bytes per pixel)."""
    v = np.ascontiguousarray(values)
    return v.view(np.uint8).reshape((*v.shape, v.dtype.itemsize))


def cpixel_bytes(values: Keys, cp: CPixel) -> U8Array:
    """Keys of any shape -> their CPIXEL bytes, shape (..., cp.size)."""
    return wire_bytes(values)[..., cp.offset : cp.offset + cp.size]


def cpixel_rows(values: Keys, cp: CPixel) -> U8Array:
    """(k, n) keys -> (k, n * cp.size) contiguous CPIXEL bytes."""
    k, n = values.shape
    if cp.size == 3 and values.dtype.itemsize == 4 and n % 4 == 0 and _LITTLE_ENDIAN_HOST:
        # Copying 3 of every 4 bytes is a slow strided byte loop in numpy;
        # packing four 24-bit values into three 32-bit words is ~4x faster.
        v: npt.NDArray[Any] = values.reshape(k, n // 4, 4)
        if cp.offset:
            v = v >> 8
        out = np.empty((k, n // 4, 3), np.uint32)
        out[..., 0] = v[..., 0] | (v[..., 1] << 24)
        out[..., 1] = (v[..., 1] >> 8) | (v[..., 2] << 16)
        out[..., 2] = (v[..., 2] >> 16) | (v[..., 3] << 8)
        return out.view(np.uint8).reshape(k, n * 3)
    return np.ascontiguousarray(cpixel_bytes(values, cp)).reshape(k, n * cp.size)


# -- helpers for building many variable-length tiles at once ----------------------


def _exclusive_cumsum(sizes: npt.NDArray[np.integer]) -> IntArray:
    out = np.zeros(len(sizes) + 1, np.intp)
    np.cumsum(sizes, out=out[1:])
    return out


def _put_cpixels(buf: U8Array, pos: IntArray, values: Keys, cp: CPixel) -> None:
    """Write each value's CPIXEL at buf[pos[i]:pos[i] + cp.size]."""
    cbytes = cpixel_bytes(values, cp)
    for c in range(cp.size):
        buf[pos + c] = cbytes[:, c]


def _put_palettes(
    buf: U8Array, tile_start: IntArray, psize: IntArray, palette: Keys, cp: CPixel
) -> None:
    """Palettes follow the subencoding byte; `palette` is all tiles' entries in
    tile order, psize[t] of them for tile t."""
    first = _exclusive_cumsum(psize)
    j = np.arange(first[-1]) - np.repeat(first[:-1], psize)
    _put_cpixels(buf, np.repeat(tile_start + 1, psize) + j * cp.size, palette, cp)


class TileStream:
    """Encoded tiles, produced out of order (by subencoding), joined in tile
    order at the end. Each part is a buffer and the byte range of each of its
    tiles."""

    def __init__(self, ntiles: int) -> None:
        self._part = np.full(ntiles, -1, np.intp)
        self._start = np.zeros(ntiles, np.intp)
        self._end = np.zeros(ntiles, np.intp)
        self._buffers: list[memoryview] = []

    def add(self, tile_ids: IntArray, buf: U8Array, bounds: IntArray) -> None:
        self._part[tile_ids] = len(self._buffers)
        self._start[tile_ids] = bounds[:-1]
        self._end[tile_ids] = bounds[1:]
        self._buffers.append(np.ascontiguousarray(buf).reshape(-1).data)

    def join(self) -> bytes:
        if (self._part < 0).any():
            raise AssertionError("a tile was not encoded")
        part, start, end = self._part, self._start, self._end
        # Tiles that follow each other in the same buffer become one slice:
        # a photo's raw tiles join as a few slices rather than one per tile.
        new = np.ones(len(part), np.bool_)
        new[1:] = (part[1:] != part[:-1]) | (start[1:] != end[:-1])
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(part)) - 1
        bufs = self._buffers
        return b"".join(
            [
                bufs[p][s:e]
                for p, s, e in zip(
                    part[first].tolist(), start[first].tolist(), end[last].tolist(), strict=True
                )
            ]
        )


# -- the tile grid ---------------------------------------------------------------


@dataclass(frozen=True)
class TileBlock:
    """A block of equally sized tiles of a grid of `size` x `size` tiles:
    `ny` x `nx` tiles of th x tw pixels, the first being (ty, tx)."""

    size: int
    ty: int
    tx: int
    ny: int
    nx: int
    th: int
    tw: int

    @property
    def rows(self) -> slice:
        return slice(self.ty * self.size, self.ty * self.size + self.ny * self.th)

    @property
    def cols(self) -> slice:
        return slice(self.tx * self.size, self.tx * self.size + self.nx * self.tw)

    def view(self, keys: Keys) -> Keys:
        """The block's keys as (ny, th, nx, tw), a view."""
        block: Keys = keys[self.rows, self.cols].reshape(self.ny, self.th, self.nx, self.tw)
        return block

    def tile_ids(self, ntx: int) -> IntArray:
        """Each tile's index in the rect's row-major tile order, (ny, nx)."""
        ids: IntArray = (self.ty + np.arange(self.ny))[:, None] * ntx + self.tx + np.arange(self.nx)
        return ids


def tile_blocks(h: int, w: int, size: int) -> list[TileBlock]:
    """The full tiles, the narrower last column, the shorter last row and the
    corner: at most four blocks, each a reshape away from (ny, th, nx, tw)."""
    fy, fx = divmod(h, size), divmod(w, size)
    rows = [(0, fy[0], size), (fy[0], 1, fy[1])]
    cols = [(0, fx[0], size), (fx[0], 1, fx[1])]
    return [
        TileBlock(size, ty, tx, ny, nx, th, tw)
        for ty, ny, th in rows
        for tx, nx, tw in cols
        if ny and nx and th and tw
    ]


def row_changes(keys: Keys, size: int) -> npt.NDArray[np.bool_]:
    """changes[y, x]: pixel (x, y) differs from (x + 1, y) in the same tile."""
    h, w = keys.shape
    flat = keys.reshape(-1)
    changes = np.empty(h * w, np.bool_)
    # One pass over the flat array is ~4x faster than over 2-d row slices; the
    # comparisons that wrap from one row to the next are cleared below.
    np.not_equal(flat[1:], flat[:-1], out=changes[:-1])
    out = changes.reshape(h, w)
    out[:, w - 1] = False
    out[:, size - 1 :: size] = False
    return out


def tile_runs(keys: Keys, block: TileBlock, changes: npt.NDArray[np.bool_]) -> IntArray:
    """Number of runs of each tile of the block, pixels read in row order,
    (ny, nx); `changes` is row_changes(keys, block.size)."""
    k = block.view(keys)
    c = changes[block.rows, block.cols].reshape(block.ny, block.th, block.nx, block.tw)
    if block.tw % 8 == 0 and _HAVE_POPCOUNT:
        # 8 bools are one uint64 word; a popcount of those is ~10x faster than
        # count_nonzero over the strided 4-d view.
        words = np.bitwise_count(c.view(np.uint64))
        within = np.add.reduce(words, axis=1, dtype=np.intp).sum(axis=2)
    else:
        within = np.count_nonzero(c, axis=(1, 3))
    runs: IntArray = 1 + within
    if block.th > 1:
        # A run goes on from a row's last pixel to the next row's first.
        runs += np.count_nonzero(k[:, 1:, :, 0] != k[:, :-1, :, -1], axis=1)
    return runs


# -- per-subencoding writers (all tiles of a kind at once) ------------------------


def _write_solid(stream: TileStream, ids: IntArray, values: Keys, cp: CPixel) -> None:
    out = np.empty((len(ids), 1 + cp.size), np.uint8)
    out[:, 0] = SOLID
    out[:, 1:] = cpixel_bytes(values, cp)
    stream.add(ids, out, np.arange(len(ids) + 1) * (1 + cp.size))


def _write_raw(stream: TileStream, ids: IntArray, tiles: Keys, cp: CPixel) -> None:
    k = len(ids)
    n = tiles.shape[1] * tiles.shape[2]
    out = np.empty((k, 1 + n * cp.size), np.uint8)
    out[:, 0] = RAW
    out[:, 1:] = cpixel_rows(tiles.reshape(k, n), cp)
    stream.add(ids, out, np.arange(k + 1) * (1 + n * cp.size))


@dataclass
class _Runs:
    """The runs of k tiles, in tile order then pixel order."""

    tile: IntArray  # which of the k tiles (0..k-1)
    value: Keys
    length: IntArray
    first: IntArray  # (k + 1,) index of each tile's first run, then the total

    def head(self, m: int) -> _Runs:
        """The runs of the first m tiles (views, no copy)."""
        end = self.first[m]
        return _Runs(self.tile[:end], self.value[:end], self.length[:end], self.first[: m + 1])

    def select(self, chosen: npt.NDArray[np.bool_]) -> tuple[_Runs, npt.NDArray[np.bool_]]:
        """The runs of the chosen tiles, renumbered 0..chosen.sum()-1."""
        mask = chosen[self.tile]
        counts = np.diff(self.first)[chosen]
        sub = _Runs(
            np.repeat(np.arange(len(counts)), counts),
            self.value[mask],
            self.length[mask],
            _exclusive_cumsum(counts),
        )
        return sub, mask


def _write_plain_rle(stream: TileStream, ids: IntArray, runs: _Runs, cp: CPixel) -> None:
    # Run: CPIXEL, then (length - 1) // 255 bytes of 255, then (length - 1) % 255.
    ext = (runs.length - 1) // 255
    size = cp.size + 1 + ext
    pos = _exclusive_cumsum(size)
    run_at = pos[:-1] + runs.tile + 1  # each tile so far adds its subencoding byte
    bounds = pos[runs.first] + np.arange(len(ids) + 1)
    buf = np.full(bounds[-1], 255, np.uint8)
    buf[bounds[:-1]] = PLAIN_RLE
    _put_cpixels(buf, run_at, runs.value, cp)
    buf[run_at + size - 1] = (runs.length - 1) % 255
    stream.add(ids, buf, bounds)


def _write_palette_rle(
    stream: TileStream,
    ids: IntArray,
    runs: _Runs,
    index: npt.NDArray[np.uint8],
    psize: IntArray,
    palette: Keys,
    cp: CPixel,
) -> None:
    # Run of one: the index. Longer: index | 128, then the length as plain RLE.
    long = runs.length > 1
    ext = (runs.length - 1) // 255
    size = np.where(long, 2 + ext, 1)
    header = 1 + psize * cp.size
    header_upto = np.cumsum(header)  # header bytes up to and including each tile
    pos = _exclusive_cumsum(size)
    run_at = pos[:-1] + header_upto[runs.tile]
    bounds = pos[runs.first] + np.concatenate(([0], header_upto))
    buf = np.full(bounds[-1], 255, np.uint8)
    buf[bounds[:-1]] = PALETTE_RLE_BASE + psize
    _put_palettes(buf, bounds[:-1], psize, palette, cp)
    buf[run_at] = index | (long.astype(np.uint8) << 7)
    buf[(run_at + size - 1)[long]] = ((runs.length - 1) % 255)[long]
    stream.add(ids, buf, bounds)


def _packed_bits(psize: IntArray) -> IntArray:
    bits: IntArray = np.where(psize <= 2, 1, np.where(psize <= 4, 2, 4))
    return bits


def _pack_indices(index: U8Array, bits: int) -> U8Array:
    """(k, th, tw) palette indices -> (k, th, row bytes), MSB first, each row
    padded to a whole byte."""
    if bits == 1:
        packed: U8Array = np.packbits(index, axis=2)
        return packed
    per_byte = 8 // bits
    k, th, tw = index.shape
    padded = np.zeros((k, th, -(-tw // per_byte) * per_byte), np.uint8)
    padded[..., :tw] = index
    shifted: npt.NDArray[Any] = padded[..., 0::per_byte] << (8 - bits)
    for i in range(1, per_byte):
        shifted |= padded[..., i::per_byte] << (8 - bits * (i + 1))
    return shifted.astype(np.uint8, copy=False)


def _write_packed(
    stream: TileStream,
    ids: IntArray,
    pixels: U8Array,
    psize: IntArray,
    palette: Keys,
    cp: CPixel,
) -> None:
    """Tiles that all use the same number of bits per index; `pixels` are
    their palette indices, (k, th, tw)."""
    k = len(ids)
    bits = int(_packed_bits(psize[:1])[0])
    packed = _pack_indices(pixels, bits).reshape(k, -1)
    header = 1 + psize * cp.size
    bounds = _exclusive_cumsum(header + packed.shape[1])
    buf = np.empty(bounds[-1], np.uint8)
    buf[bounds[:-1]] = psize
    _put_palettes(buf, bounds[:-1], psize, palette, cp)
    at = (bounds[:-1] + header)[:, None] + np.arange(packed.shape[1])
    buf[at] = packed
    stream.add(ids, buf, bounds)


# -- palettes ------------------------------------------------------------------------


def _palettes(runs: _Runs) -> tuple[npt.NDArray[np.uint8], IntArray, Keys, IntArray]:
    """Each run's palette index, each tile's palette size, and the palettes
    (entries in tile order, then index order), for tiles of two or more runs.
    A tile with more than 127 colours gets a size above 127, no entries, and
    meaningless indices."""
    k = len(runs.first) - 1
    counts = np.diff(runs.first)
    # Rounds 0 and 1 need no search: adjacent runs differ, so a tile's first
    # two runs are its first two colours. Two-colour text ends here.
    first_colour = runs.value[runs.first[:-1]]
    second_colour = runs.value[runs.first[:-1] + 1]
    is_first = runs.value == np.repeat(first_colour, counts)
    is_second = runs.value == np.repeat(second_colour, counts)
    index = is_second.view(np.uint8).copy()
    psize = np.full(k, 2, np.intp)
    tiles = np.arange(k)
    entries: list[tuple[IntArray, IntArray, Keys]] = [
        (tiles, np.zeros(k, np.intp), first_colour),
        (tiles, np.ones(k, np.intp), second_colour),
    ]
    left = np.flatnonzero(~(is_first | is_second))
    left_tile = runs.tile[left]
    left_value = runs.value[left]
    # Peeling: each round, every tile's first unmatched run brings a colour.
    for j in range(2, _PEEL_ROUNDS):
        if len(left) == 0:
            break
        new_tile = np.empty(len(left), np.bool_)
        new_tile[0] = True
        np.not_equal(left_tile[1:], left_tile[:-1], out=new_tile[1:])
        starts = np.flatnonzero(new_tile)
        tiles = left_tile[starts]
        colour = left_value[starts]
        entries.append((tiles, np.full(len(tiles), j, np.intp), colour))
        psize[tiles] = j + 1
        unmatched = left_value != np.repeat(colour, np.diff(starts, append=len(left)))
        index[left[~unmatched]] = j
        left, left_tile, left_value = left[unmatched], left_tile[unmatched], left_value[unmatched]

    if len(left):
        # Bigger palettes: the rest of the colours by one sort of the
        # remaining runs, keyed by (tile, value).
        shift = np.uint64(8 * runs.value.dtype.itemsize)
        key = (left_tile.astype(np.uint64) << shift) | left_value.astype(np.uint64)
        distinct, inverse = np.unique(key, return_inverse=True)
        d_tile = (distinct >> shift).astype(np.intp)
        d_first = np.flatnonzero(np.diff(d_tile, prepend=-1))
        d_index = (
            _PEEL_ROUNDS
            + np.arange(len(distinct))
            - np.repeat(d_first, np.diff(d_first, append=len(distinct)))
        )
        psize += np.bincount(d_tile, minlength=k)
        index[left] = np.minimum(d_index, 255).astype(np.uint8)[inverse]
        entries.append((d_tile, d_index, distinct.astype(runs.value.dtype)))

    e_tile = np.concatenate([e[0] for e in entries])
    e_index = np.concatenate([e[1] for e in entries])
    e_value = np.concatenate([e[2] for e in entries])
    has = psize[e_tile] <= MAX_RLE_PALETTE
    order = np.lexsort((e_index[has], e_tile[has]))
    return index, psize, e_value[has][order], e_tile[has][order]


# -- the encoder -------------------------------------------------------------------


def _many_colours(k4: Keys, ty: IntArray, tx: IntArray, nruns: IntArray) -> npt.NDArray[np.bool_]:
    """True where a tile provably has more than 127 colours, from a sample of
    _SAMPLE_ROWS of its rows: no palette can exist, so its palette is never
    looked for. Only tiles with more than 127 runs can qualify."""
    many = np.zeros(len(ty), np.bool_)
    th, tw = k4.shape[1], k4.shape[3]
    cand = np.flatnonzero(nruns > MAX_RLE_PALETTE)
    if len(cand) == 0 or min(th, _SAMPLE_ROWS) * tw <= MAX_RLE_PALETTE:
        return many
    step = max(1, th // _SAMPLE_ROWS)
    sample = k4[ty[cand], ::step, tx[cand], :].reshape(len(cand), -1)
    sample.sort(axis=1)
    ncolours = 1 + np.count_nonzero(sample[:, 1:] != sample[:, :-1], axis=1)
    many[cand[ncolours > MAX_RLE_PALETTE]] = True
    return many


def _find_runs(tiles: Keys, nruns: IntArray) -> _Runs:
    """The runs of all tiles in one pass over their pixels."""
    k, th, tw = tiles.shape
    flat = tiles.reshape(-1)
    heads = np.empty(flat.shape, np.bool_)
    np.not_equal(flat[1:], flat[:-1], out=heads[1:])
    heads[:: th * tw] = True  # every tile starts a run
    starts = np.flatnonzero(heads)
    first = _exclusive_cumsum(nruns)
    if first[-1] != len(starts):
        raise AssertionError("ZRLE run count mismatch")
    length: IntArray = np.diff(starts, append=flat.size)
    return _Runs(np.repeat(np.arange(k), nruns), flat[starts], length, first)


def _encode_run_tiles(
    stream: TileStream,
    ids: IntArray,
    tiles: Keys,
    nruns: IntArray,
    many: npt.NDArray[np.bool_],
    cp: CPixel,
) -> None:
    """Tiles of 2 or more runs: pick the smallest of raw, plain RLE, palette
    RLE and packed palette by exact size, then write each kind at once."""
    k, th, tw = tiles.shape
    n = th * tw
    runs = _find_runs(tiles, nruns)

    psize = np.full(k, MAX_RLE_PALETTE + 1, np.intp)
    index = np.zeros(len(runs.value), np.uint8)
    palette: Keys = np.zeros(0, runs.value.dtype)
    palette_tile: IntArray = np.zeros(0, np.intp)
    # The caller puts the tiles proven to have over 127 colours last.
    nfew = k - int(many.sum())
    if nfew:
        few = runs.head(nfew)
        index[: len(few.value)], psize[:nfew], palette, palette_tile = _palettes(few)

    # Exact sizes (the subencoding byte is common to all and left out).
    ext = np.add.reduceat((runs.length - 1) // 255, runs.first[:-1])
    long = np.add.reduceat((runs.length > 1).astype(np.intp), runs.first[:-1])
    never = n * cp.size + 1
    bits = _packed_bits(psize)
    cost = np.empty((4, k), np.intp)
    cost[0] = n * cp.size
    cost[1] = nruns * (cp.size + 1) + ext
    cost[2] = np.where(psize <= MAX_RLE_PALETTE, psize * cp.size + nruns + long + ext, never)
    cost[3] = np.where(
        psize <= MAX_PACKED_PALETTE, psize * cp.size + -(-tw * bits // 8) * th, never
    )
    choice = np.argmin(cost, axis=0)

    if (choice == 0).any():
        _write_raw(stream, ids[choice == 0], tiles[choice == 0], cp)
    if (choice == 1).any():
        _write_plain_rle(stream, ids[choice == 1], runs.select(choice == 1)[0], cp)
    rle = choice == 2
    if rle.any():
        sub, mask = runs.select(rle)
        pal = palette[rle[palette_tile]]
        _write_palette_rle(stream, ids[rle], sub, index[mask], psize[rle], pal, cp)
    packed = choice == 3
    if packed.any():
        # Indices per pixel for all tiles at once beats selecting runs per group.
        pixels = np.repeat(index, runs.length).reshape(k, th, tw)
        for b in (1, 2, 4):
            group = packed & (bits == b)
            if group.any():
                pal = palette[group[palette_tile]]
                _write_packed(stream, ids[group], pixels[group], psize[group], pal, cp)


def _encode_block(
    stream: TileStream,
    keys: Keys,
    changes: npt.NDArray[np.bool_],
    block: TileBlock,
    ntx: int,
    cp: CPixel,
) -> None:
    th, tw = block.th, block.tw
    k4 = block.view(keys)
    runs = tile_runs(keys, block, changes)
    tile_id = block.tile_ids(ntx)

    solid = runs == 1
    if solid.any():
        _write_solid(stream, tile_id[solid], k4[:, 0, :, 0][solid], cp)
    ty, tx = np.nonzero(~solid)
    if len(ty) == 0:
        return
    nruns = runs[ty, tx]
    # Photo-like tiles: more than 127 colours, and so many runs that plain RLE
    # is larger than raw. They cost one sample sort and a copy.
    many = _many_colours(k4, ty, tx, nruns)
    raw = many & (nruns * (cp.size + 1) >= th * tw * cp.size)
    if raw.any():
        _write_raw(stream, tile_id[ty[raw], tx[raw]], k4[ty[raw], :, tx[raw], :], cp)
    # Text-like tiles: two colours and so many runs that a 1-bit packed
    # palette must be the smallest. They never reach the run path.
    done = raw | _two_colour_tiles(stream, k4, ty, tx, tile_id, nruns, ~(raw | many), cp)
    # The rest, with the many-colour tiles last (_encode_run_tiles wants them so).
    rest = np.flatnonzero(~done)
    if len(rest):
        rest = rest[np.argsort(many[rest], kind="stable")]
        ty, tx = ty[rest], tx[rest]
        _encode_run_tiles(stream, tile_id[ty, tx], k4[ty, :, tx, :], nruns[rest], many[rest], cp)


def two_colours(
    tiles: Keys,
) -> tuple[Keys, Keys, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """For (k, n) tiles of at least two colours: each one's first colour, its
    second (in pixel order), where pixels are not the first colour, and
    whether the tile has exactly two colours. Four passes over the pixels."""
    first = tiles[:, 0]
    other = tiles != first[:, None]
    second = np.take_along_axis(tiles, other.argmax(axis=1)[:, None], axis=1)
    two = ((tiles == second) | ~other).all(axis=1)
    return first, second[:, 0], other, two


def _two_colour_tiles(
    stream: TileStream,
    k4: Keys,
    ty: IntArray,
    tx: IntArray,
    tile_id: IntArray,
    nruns: IntArray,
    allowed: npt.NDArray[np.bool_],
    cp: CPixel,
) -> npt.NDArray[np.bool_]:
    """Write the tiles that have exactly two colours and at least as many runs
    as a 1-bit packed tile has bytes of indices (palette RLE needs a byte per
    run, so packed wins), straight from their pixels; return which."""
    done = np.zeros(len(ty), np.bool_)
    th, tw = k4.shape[1], k4.shape[3]
    cand = np.flatnonzero(allowed & (nruns >= -(-tw // 8) * th))
    if len(cand) == 0:
        return done
    first, second, other, two = two_colours(k4[ty[cand], :, tx[cand], :].reshape(len(cand), -1))
    if two.any():
        palette = np.stack([first[two], second[two]], axis=1).reshape(-1)
        pixels = other[two].reshape(-1, th, tw).view(np.uint8)
        ids = tile_id[ty[cand[two]], tx[cand[two]]]
        _write_packed(stream, ids, pixels, np.full(len(ids), 2, np.intp), palette, cp)
        done[cand[two]] = True
    return done


def encode_tiles(pixels: Pixels, pf: PixelFormat) -> bytes:
    """The uncompressed ZRLE tile stream of a rect (also TRLE's, with 64x64
    tiles)."""
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        return b""
    cp = cpixel_layout(pf)
    keys = pixel_keys(pixels, pf)
    changes = row_changes(keys, TILE)
    nty, ntx = -(-h // TILE), -(-w // TILE)
    stream = TileStream(nty * ntx)
    for block in tile_blocks(h, w, TILE):
        _encode_block(stream, keys, changes, block, ntx, cp)
    return stream.join()


class ZRLEEncoder:
    """ZRLE with one persistent zlib-ng stream: an object per connection.

    `window_bits` defaults to 14 (a 16 KiB window), not zlib's 15: on tile
    streams zlib-ng level 1 then runs 1.3-1.5x faster where raw tiles are
    incompressible (22% of a desktop frame's time goes to zlib, most of it
    on photo tiles) for 0.03% more bytes on a desktop frame with a photo and
    1.3% more on text alone (bench/_basic_throughput.py, measured on the
    project's 2-core VM). Any window size is valid for every inflater.
    """

    encoding = Encoding.ZRLE

    def __init__(self, level: int = 1, *, window_bits: int = 14) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level {level} is not in 0..9")
        if not 9 <= window_bits <= 15:
            raise ValueError(f"zlib window bits {window_bits} is not in 9..15")
        self.level = level
        self._stream = zlib_ng.compressobj(level, zlib_ng.DEFLATED, window_bits)

    def encode(self, pixels: Pixels, pf: PixelFormat) -> Payload:
        body = self._stream.compress(encode_tiles(pixels, pf))
        tail = self._stream.flush(zlib_ng.Z_SYNC_FLUSH)
        return [(len(body) + len(tail)).to_bytes(4, "big"), body, tail]

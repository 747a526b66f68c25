# The RRE encoding, RFC 6143 section 7.7.3 (rfbproto "RRE Encoding"): a
# background PIXEL and subrectangles of single colours drawn over it.
#
# Partition: every horizontal run of one colour in a row is a candidate; a run
# that repeats exactly (same x, width and colour) in the next row extends the
# rectangle above it downwards. Runs of the background colour are dropped.
# This "row runs merged vertically" partition takes a few numpy passes over
# the pixels plus one vectorised step per row (no per-run Python), and gives
# one subrect per solid box of a desktop (windows, buttons, bars). The
# background is the most common colour of a 65536-pixel sample.
#
# Cost, which the scheduler should weigh: the subrect count is at most the
# number of non-background row runs, so the work and the payload are bounded
# by the pixel count, but on photo-like content nearly every pixel is a
# subrect and the payload is up to (bpp + 8) / bpp times Raw. RRE has no
# fallback inside itself; choose another encoding for such content.
#
# `find_subrects` works on a batch of equally sized tiles and is shared with
# the Hextile encoder, which runs it on 16x16 tiles.
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..rfb.constants import Encoding
from ..rfb.pixelformat import PixelFormat
from .base import Payload, Pixels
from .zrle import IntArray, Keys, pixel_keys, wire_bytes

_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class Subrects:
    """Subrectangles of a batch of tiles, grouped by tile (ascending), with
    coordinates relative to their tile."""

    tile: IntArray
    x: IntArray
    y: IntArray
    w: IntArray
    h: IntArray
    value: Keys


def find_subrects(tiles: Keys, background: Keys) -> Subrects:
    """Cover every pixel of tiles[t] that differs from background[t] with
    single-colour rectangles that do not overlap. tiles: (k, th, tw) keys.

    Everything is per pixel on contiguous arrays (a handful of passes, plus
    one pass row by row for the heights); only the kept subrects are turned
    into coordinates."""
    k, th, tw = tiles.shape
    starts = np.empty((k, th, tw), np.bool_)
    starts[:, :, 0] = True  # every row starts a run, so runs never wrap
    np.not_equal(tiles[:, :, 1:], tiles[:, :, :-1], out=starts[:, :, 1:])
    at = np.flatnonzero(starts)
    length = np.zeros((k, th, tw), np.int32)
    length.reshape(-1)[at] = np.diff(at, append=starts.size)

    # A run continues the rectangle above it if the row above has a run that
    # starts at the same x with the same length and colour.
    continues = np.zeros((k, th, tw), np.bool_)
    if th > 1:
        continues[:, 1:] = (
            starts[:, 1:] & (length[:, 1:] == length[:, :-1]) & (tiles[:, 1:] == tiles[:, :-1])
        )
    # Height of the rectangle that starts at each run: 1 + how many rows
    # below continue it, found from the bottom row up.
    height = np.ones((k, th, tw), np.int32)
    for row in range(th - 2, -1, -1):
        # (a multiply, not a boolean mask: masks cost a nonzero each row)
        height[:, row] += continues[:, row + 1] * height[:, row + 1]

    top = starts & ~continues & (tiles != background[:, None, None])
    where = np.flatnonzero(top)
    t, rest = np.divmod(where, th * tw)
    y, x = np.divmod(rest, tw)
    return Subrects(
        t,
        x,
        y,
        length.reshape(-1)[where].astype(np.intp),
        height.reshape(-1)[where].astype(np.intp),
        tiles.reshape(-1)[where],
    )


#: Pixels looked at to choose RRE's background; more is exact but costs a
#: sort of every row run (50 ms on a 1080p desktop), and the choice only
#: sways the size.
_BACKGROUND_SAMPLE = 1 << 16


def most_common(keys: Keys) -> int:
    """The most frequent key of a 2-d array: exact up to 65536 pixels, beyond
    that the most frequent of 65536 evenly spread pixels (an odd stride, so
    that it does not line up with rows or with 2^n patterns)."""
    flat = keys.reshape(-1)
    step = max(1, flat.size // _BACKGROUND_SAMPLE) | 1
    values, counts = np.unique(flat[::step], return_counts=True)
    return int(values[np.argmax(counts)])


class RREEncoder:
    """U32 subrect count, background PIXEL, then (PIXEL, U16 x, y, w, h) per
    subrect. Stateless."""

    encoding = Encoding.RRE

    def encode(self, pixels: Pixels, pf: PixelFormat) -> Payload:
        h, w = pixels.shape[:2]
        keys = pixel_keys(pixels, pf)
        if h == 0 or w == 0:
            return [_HEADER.pack(0), bytes(pf.bytes_per_pixel)]
        background = np.array([most_common(keys)], keys.dtype)
        subs = find_subrects(keys[None], background)
        bpp = pf.bytes_per_pixel
        out = np.empty((len(subs.x), bpp + 8), np.uint8)
        out[:, :bpp] = wire_bytes(subs.value)
        geometry = np.stack([subs.x, subs.y, subs.w, subs.h], axis=1).astype(">u2")
        out[:, bpp:] = geometry.view(np.uint8)
        return [
            _HEADER.pack(len(subs.x)) + wire_bytes(background)[0].tobytes(),
            out.tobytes(),
        ]


def subrect_count(pixels: Pixels, pf: PixelFormat) -> int:
    """How many subrects RRE would send for these pixels: a cheap way for a
    scheduler to see that RRE does not suit the content."""
    keys = pixel_keys(pixels, pf)
    if keys.size == 0:
        return 0
    background = np.array([most_common(keys)], keys.dtype)
    return len(find_subrects(keys[None], background).x)

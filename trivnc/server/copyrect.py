# Scrolls as CopyRect. The framebuffer service finds, in each new frame, the
# parts that are exact copies of the previous frame's pixels elsewhere
# (Frame.moves, trivnc.framebuffer.scroll). A session may send those as
# CopyRect, which costs 16 bytes whatever the size, instead of the pixels,
# but only when the client's framebuffer holds the pixels being copied:
#
#   * the client has the previous version (the session's last update was of
#     frame.version - 1), and none of the tiles a copy reads from is still
#     dirty for it (changes outside the area it asked for wait there);
#   * no full (non-incremental) update is due: that resends pixels anyway;
#   * copies go first in the update, before any pixel rect, and none reads
#     from where an earlier copy of the same update wrote (CopyRect reads
#     the client's framebuffer as it is at that point of the update);
#   * both ends lie inside what the client can see.
#
# The copies' destinations are then cut out of the rects to encode.
from __future__ import annotations

from ..encodings.copyrect import encode_copyrect
from ..framebuffer.damage import TILE, TileMask, tile_grid
from ..framebuffer.service import Frame
from ..geometry import Rect
from ..rfb.capabilities import ClientCapabilities
from ..rfb.constants import Encoding
from .encoding import EncodedRect

#: Copies smaller than this are sent as pixels (not worth a rect).
MIN_COPY_AREA = 1024


def stale_tiles(
    frame: Frame,
    caps: ClientCapabilities,
    sent_version: int,
    dirty: TileMask | None,
    full_area: Rect | None,
) -> TileMask | None:
    """Before the session folds `frame`'s damage into its dirty tiles: the
    tiles where the client's pixels are not the previous version's (a copy
    of them), or None when `frame`'s moves cannot be used at all."""
    if (
        not frame.moves
        or Encoding.COPY_RECT not in caps.encodings
        or full_area is not None
        or sent_version != frame.version - 1
        or dirty is None
        or dirty.shape != tile_grid(frame.width, frame.height)
    ):
        return None
    return dirty.copy()


def plan(
    frame: Frame, stale: TileMask | None, area: Rect, screen: Rect, rects: list[Rect]
) -> tuple[list[EncodedRect], list[Rect]]:
    """The CopyRects to send first (inside `area`, reading only inside
    `screen` and outside `stale` tiles), and `rects` without their
    destinations."""
    if stale is None:
        return [], rects
    copies: list[EncodedRect] = []
    for move in frame.moves:
        # Clip the destination to the area, and so that the source stays on
        # the client's screen.
        reach = Rect(screen.x - move.dx, screen.y - move.dy, screen.w, screen.h)
        dst = move.dst.intersect(area).intersect(reach)
        if dst.area < MIN_COPY_AREA:
            continue
        src = Rect(dst.x + move.dx, dst.y + move.dy, dst.w, dst.h)
        ty0, ty1 = src.y // TILE, -(-src.bottom // TILE)
        tx0, tx1 = src.x // TILE, -(-src.right // TILE)
        if stale[ty0:ty1, tx0:tx1].any():
            continue  # the client lacks some of the source pixels
        if any(_overlap(src, c.rect) or _overlap(dst, c.rect) for c in copies):
            continue  # it would read what an earlier copy wrote
        copies.append(EncodedRect(dst, Encoding.COPY_RECT, encode_copyrect(src.x, src.y)))
    for c in copies:
        rects = [piece for r in rects for piece in subtract(r, c.rect)]
    return copies, rects


def subtract(rect: Rect, hole: Rect) -> list[Rect]:
    """`rect` without `hole`: up to four rects (above, below, left, right)."""
    cut = rect.intersect(hole)
    if cut.is_empty():
        return [rect]
    out = [
        Rect(rect.x, rect.y, rect.w, cut.y - rect.y),
        Rect(rect.x, cut.bottom, rect.w, rect.bottom - cut.bottom),
        Rect(rect.x, cut.y, cut.x - rect.x, cut.h),
        Rect(cut.right, cut.y, rect.right - cut.right, cut.h),
    ]
    return [r for r in out if not r.is_empty()]


def _overlap(a: Rect, b: Rect) -> bool:
    return not a.intersect(b).is_empty()

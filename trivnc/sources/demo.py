# The built-in demo desktop: what `trivnc` serves when no X display is given.
# It exercises the encoders the way a real desktop does (flat text panels for
# the lossless encodings, a smooth animated image for JPEG, a small moving
# sprite for small-rect updates) and shows input arriving: keys are typed into
# a text panel, the left button paints, the right button clears.
#
# Every change is announced with a precise damage rect (clock box, the ball's
# old and new box, the painted segment, the edited text line), so an idle or
# paused demo costs the server nothing. Drawing is numpy on the trio thread:
# flat fills, text from cached glyph masks through a colour lookup table, and
# an image built from precomputed waves (no trigonometry per frame).
from __future__ import annotations

import math
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt
import trio

from ..geometry import Rect
from .array import MAX_SIDE, DamageAccumulator, DamageQueue
from .base import Damage, Pixels, Source

Mask = npt.NDArray[np.uint8]
Pixels32 = npt.NDArray[np.uint32]
FontChoice = Literal["auto", "pillow", "builtin"]

#: Smallest desktop the layout still fits.
MIN_WIDTH, MIN_HEIGHT = 320, 200

# -- text ---------------------------------------------------------------------

# A 5x8 bitmap font for ASCII 32..126, so the demo needs neither Pillow nor a
# font file. Ten hex digits per glyph: 8 rows of 5 bits, top row first, the
# high bit is the left column; row 7 holds descenders.
_BUILTIN_BITS = (
    "00000000002108420080528000000052beafa94023e8e2f880c644444c6064a88ac9a02100000000"
    "11108410404104211100012aea90000109f2100000000010880001f0000000000000800044444000"
    "74675cc5c023084211c074422223e0f88820c5c011952f8840fc3c10c5c03221e8c5c0f844442100"
    "7462e8c5c07462f08980000800100000080010881111041040003e0f800041041111007442220080"
    "7442dad5c07463f8c620f463e8c7c074610845c0e4a318cb80fc21e843e0fc21e84200746178c5e0"
    "8c63f8c62071084211c038842149808ca98a4a2084210843e08eeb58c6208c7359c620746318c5c0"
    "f463e8420074631ac9a0f463ea4a207c20e087c0f9084210808c6318c5c08c6318a8808c635ad540"
    "8c544546208c54421080f8444443e072108421c0041041040070842109c022a2000000000000001f"
    "4100000000001c17c5e0843d18c7c0001d0845c0085f18c5e0001d1fc1c03251c42100001f18bc2e"
    "842d98c62020184211c0100c210a4c84254c524061084211c000355ad6a0002d98c620001d18c5c0"
    "003d18fa10001f18bc21002d984200001d0707c042388424c0002318cda0002318a88000231ad540"
    "0022a22a20002318bc2e003e2223e01108821040210842108041082211000011510000"
)
_BUILTIN_BOX = 0xFC6318C7E0  # a hollow box for characters with no fallback

# Latin-1 characters that neither font has and that do not decompose into a
# letter plus accents: shown as look-alike ASCII rather than as a box.
_SUBSTITUTES = {
    "\u00a0": " ", "¡": "!", "¢": "c", "£": "L", "¤": "o", "¥": "Y", "¦": "|", "§": "S",
    "¨": '"', "©": "(c)", "ª": "a", "«": "<<", "¬": "-", "\u00ad": "-", "®": "(R)", "¯": "-",
    "°": "o", "±": "+-", "²": "2", "³": "3", "\u00b4": "'", "µ": "u", "¶": "P", "·": ".",
    "\u00b8": ",", "¹": "1", "º": "o", "»": ">>", "¼": "1/4", "½": "1/2", "¾": "3/4",
    "¿": "?", "Æ": "AE", "Ð": "D", "\u00d7": "x", "Ø": "O", "Þ": "P", "ß": "ss", "æ": "ae",
    "ð": "d", "÷": "/", "ø": "o", "þ": "p", "—": "-", "\u2013": "-", "\u2018": "'",
    "\u2019": "'", "\u201c": '"', "\u201d": '"',
}  # fmt: skip

# Accents drawn over (or, for the cedilla, under) a base letter, for the
# Latin-1 letters that decompose (é = e + U+0301), in font units.
_MARKS = {
    "\u0300": ("#..", ".#."),
    "\u0301": ("..#", ".#."),
    "\u0302": (".#.", "#.#"),
    "\u0303": (".#.#", "#.#."),
    "\u0308": ("#.#",),
    "\u030a": (".#.", "#.#", ".#."),
    "\u0327": (".#.", "##."),
}


def _bits_mask(bits: int) -> Mask:
    """A builtin glyph as a 0/255 mask in its 6x10 cell (a blank column to
    the right, a blank row above and below)."""
    cell = np.zeros((10, 6), np.uint8)
    for row in range(8):
        line = (bits >> (5 * (7 - row))) & 0x1F
        for col in range(5):
            if line >> (4 - col) & 1:
                cell[row + 1, col] = 255
    return cell


class GlyphFont:
    """Text as uint8 coverage masks, one line high, one mask per character
    rendered once and cached, so drawing a string is a concatenation and one
    lookup-table gather. Only used on the trio thread."""

    def __init__(self, line_height: int, unit: int, render: Callable[[str], Mask | None]) -> None:
        self.line_height = line_height
        self._unit = unit  # pixels per accent-mark unit
        self._render = render
        self._cache: dict[str, Mask] = {}

    @classmethod
    def builtin(cls, pixel_size: int) -> GlyphFont:
        """The built-in 5x8 font, scaled by an integer factor to about
        `pixel_size` pixels per line."""
        scale = max(1, round(pixel_size / 10))

        def render(ch: str) -> Mask | None:
            code = ord(ch)
            if not 32 <= code < 127:
                return None
            i = (code - 32) * 10
            cell = _bits_mask(int(_BUILTIN_BITS[i : i + 10], 16))
            return np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)

        font = cls(10 * scale, scale, render)
        box = _bits_mask(_BUILTIN_BOX)
        font._cache["\ufffd"] = np.repeat(np.repeat(box, scale, axis=0), scale, axis=1)
        return font

    @classmethod
    def pillow(cls, pixel_size: int) -> GlyphFont | None:
        """Pillow's built-in scalable font (no font file needed), or None if
        Pillow or its FreeType support is missing."""
        try:
            from PIL import Image, ImageDraw, ImageFont, features
        except ImportError:
            return None
        if not features.check("freetype2"):
            return None
        try:
            font = ImageFont.load_default(size=pixel_size)
        except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
            return None
        if not isinstance(font, ImageFont.FreeTypeFont):
            return None
        ascent, descent = font.getmetrics()
        line_height = ascent + descent

        def draw(ch: str) -> Mask:
            width = max(1, round(font.getlength(ch)))
            image = Image.new("L", (width, line_height), 0)
            ImageDraw.Draw(image).text((0, 0), ch, font=font, fill=255)
            return np.array(image, dtype=np.uint8)

        # The default font covers ASCII only; anything else comes out as its
        # "missing glyph" box, which we recognise and replace by a fallback.
        notdef = draw("\ue000")

        def render(ch: str) -> Mask | None:
            if not ch.isprintable():
                return None
            mask = draw(ch)
            if ch != " " and mask.shape == notdef.shape and np.array_equal(mask, notdef):
                return None
            return mask

        result = cls(line_height, max(1, round(line_height / 20)), render)
        result._cache["\ufffd"] = notdef
        return result

    @classmethod
    def load(cls, choice: FontChoice, pixel_size: int) -> GlyphFont:
        if choice != "builtin":
            font = cls.pillow(pixel_size)
            if font is not None:
                return font
            if choice == "pillow":
                raise RuntimeError("Pillow with FreeType support is not available")
        return cls.builtin(pixel_size)

    def glyph(self, ch: str) -> Mask:
        mask = self._cache.get(ch)
        if mask is None:
            mask = self._render(ch)
            if mask is None:
                mask = self._fallback(ch)
            self._cache[ch] = mask
        return mask

    def _fallback(self, ch: str) -> Mask:
        if ch in _SUBSTITUTES:
            return self.mask(_SUBSTITUTES[ch])
        decomposed = unicodedata.normalize("NFD", ch)
        base, accents = decomposed[0], decomposed[1:]
        if accents and all(a in _MARKS for a in accents) and self._render(base) is not None:
            mask = self.glyph(base).copy()
            for accent in accents:
                self._add_mark(mask, _MARKS[accent], below=accent == "\u0327")
            return mask
        return self._cache["\ufffd"]

    def _add_mark(self, mask: Mask, rows: tuple[str, ...], *, below: bool) -> None:
        """Stamp an accent just above the letter's ink (below it for a
        cedilla), centred; it is clipped where the line has no room."""
        u = self._unit
        mark = np.array([[255 if c == "#" else 0 for c in row] for row in rows], np.uint8)
        mark = np.repeat(np.repeat(mark, u, axis=0), u, axis=1)
        ink = np.flatnonzero(mask.any(axis=1))
        if not ink.size:
            return
        top = ink[-1] + 1 if below else max(0, ink[0] - u - mark.shape[0])
        left = max(0, (mask.shape[1] - mark.shape[1]) // 2)
        region = mask[top : top + mark.shape[0], left : left + mark.shape[1]]
        np.maximum(region, mark[: region.shape[0], : region.shape[1]], out=region)

    def width(self, text: str) -> int:
        return sum(self.glyph(ch).shape[1] for ch in text)

    def mask(self, text: str) -> Mask:
        """The coverage mask of `text`, (line_height, width(text))."""
        if not text:
            return np.zeros((self.line_height, 0), np.uint8)
        return np.concatenate([self.glyph(ch) for ch in text], axis=1)


# -- colours and drawing helpers ---------------------------------------------


def _rgb(r: int, g: int, b: int) -> int:
    """A colour as the uint32 whose little-endian bytes are B, G, R, X."""
    return b | g << 8 | r << 16


@lru_cache(maxsize=64)
def _text_lut(fg: int, bg: int) -> Pixels32:
    """Coverage 0..255 -> the blended BGRX colour, so text over a flat panel
    is one gather instead of per-pixel arithmetic."""
    a = np.arange(256, dtype=np.float32) / 255
    lut = np.zeros(256, np.uint32)
    for shift in (0, 8, 16):
        f, b = (fg >> shift) & 0xFF, (bg >> shift) & 0xFF
        lut |= np.rint(b + (f - b) * a).astype(np.uint32) << shift
    return lut


def _view32(pixels: Pixels) -> Pixels32:
    """The (h, w) uint32 view of a BGRX (h, w, 4) array (shares memory)."""
    return pixels.view(np.dtype("<u4"))[..., 0]


DESKTOP = _rgb(58, 68, 82)
HEADER = _rgb(34, 40, 49)
TITLE = _rgb(236, 238, 240)
CLOCK = _rgb(120, 200, 255)
PANEL = _rgb(24, 26, 32)
CAPTION = _rgb(140, 150, 170)
TYPED = _rgb(220, 232, 220)
CANVAS = _rgb(246, 244, 238)
CANVAS_LABEL = _rgb(150, 150, 160)
INK = (_rgb(220, 50, 47), _rgb(38, 139, 210), _rgb(133, 153, 0), _rgb(211, 54, 130),
       _rgb(42, 161, 152), _rgb(181, 137, 0))  # fmt: skip
BALL_RGB = (255, 140, 40)
# Sunset colours for the image, dark to light.
PHOTO_STOPS = ((0.0, (14, 22, 60)), (0.3, (70, 40, 120)), (0.55, (200, 70, 100)),
               (0.75, (250, 150, 70)), (1.0, (255, 235, 170)))  # fmt: skip

TITLE_TEXT = "trivnc demo desktop \u2014 drag to paint, type to write"
CAPTION_TEXT = "Type here (Backspace, Enter, paste)"
CANVAS_TEXT = "Drag with the left button to paint. The right button clears."


@dataclass(frozen=True)
class DemoLayout:
    """Where everything is, in desktop coordinates."""

    header: Rect
    title: Rect
    clock: Rect
    photo: Rect
    text: Rect  # the keyboard panel
    rows: Rect  # the typed lines inside it
    canvas: Rect  # the paint area; the ball bounces in it too

    @classmethod
    def compute(cls, width: int, height: int, font: GlyphFont) -> DemoLayout:
        lh = font.line_height
        m = max(4, min(width, height) // 60)
        header = Rect(0, 0, width, lh + 2 * m)
        digit = max(font.width(d) for d in "0123456789")
        clock_w = 6 * digit + 2 * font.width(":")
        clock = Rect(width - m - clock_w, m, clock_w, lh)
        title = Rect(m, m, max(0, clock.x - 2 * m), lh)
        top = header.bottom + m
        body_h = height - top - m
        left_w = (width - 3 * m) * 2 // 5
        photo = Rect(m, top, left_w, body_h * 11 // 20)
        text = Rect(m, photo.bottom + m, left_w, height - m - photo.bottom - m)
        pad = max(2, m // 2)
        rows_y = text.y + pad + lh + pad
        rows = Rect(text.x + pad, rows_y, text.w - 2 * pad, max(lh, text.bottom - pad - rows_y))
        canvas = Rect(2 * m + left_w, top, width - 3 * m - left_w, body_h)
        return cls(header, title, clock, photo, text, rows, canvas)


def _next_deadline(deadline: float, period: float, now: float) -> float:
    """The next tick on the period grid; a late frame is skipped, never
    caught up in a burst, so the rate stays bounded under load."""
    deadline += period
    return deadline if deadline > now else now + period


def _keysym_text(keysym: int) -> str | None:
    """What a key press types: a character, "\\b", "\\n", or None."""
    if 0x20 <= keysym <= 0x7E or 0xA0 <= keysym <= 0xFF:
        return chr(keysym)  # Latin-1 keysyms are their code points
    if keysym & 0xFF000000 == 0x01000000:  # X11's Unicode keysyms
        code = keysym & 0xFFFFFF
        return chr(code) if code <= 0x10FFFF and chr(code).isprintable() else None
    if keysym == 0xFF08:  # BackSpace
        return "\b"
    if keysym in (0xFF0D, 0xFF8D):  # Return, KP_Enter
        return "\n"
    if 0xFFB0 <= keysym <= 0xFFB9:  # KP_0..KP_9
        return chr(ord("0") + keysym - 0xFFB0)
    return None


# -- the source ---------------------------------------------------------------


class DemoSource(Source):
    """An animated desktop that reacts to input; see the module comment.

    `ball_fps` and `photo_fps` bound the animation rates (0 stops that part);
    the clock is redrawn when its text changes, once a second. With
    `animate=False` nothing changes unless a viewer sends input. `wall_clock`
    gives the time the clock shows (tests pass a fake one).

    `layout` (a `DemoLayout`) and `font` describe the current desktop; both
    are replaced when a viewer resizes it.
    """

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        *,
        name: str = "trivnc demo",
        animate: bool = True,
        ball_fps: float = 30.0,
        photo_fps: float = 10.0,
        resizable: bool = True,
        font: FontChoice = "auto",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if ball_fps < 0 or photo_fps < 0:
            raise ValueError("frame rates must not be negative")
        self.name = name
        self.resizable = resizable
        self._animate = animate
        self._paused = False
        self._resumed = trio.Event()
        self._ball_fps = ball_fps
        self._photo_fps = photo_fps
        self._font_choice: FontChoice = font
        self._fonts: dict[int, GlyphFont] = {}
        self._wall_clock = wall_clock
        # Capture runs in a worker thread and must never see a half-drawn
        # update. Drawing happens on the trio thread straight into `_work`
        # while holding `_lock`; capture holds the same lock only to copy the
        # rects changed since its previous capture into its private `_mirror`,
        # then copies the mirror to the array it returns after releasing it.
        # So the lock is held for an animation step's drawing (tens of µs,
        # the image blit a few hundred) or for copying that step's pixels: the
        # trio thread never waits for a full-frame copy except right after a
        # resize or clear. A back buffer that is swapped would need the same
        # lock to know when capture has stopped reading the front buffer, and
        # a full published copy per step would cost a memcpy even when nobody
        # captures.
        self._lock = threading.Lock()
        self._mirror: Pixels | None = None  # capture thread only
        # Model state, trio thread only.
        self._lines: list[str] = [""]
        self._buttons = 0
        self._last_point: tuple[int, int] | None = None
        self._strokes = 0
        self._photo_t = 0.0
        self._clock_text = ""
        self._ball_vel = (1.0, 1.0)  # direction only until the layout is known
        self._capture_dirty = DamageAccumulator(width, height, max_rects=64)  # under _lock
        self._damage = DamageQueue(width, height)
        self._build(width, height)

    # -- construction and layout ------------------------------------------

    def _font(self, height: int) -> GlyphFont:
        px = min(40, max(10, height // 36))
        if px not in self._fonts:
            self._fonts[px] = GlyphFont.load(self._font_choice, px)
        return self._fonts[px]

    def _build(self, width: int, height: int) -> None:
        """(Re)create everything for a desktop of this size and draw it."""
        if not (MIN_WIDTH <= width <= MAX_SIDE and MIN_HEIGHT <= height <= MAX_SIDE):
            raise ValueError(f"demo desktop size {width}x{height} out of range")
        self.font = font = self._font(height)
        self.layout = lay = DemoLayout.compute(width, height, font)
        self._max_rows = max(1, lay.rows.h // font.line_height)
        del self._lines[: max(0, len(self._lines) - self._max_rows)]
        self._cursor_w = max(2, font.line_height // 10)
        self._brush = max(2, height // 180)
        c = lay.canvas
        self._layer = np.zeros((c.h, c.w, 4), np.uint8)
        self._layer32 = _view32(self._layer)
        self._draw_canvas_background()
        self._prepare_ball()
        self._prepare_photo()
        work = np.zeros((height, width, 4), np.uint8)
        with self._lock:
            self._work = work
            self._work32 = _view32(work)
            self._draw_everything()
            self._capture_dirty.reset(width, height)
        self._damage.reset(width, height)  # also the first frame: everything is new

    def _draw_everything(self) -> None:
        lay = self.layout
        self._work32[...] = DESKTOP
        self._work32[lay.header.slices()] = HEADER
        self._text(lay.title.x, lay.title.y, TITLE_TEXT, TITLE, HEADER, lay.title)
        self._clock_text = ""
        self._draw_clock()
        self._work32[lay.photo.slices()] = self._photo_frame()
        self._work32[lay.text.slices()] = PANEL
        pad = lay.rows.x - lay.text.x
        self._text(lay.rows.x, lay.text.y + pad, CAPTION_TEXT, CAPTION, PANEL, lay.text)
        for i in range(self._max_rows):
            self._draw_row(i)
        self._recompose(lay.canvas)

    @contextmanager
    def _drawing(self) -> Iterator[list[Rect]]:
        """Draw under the lock; the rects appended to the yielded list are
        published to capture and to the damage queue when the block ends."""
        touched: list[Rect] = []
        with self._lock:
            yield touched
            for r in touched:
                self._capture_dirty.add(r)
        for r in touched:
            self._damage.add(r)

    def _text(self, x: int, y: int, text: str, fg: int, bg: int, clip: Rect) -> Rect:
        """Draw `text` over a flat `bg`; returns the rect written."""
        mask = self.font.mask(text)
        box = Rect(x, y, mask.shape[1], mask.shape[0]).intersect(clip)
        if not box.is_empty():
            sub = mask[box.y - y : box.bottom - y, box.x - x : box.right - x]
            self._work32[box.slices()] = _text_lut(fg, bg)[sub]
        return box

    # -- the Source interface -------------------------------------------------

    @property
    def size(self) -> tuple[int, int]:
        h, w = self._work.shape[:2]
        return w, h

    async def wait_damage(self) -> Damage:
        return await self._damage.wait()

    def take_damage(self) -> Damage | None:
        return self._damage.take()

    def capture(self, damage: Damage) -> Pixels:
        # `damage` is ignored: the mirror tracks what changed since *its* last
        # refresh, which stays right even if the service skips a hint or asks
        # for a full frame.
        with self._lock:
            work, mirror = self._work, self._mirror
            dirty = self._capture_dirty.take()
            if mirror is None or mirror.shape != work.shape:
                mirror = self._mirror = work.copy()
            elif dirty is not None and dirty.full:
                np.copyto(mirror, work)
            elif dirty is not None:
                for r in dirty.rects:
                    mirror[r.slices()] = work[r.slices()]
        # Outside the lock: the returned array is new and never written again.
        return mirror.copy()

    async def set_size(self, width: int, height: int) -> bool:
        await trio.lowlevel.checkpoint()
        if not self.resizable:
            return False
        if not (MIN_WIDTH <= width <= MAX_SIDE and MIN_HEIGHT <= height <= MAX_SIDE):
            return False
        self._build(width, height)  # painting is lost; typed text is kept
        return True

    # -- animation ----------------------------------------------------------------

    @property
    def animating(self) -> bool:
        """False while paused: nothing changes and nothing costs until it is
        set True again. Trio thread. No effect on a source made with
        `animate=False`."""
        return self._animate and not self._paused

    @animating.setter
    def animating(self, value: bool) -> None:
        self._paused = not value
        if value:
            self._resumed.set()
        else:
            self._resumed = trio.Event()

    async def run(self) -> None:
        if not self._animate:
            return
        ball_period = 1 / self._ball_fps if self._ball_fps else math.inf
        photo_period = 1 / self._photo_fps if self._photo_fps else math.inf
        while True:
            if self._paused:
                await self._resumed.wait()
            now = trio.current_time()
            last_ball = last_photo = now
            next_ball, next_photo = now + ball_period, now + photo_period
            next_clock = now  # draw the current time at once
            while not self._paused:
                await trio.sleep_until(min(next_ball, next_photo, next_clock))
                if self._paused:
                    break
                now = trio.current_time()
                if now >= next_clock:
                    self._tick_clock()
                    next_clock = now + 1.0 - self._wall_clock() % 1.0 + 0.002
                if now >= next_ball:
                    # Elapsed time, so the speed does not depend on the frame
                    # rate; capped, so a stall does not teleport the ball.
                    self._step_ball(min(now - last_ball, 2 * ball_period))
                    last_ball, next_ball = now, _next_deadline(next_ball, ball_period, now)
                if now >= next_photo:
                    self._photo_t += min(now - last_photo, 2 * photo_period)
                    self._step_photo()
                    last_photo, next_photo = now, _next_deadline(next_photo, photo_period, now)

    # clock

    def _draw_clock(self) -> bool:
        text = time.strftime("%H:%M:%S", time.localtime(self._wall_clock()))
        if text == self._clock_text:
            return False
        self._clock_text = text
        box = self.layout.clock
        self._work32[box.slices()] = HEADER
        self._text(box.right - self.font.width(text), box.y, text, CLOCK, HEADER, box)
        return True

    def _tick_clock(self) -> None:
        with self._drawing() as touched:
            if self._draw_clock():
                touched.append(self.layout.clock)

    # ball

    def _prepare_ball(self) -> None:
        c = self.layout.canvas
        r = max(4, min(c.w, c.h) // 14)
        d = 2 * r + 2
        yy, xx = np.mgrid[0:d, 0:d].astype(np.float32) - (d - 1) / 2
        dist = np.hypot(xx, yy)
        alpha = np.clip(r + 0.5 - dist, 0, 1)
        nz = np.sqrt(np.clip(1 - (dist / r) ** 2, 0, 1))
        light = np.clip(-0.45 * xx / r - 0.55 * yy / r + 0.7 * nz, 0, 1)
        shade = 0.3 + 0.7 * light
        spec = 160 * light**24
        bgr = [np.clip(v * shade + spec, 0, 255) for v in BALL_RGB[::-1]]
        colour = np.stack([*bgr, np.zeros_like(shade)], axis=-1)
        a255 = np.rint(alpha * 255)
        # Premultiplied sprite and inverse alpha in uint16: a blend is then
        # (bg * inv + pm + 127) // 255 with no float per pixel.
        self._ball_pm = np.rint(colour * a255[..., None]).astype(np.uint16)
        self._ball_inv = (255 - a255).astype(np.uint16)[..., None]
        self._ball_r = r
        self._ball_d = d
        vx, vy = self._ball_vel  # keep the direction across a resize
        self._ball_vel = (math.copysign(0.45 * c.w, vx), math.copysign(0.35 * c.h, vy))
        self._ball_pos = (c.w / 3, c.h / 2)

    def _ball_box(self) -> Rect:
        c, d = self.layout.canvas, self._ball_d
        x, y = self._ball_pos
        return Rect(c.x + round(x - (d - 1) / 2), c.y + round(y - (d - 1) / 2), d, d)

    def _blend_ball(self, clip: Rect) -> None:
        box = self._ball_box()
        part = box.intersect(clip)
        if part.is_empty():
            return
        sy = slice(part.y - box.y, part.bottom - box.y)
        sx = slice(part.x - box.x, part.right - box.x)
        region = self._work[part.slices()]
        mixed = (region * self._ball_inv[sy, sx] + self._ball_pm[sy, sx] + 127) // 255
        region[...] = mixed

    def _recompose(self, rect: Rect) -> Rect:
        """Canvas pixels in `rect` = paint layer + ball. Returns the rect."""
        c = self.layout.canvas
        r = rect.intersect(c)
        if not r.is_empty():
            local = Rect(r.x - c.x, r.y - c.y, r.w, r.h)
            self._work[r.slices()] = self._layer[local.slices()]
            self._blend_ball(r)
        return r

    def _step_ball(self, dt: float) -> None:
        c, r = self.layout.canvas, self._ball_r
        (x, y), (vx, vy) = self._ball_pos, self._ball_vel
        x, y = x + vx * dt, y + vy * dt
        if not r <= x <= c.w - r:
            vx, x = -vx, min(max(x, r), c.w - r)
        if not r <= y <= c.h - r:
            vy, y = -vy, min(max(y, r), c.h - r)
        with self._drawing() as touched:
            old = self._ball_box()
            self._ball_pos, self._ball_vel = (x, y), (vx, vy)
            new = self._ball_box()
            if old.intersect(new).is_empty():
                touched += [self._recompose(old), self._recompose(new)]
            else:
                touched.append(self._recompose(old.union(new)))

    # photo

    def _prepare_photo(self) -> None:
        p = self.layout.photo
        v, u = np.mgrid[0 : p.h, 0 : p.w].astype(np.float32)
        u /= max(1, p.w - 1)
        v /= max(1, p.h - 1)
        aspect = p.w / max(1, p.h)
        # Each moving wave is sin(phase(u, v) + w t) = S cos(w t) + C sin(w t)
        # with S, C precomputed, so a frame costs a few multiply-adds.
        phases = (
            6.0 * u + 3.0 * v,
            11.0 * np.hypot((u - 0.25) * aspect, v - 0.7),
            7.0 * v + 1.5 * np.sin(5.0 * u),
        )
        self._photo_waves = [(np.sin(a) * 0.45, np.cos(a) * 0.45) for a in phases]
        self._photo_speeds = (0.35, -0.5, 0.23)
        self._photo_base = (2.2 * v - 1.1).astype(np.float32)  # dusk sky: dark at top
        self._photo_acc = np.empty_like(self._photo_base)
        self._photo_tmp = np.empty_like(self._photo_base)
        pos = np.linspace(0, 1, 256)
        stops = [s for s, _ in PHOTO_STOPS]
        channels = [np.interp(pos, stops, [c[i] for _, c in PHOTO_STOPS]) for i in range(3)]
        r, g, b = (np.rint(ch).astype(np.uint32) for ch in channels)
        self._palette = b | g << 8 | r << 16

    def _photo_frame(self) -> Pixels32:
        acc, tmp = self._photo_acc, self._photo_tmp
        np.copyto(acc, self._photo_base)
        for (s, c), w in zip(self._photo_waves, self._photo_speeds, strict=True):
            np.multiply(s, math.cos(w * self._photo_t), out=tmp)
            acc += tmp
            np.multiply(c, math.sin(w * self._photo_t), out=tmp)
            acc += tmp
        # The value lies in about [-2.5, 2.5]; map it onto the palette.
        acc *= 255 / 5.0
        acc += 127.5
        np.clip(acc, 0, 255, out=acc)
        frame: Pixels32 = self._palette.take(acc.astype(np.uint8))
        return frame

    def _step_photo(self) -> None:
        frame = self._photo_frame()  # computed outside the lock
        with self._drawing() as touched:
            self._work32[self.layout.photo.slices()] = frame
            touched.append(self.layout.photo)

    # -- typing ---------------------------------------------------------------------

    def _row_rect(self, i: int) -> Rect:
        rows, lh = self.layout.rows, self.font.line_height
        return Rect(rows.x, rows.y + i * lh, rows.w, lh)

    def _draw_row(self, i: int) -> Rect:
        box = self._row_rect(i)
        self._work32[box.slices()] = PANEL
        if i < len(self._lines):
            end = self._text(box.x, box.y, self._lines[i], TYPED, PANEL, box).right
            if i == len(self._lines) - 1:
                cursor = Rect(max(box.x, end), box.y + 1, self._cursor_w, box.h - 2)
                self._work32[cursor.intersect(box).slices()] = CLOCK
        return box

    def type_text(self, text: str) -> None:
        """Type `text` into the keyboard panel ("\\b" erases, "\\n" breaks
        the line). Trio thread."""
        lines, font = self._lines, self.font
        limit = self.layout.rows.w - self._cursor_w
        old_count = len(lines)
        first = len(lines) - 1  # first row that changes
        scrolled = False
        for ch in text:
            if ch == "\b":
                if lines[-1]:
                    lines[-1] = lines[-1][:-1]
                elif len(lines) > 1:
                    lines.pop()
                first = min(first, len(lines) - 1)
            elif ch == "\n":
                lines.append("")
            elif font.width(lines[-1] + ch) > limit:
                # Wrap, carrying the unfinished word over when there is one; a
                # space that does not fit ends the line instead.
                head, space, word = lines[-1].rpartition(" ")
                if ch == " ":
                    lines.append("")
                elif space and head:
                    lines[-1] = head + space
                    lines.append(word + ch)
                    first = min(first, len(lines) - 2)
                else:
                    lines.append(ch)
            else:
                lines[-1] += ch
            if len(lines) > self._max_rows:
                del lines[0]
                scrolled = True
        if scrolled:
            first, old_count = 0, self._max_rows
        with self._drawing() as touched:
            touched += [self._draw_row(i) for i in range(first, max(old_count, len(lines)))]

    async def key_event(self, keysym: int, down: bool) -> None:
        await trio.lowlevel.checkpoint()
        text = _keysym_text(keysym) if down else None
        if text is not None:
            self.type_text(text)

    async def clipboard_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        text = text.replace("\r\n", "\n")[:1000]
        self.type_text("".join(ch for ch in text if ch == "\n" or ch.isprintable()))

    # -- painting -----------------------------------------------------------------

    def _draw_canvas_background(self) -> None:
        self._layer32[...] = CANVAS
        mask = self.font.mask(CANVAS_TEXT)[:, : self._layer.shape[1]]
        pad = max(2, self.layout.rows.x - self.layout.text.x)
        h, w = mask.shape
        area = self._layer32[pad : pad + h, pad : pad + w]
        area[...] = _text_lut(CANVAS_LABEL, CANVAS)[mask[: area.shape[0], : area.shape[1]]]

    def _paint(self, p0: tuple[int, int], p1: tuple[int, int]) -> list[Rect]:
        """Stroke from p0 to p1 (desktop coordinates) into the paint layer;
        returns the desktop rects it touched."""
        c, r = self.layout.canvas, self._brush
        colour = INK[self._strokes % len(INK)]
        (x0, y0), (x1, y1) = p0, p1
        # Long segments go in pieces, so each distance field stays small.
        pieces = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / 48))
        rects = []
        for k in range(pieces):
            ax, ay = x0 + (x1 - x0) * k / pieces, y0 + (y1 - y0) * k / pieces
            bx, by = x0 + (x1 - x0) * (k + 1) / pieces, y0 + (y1 - y0) * (k + 1) / pieces
            left, top = math.floor(min(ax, bx)) - r, math.floor(min(ay, by)) - r
            box = Rect(left, top, math.ceil(max(ax, bx)) + r + 1 - left,
                       math.ceil(max(ay, by)) + r + 1 - top).intersect(c)  # fmt: skip
            if box.is_empty():
                continue
            yy, xx = np.mgrid[box.y : box.bottom, box.x : box.right].astype(np.float32)
            dx, dy = bx - ax, by - ay
            length2 = dx * dx + dy * dy
            t = ((xx - ax) * dx + (yy - ay) * dy) / length2 if length2 else np.zeros_like(xx)
            np.clip(t, 0, 1, out=t)
            inside = np.hypot(xx - (ax + t * dx), yy - (ay + t * dy)) <= r
            local = Rect(box.x - c.x, box.y - c.y, box.w, box.h)
            self._layer32[local.slices()][inside] = colour
            rects.append(box)
        return rects

    async def pointer_event(self, x: int, y: int, buttons: int) -> None:
        await trio.lowlevel.checkpoint()
        pressed = buttons & ~self._buttons
        self._buttons = buttons
        with self._drawing() as touched:
            if pressed & 4:  # right button: clear
                self._draw_canvas_background()
                touched.append(self._recompose(self.layout.canvas))
            if buttons & 1:
                if pressed & 1 or self._last_point is None:
                    self._strokes += 1
                    start = (x, y)
                else:
                    start = self._last_point
                touched += [self._recompose(r) for r in self._paint(start, (x, y))]
                self._last_point = (x, y)
            else:
                self._last_point = None

# Where pixels come from. A Source owns a desktop: it reports damage hints,
# captures pixels on request, and receives the viewers' input. The framebuffer
# service pulls from it (wait for damage, capture, compare tiles, publish), so a
# Source never needs to know about clients, encodings or timing.
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..geometry import Rect

Pixels = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Damage:
    """What changed, as far as the source knows. `rects` empty and `full` false
    means "something may have changed": the service compares tiles everywhere."""

    rects: tuple[Rect, ...] = ()
    full: bool = False


@dataclass(frozen=True)
class CursorImage:
    """A pointer shape: RGBA, premultiplied alpha, (h, w, 4) uint8, and the
    hot spot. `serial` changes whenever the shape does."""

    rgba: Pixels
    hotspot: tuple[int, int]
    serial: int


class SourceListener(Protocol):
    """What a source tells the server besides pixels. Called on the trio
    thread; the server implements it."""

    def clipboard_changed(self, text: str) -> None:
        """The desktop's clipboard now holds `text` (viewers get it)."""

    def cursor_changed(self, cursor: CursorImage) -> None:
        """The pointer shape changed."""

    def bell(self) -> None:
        """The desktop rang its bell."""

    def source_ended(self, reason: str) -> None:
        """The desktop went away (an X server exited): the server stops."""


class Source(abc.ABC):
    """A desktop that trivnc shares.

    Threading: `capture` is called from a worker thread (never concurrently
    with itself); every other method runs on the trio thread.
    """

    #: Name shown to viewers (ServerInit, DesktopName).
    name: str = "trivnc"
    #: Set by the server before `run()`; sources that have a clipboard, a
    #: cursor or a bell report them through it.
    listener: SourceListener | None = None

    @property
    @abc.abstractmethod
    def size(self) -> tuple[int, int]:
        """Current (width, height)."""

    async def run(self) -> None:
        """Long-running work the source needs (an X event loop, an animation).
        The service runs it in its nursery; the default does nothing."""

    @abc.abstractmethod
    async def wait_damage(self) -> Damage:
        """Block until something may have changed; return the hint."""

    def take_damage(self) -> Damage | None:
        """The damage gathered since the last `wait_damage`, without waiting;
        None if there is none (or the source cannot tell: the default). The
        framebuffer service calls it after its short deferral, so that a
        change drawn in several steps is captured once."""
        return None

    @abc.abstractmethod
    def capture(self, damage: Damage) -> Pixels:
        """Return the whole desktop, BGRX (height, width, 4) uint8, as a new
        array or one the source will not write again. Called in a worker
        thread. May refresh only the damaged parts of a cached copy."""

    # -- input from viewers (defaults: ignore) ---------------------------------

    async def key_event(self, keysym: int, down: bool) -> None:
        """An X11 keysym pressed or released."""

    async def pointer_event(self, x: int, y: int, buttons: int) -> None:
        """Pointer at (x, y) with button mask (bit 0 left ... bit 7 back)."""

    async def scroll_event(self, x: int, y: int, dx: int, dy: int) -> None:
        """A scroll by (dx, dy) steps at (x, y) (KasmVNC's pointer deltas)."""

    async def clipboard_text(self, text: str) -> None:
        """A viewer's clipboard text."""

    async def set_size(self, width: int, height: int) -> bool:
        """A viewer asked to resize the desktop; True if it was done."""
        return False

# A desktop that is an application's numpy array. The application draws into
# `source.pixels` and publishes with `mark_changed`; viewers' input comes back
# as frozen events on a bounded channel (and/or an async callback), so a trio
# program can serve its own rendering without writing a Source.
#
# Also home of the damage bookkeeping that every in-process source shares:
# `DamageAccumulator` (coalescing, bounded) and `DamageQueue` (producer side on
# any thread, one consumer awaiting on the trio thread).
from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import trio

from ..geometry import Rect
from .base import Damage, Pixels, Source

#: Largest desktop side we accept from a viewer's resize request; RFB sizes
#: are U16, and a bigger array is a memory hazard rather than a desktop.
MAX_SIDE = 16384


# -- damage bookkeeping -------------------------------------------------------


def _contains(outer: Rect, inner: Rect) -> bool:
    return (
        outer.x <= inner.x
        and outer.y <= inner.y
        and outer.right >= inner.right
        and outer.bottom >= inner.bottom
    )


class DamageAccumulator:
    """Damage rects since the last `take`, coalesced and bounded.

    Not thread-safe by itself; `DamageQueue` and `DemoSource` guard it.

    Two rects merge when their bounding box is no larger than the two areas
    together (overlapping or touching boxes, such as a moving sprite's old and
    new position), so the list stays short without growing the area much.
    Past `max_rects` the whole set collapses to its bounding box: a viewer
    gets one larger update rather than a long list, and the cost of each
    `add` stays O(max_rects).
    """

    def __init__(self, width: int, height: int, *, max_rects: int = 32) -> None:
        if max_rects < 1:
            raise ValueError("max_rects must be at least 1")
        self._bounds = Rect(0, 0, width, height)
        self._max_rects = max_rects
        self._rects: list[Rect] = []
        self._full = False

    @property
    def bounds(self) -> Rect:
        return self._bounds

    def __bool__(self) -> bool:
        return self._full or bool(self._rects)

    def add(self, rect: Rect | None) -> bool:
        """Record `rect` (None: everything). True if pending damage grew."""
        if self._full:
            return False
        if rect is None:
            self._set_full()
            return True
        r = rect.intersect(self._bounds)
        if r.is_empty():
            return False
        rects = self._rects
        if any(_contains(e, r) for e in rects):
            return False
        # Merging can make the grown rect overlap another one: repeat until
        # nothing more merges (at most len(rects) rounds).
        merged = True
        while merged:
            merged = False
            for i, e in enumerate(rects):
                u = e.union(r)
                if u.area <= e.area + r.area:
                    del rects[i]
                    r = u
                    merged = True
                    break
        rects.append(r)
        if len(rects) > self._max_rects:
            box = rects[0]
            for e in rects[1:]:
                box = box.union(e)
            rects[:] = [box]
            r = box
        if r == self._bounds:
            self._set_full()
        return True

    def _set_full(self) -> None:
        self._full = True
        self._rects.clear()

    def take(self) -> Damage | None:
        """The pending damage (None if there is none); starts afresh."""
        if self._full:
            damage = Damage(full=True)
        elif self._rects:
            damage = Damage(rects=tuple(self._rects))
        else:
            return None
        self._rects = []
        self._full = False
        return damage

    def reset(self, width: int, height: int) -> None:
        """New desktop size: everything is damaged."""
        self._bounds = Rect(0, 0, width, height)
        self._set_full()


class DamageQueue:
    """Damage handed from producers to the one task that awaits `wait`.

    `add` is for the trio thread; `add_threadsafe` may be called from any
    thread (a render thread, a `trio.to_thread` worker, even the trio thread).
    Both only take a short `threading.Lock`: a producer never waits for the
    consumer, and damage that arrives while nobody waits simply accumulates.

    Cross-thread wake-ups go through the trio token's `run_sync_soon`, at most
    one in flight at a time, so a thread that marks damage in a tight loop
    cannot flood trio's callback queue.
    """

    def __init__(self, width: int, height: int, *, max_rects: int = 32) -> None:
        self._lock = threading.Lock()
        self._acc = DamageAccumulator(width, height, max_rects=max_rects)
        # Everything below is guarded by _lock. The token and thread id are
        # learnt from the consumer: they exist once somebody awaits `wait`.
        self._waiter: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._wake_scheduled = False

    def add(self, rect: Rect | None = None) -> None:
        """Mark `rect` (None: everything) as changed, from the trio thread.

        Called from another thread it still works (it falls back to the
        thread-safe wake-up), but `add_threadsafe` states the intent.
        """
        self._add(rect, threadsafe=False)

    def add_threadsafe(self, rect: Rect | None = None) -> None:
        """Mark `rect` (None: everything) as changed, from any thread."""
        self._add(rect, threadsafe=True)

    def reset(self, width: int, height: int) -> None:
        """The desktop changed size: the next `wait` reports full damage."""
        with self._lock:
            self._acc.reset(width, height)
        self._wake_consumer(threadsafe=False)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._acc)

    def _add(self, rect: Rect | None, *, threadsafe: bool) -> None:
        with self._lock:
            grew = self._acc.add(rect)
        if grew:
            self._wake_consumer(threadsafe=threadsafe)

    def _wake_consumer(self, *, threadsafe: bool) -> None:
        with self._lock:
            waiter = self._waiter
            if waiter is None or waiter.is_set():
                return  # the next `wait` finds the damage under the lock
            direct = not threadsafe and threading.get_ident() == self._trio_thread
            token = self._token
            if not direct:
                if self._wake_scheduled:
                    return
                self._wake_scheduled = True
        if direct:
            waiter.set()
            return
        assert token is not None  # set together with _waiter
        try:
            token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            # The consumer's run is over; the damage stays pending for a
            # consumer in a later run.
            with self._lock:
                self._wake_scheduled = False

    def _wake(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            waiter = self._waiter
        if waiter is not None:
            waiter.set()

    def take(self) -> Damage | None:
        """All the damage gathered so far, or None; never waits."""
        with self._lock:
            return self._acc.take()

    async def wait(self) -> Damage:
        """Wait until there is damage, take all of it and return it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        token = trio.lowlevel.current_trio_token()
        while True:
            with self._lock:
                self._token = token
                self._trio_thread = threading.get_ident()
                damage = self._acc.take()
                if damage is None:
                    waiter = self._waiter = trio.Event()
            if damage is not None:
                # Shielded: being cancelled here would lose damage we took.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return damage
            try:
                await waiter.wait()
            finally:
                with self._lock:
                    self._waiter = None


# -- input events -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyInput:
    """An X11 keysym pressed (`down`) or released."""

    keysym: int
    down: bool


@dataclass(frozen=True, slots=True)
class PointerInput:
    """Pointer at (x, y); `buttons` bit 0 is the left button, bit 2 the right."""

    x: int
    y: int
    buttons: int


@dataclass(frozen=True, slots=True)
class ScrollInput:
    """A scroll by (dx, dy) steps at (x, y)."""

    x: int
    y: int
    dx: int
    dy: int


@dataclass(frozen=True, slots=True)
class ClipboardInput:
    """A viewer's clipboard text."""

    text: str


@dataclass(frozen=True, slots=True)
class ResizeRequest:
    """A viewer asked for a new desktop size; `applied` says whether the
    source resized its array (then re-read `source.pixels`)."""

    width: int
    height: int
    applied: bool


InputEvent = KeyInput | PointerInput | ScrollInput | ClipboardInput | ResizeRequest
InputCallback = Callable[[InputEvent], Awaitable[None]]


# -- the source ---------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"desktop size {width}x{height} out of range 1..{MAX_SIDE}")


def _check_pixels(pixels: Pixels) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 4:
        raise ValueError(
            f"expected a BGRX (height, width, 4) uint8 array, got {pixels.dtype} {pixels.shape}"
        )
    _check_size(pixels.shape[1], pixels.shape[0])


class ArraySource(Source):
    """Serves a numpy array that the application draws into.

    Draw into `pixels` (BGRX: byte 0 blue, 1 green, 2 red, 3 unused) or the
    `rgb` view, then call `mark_changed(rect)` (None: the whole desktop).
    Nothing reaches viewers until it is marked.

    Tearing: `capture` copies the array in a worker thread. If the
    application may draw while a capture runs and must never show a
    half-drawn update, it holds `source.lock` while drawing; capture holds
    the same lock for one full-frame copy (about 1 ms at 1920x1080). Without
    the lock a capture may catch a partly drawn update; the damage that the
    drawing marks afterwards makes the next capture right again.

    Input: every viewer event becomes a frozen `InputEvent`. It is passed to
    `on_input` (awaited in the viewer's receive task, so keep it quick) and,
    once `input_events()` has been called, queued on a channel of
    `input_capacity` events. When the channel is full the event is dropped
    and counted in `dropped_events`: an application that stops reading must
    not stall the server.
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        name: str = "trivnc",
        resizable: bool = False,
        on_input: InputCallback | None = None,
        input_capacity: int = 256,
        max_rects: int = 32,
    ) -> None:
        _check_size(width, height)
        self._init(
            np.zeros((height, width, 4), np.uint8),
            name=name,
            resizable=resizable,
            on_input=on_input,
            input_capacity=input_capacity,
            max_rects=max_rects,
        )

    @classmethod
    def from_array(
        cls,
        pixels: Pixels,
        *,
        name: str = "trivnc",
        resizable: bool = False,
        on_input: InputCallback | None = None,
        input_capacity: int = 256,
        max_rects: int = 32,
    ) -> ArraySource:
        """Serve an existing BGRX (height, width, 4) uint8 array in place (not
        copied: keep drawing into it). A resize replaces it with a new array."""
        _check_pixels(pixels)
        source = cls.__new__(cls)
        source._init(
            pixels,
            name=name,
            resizable=resizable,
            on_input=on_input,
            input_capacity=input_capacity,
            max_rects=max_rects,
        )
        return source

    def _init(
        self,
        pixels: Pixels,
        *,
        name: str,
        resizable: bool,
        on_input: InputCallback | None,
        input_capacity: int,
        max_rects: int,
    ) -> None:
        if input_capacity < 1:
            raise ValueError("input_capacity must be at least 1")
        self.name = name
        self.resizable = resizable
        #: Held by `capture` while it copies; see the class docstring.
        self.lock = threading.Lock()
        self._pixels = pixels
        self._damage = DamageQueue(pixels.shape[1], pixels.shape[0], max_rects=max_rects)
        self._on_input = on_input
        send, receive = trio.open_memory_channel[InputEvent](input_capacity)
        self._input_send: trio.MemorySendChannel[InputEvent] = send
        self._input_receive: trio.MemoryReceiveChannel[InputEvent] = receive
        self._subscribed = False
        self._dropped = 0

    # -- pixels ------------------------------------------------------------------

    @property
    def size(self) -> tuple[int, int]:
        h, w = self._pixels.shape[:2]
        return w, h

    @property
    def pixels(self) -> Pixels:
        """The BGRX (height, width, 4) uint8 array viewers see once marked."""
        return self._pixels

    @property
    def rgb(self) -> Pixels:
        """A writable (height, width, 3) RGB view of `pixels` (no copy; its
        channel stride is negative, so copy it before handing it to codecs)."""
        return self._pixels[..., 2::-1]

    @rgb.setter
    def rgb(self, value: npt.ArrayLike) -> None:
        # Broadcasts, so `source.rgb = (255, 0, 0)` fills the desktop red.
        self._pixels[..., 2::-1] = value

    def mark_changed(self, rect: Rect | None = None) -> None:
        """Publish a change to `rect` (None: everything). Call it on the trio
        thread; other threads use `mark_changed_threadsafe`."""
        self._damage.add(rect)

    def mark_changed_threadsafe(self, rect: Rect | None = None) -> None:
        """`mark_changed` for any thread, including threads trio did not
        start. It never blocks on trio: the change is recorded under a short
        lock and trio is woken with `TrioToken.run_sync_soon`."""
        self._damage.add_threadsafe(rect)

    async def wait_damage(self) -> Damage:
        return await self._damage.wait()

    def take_damage(self) -> Damage | None:
        return self._damage.take()

    def capture(self, damage: Damage) -> Pixels:
        # A fresh copy every time, even though only the damaged rects changed:
        # the service may still be reading earlier frames (encoders, tile
        # compare), so nothing we returned may ever be written again, and a
        # new full-size array costs one memcpy either way.
        with self.lock:
            return self._pixels.copy()

    # -- resize ------------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        """Replace `pixels` with a new (height, width, 4) array keeping the
        overlapping part; everything is damaged. Trio thread."""
        _check_size(width, height)
        new = np.zeros((height, width, 4), np.uint8)
        with self.lock:
            old = self._pixels
            h, w = min(height, old.shape[0]), min(width, old.shape[1])
            new[:h, :w] = old[:h, :w]
            self._pixels = new
        self._damage.reset(width, height)

    async def set_size(self, width: int, height: int) -> bool:
        applied = self.resizable and 0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE
        if applied:
            self.resize(width, height)
        await self._post(ResizeRequest(width, height, applied))
        return applied

    # -- input ---------------------------------------------------------------------

    def input_events(self) -> trio.MemoryReceiveChannel[InputEvent]:
        """The channel of viewers' input. Events are queued from the first
        call on (before it, nobody would read them). Close it to stop."""
        self._subscribed = True
        return self._input_receive

    @property
    def dropped_events(self) -> int:
        """Events lost because the input channel was full."""
        return self._dropped

    async def _post(self, event: InputEvent) -> None:
        if self._on_input is not None:
            await self._on_input(event)
        else:
            await trio.lowlevel.checkpoint()
        if not self._subscribed:
            return
        try:
            self._input_send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1
        except trio.BrokenResourceError:
            self._subscribed = False  # the application closed its end

    async def key_event(self, keysym: int, down: bool) -> None:
        await self._post(KeyInput(keysym, down))

    async def pointer_event(self, x: int, y: int, buttons: int) -> None:
        await self._post(PointerInput(x, y, buttons))

    async def scroll_event(self, x: int, y: int, dx: int, dy: int) -> None:
        await self._post(ScrollInput(x, y, dx, dy))

    async def clipboard_text(self, text: str) -> None:
        await self._post(ClipboardInput(text))

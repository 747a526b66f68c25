# An X11 display as a trivnc Source.
#
# Two connections, one per thread, because neither libX11 (without
# XInitThreads) nor python-xlib may be shared between threads:
#   - the trio thread owns a python-xlib Display: DAMAGE events say what
#     changed, RandR events say the screen changed size, and RandR requests
#     resize it for viewers. Its event loop waits with wait_readable on the
#     socket and never blocks on anything but short local round trips.
#   - the capture side (`shm.ScreenCapture`, a libX11 connection through
#     ctypes) is used only by `capture`, which the framebuffer service calls in
#     a worker thread, never twice at once.
# Keyboard and pointer (XTEST), the clipboard and the cursor shape live in
# input.py, clipboard.py and cursor.py, each with its own python-xlib
# connection; this source starts them and forwards viewers' input to them.
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import numpy as np
import trio

from ...geometry import Rect
from ..array import DamageQueue
from ..base import CursorImage, Damage, Pixels, Source, SourceListener
from .shm import CaptureError, DisplayGone, ScreenCapture, open_capture

log = logging.getLogger("trivnc.x11")

#: Grabbing one rect costs a round trip plus its pixels. On Xvfb with MIT-SHM
#: a 64x64 grab takes about 0.03 ms and a 256x256 one about 0.05-0.14 ms, so
#: the round trip is worth some 50k pixels of copying (see `_plan_grabs`).
#: How long input and resizes wait for run() to connect to the X server.
CONNECT_WAIT = 5.0
GRAB_OVERHEAD_PIXELS = 50_000
#: RandR sizes are CARD16, and X coordinates are signed 16-bit.
MAX_SIDE = 32767
#: Physical size we give a resized screen (96 DPI, what Xvfb assumes).
_DPI = 96.0


class _InputHelper(Protocol):
    async def key_event(self, keysym: int, down: bool) -> None: ...
    async def pointer_event(self, x: int, y: int, buttons: int) -> None: ...
    async def scroll_event(self, x: int, y: int, dx: int, dy: int) -> None: ...


class _RunningHelper(Protocol):
    async def run(self) -> None: ...


class _ClipboardHelper(_RunningHelper, Protocol):
    async def set_text(self, text: str) -> None: ...


class _LoggingListener:
    """Stands in when the server did not set `Source.listener`."""

    def clipboard_changed(self, text: str) -> None:
        log.debug("X clipboard changed (%d characters), nobody listens", len(text))

    def cursor_changed(self, cursor: CursorImage) -> None:
        pass

    def bell(self) -> None:
        pass

    def source_ended(self, reason: str) -> None:
        log.warning("%s", reason)


def _optional_class(module: str, name: str) -> Any:
    """`name` from trivnc.sources.x11.`module`, or None while that module does
    not exist. Any other import failure is a bug and propagates."""
    qualified = f"{__package__}.{module}"
    try:
        return getattr(importlib.import_module(qualified), name)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            raise
        log.info("%s is not available: X11 %s disabled", qualified, module)
        return None


def _plan_grabs(rects: Sequence[Rect]) -> list[Rect]:
    """The rects to read from the X server for `rects` of damage: each one, or
    their bounding box when one bigger read is cheaper than many round trips."""
    if len(rects) <= 1:
        return list(rects)
    box = rects[0]
    for r in rects[1:]:
        box = box.union(r)
    separate = sum(r.area for r in rects) + len(rects) * GRAB_OVERHEAD_PIXELS
    if box.area + GRAB_OVERHEAD_PIXELS <= separate:
        return [box]
    return list(rects)


class FrameBuffers:
    """Recycled frame buffers, so a partial capture need not copy the whole
    previous frame (8 MB at 1080p, the largest cost of a small change).

    A returned frame is never written while anyone else holds it: a buffer is
    reused only when the pool's is the last reference (the service and the
    sessions have let go of that frame). It is then brought up to date by
    copying from the previous frame just the rects that changed since the
    buffer was last written, before the new damage is grabbed into it.
    """

    #: The frame being filled, the latest one (the service's), the one a
    #: viewer is still encoding and one spare: with fewer, a busy pipeline
    #: allocates (and the kernel zeroes) a new frame every time.
    MAX_BUFFERS = 4
    MAX_STALE_RECTS = 64

    def __init__(self) -> None:
        # [pixels, rects changed since these pixels were current (None: all)]
        self._pool: list[list[Any]] = []

    def reset(self, frame: Pixels) -> None:
        """`frame` (a fresh full capture) is current; everything else is stale."""
        for entry in self._pool:
            entry[1] = None
        current: list[Any] = [frame, []]
        self._pool.append(current)
        self._trim(keep=current)

    def take(self, prev: Pixels, damage: list[Rect]) -> Pixels:
        """A writable buffer holding `prev`'s pixels, into which `damage`
        is about to be grabbed."""
        chosen = None
        chosen_cost = 0
        for entry in self._pool:
            pixels = entry[0]
            # References when free: the pool's list, the local `pixels` and
            # getrefcount's argument.
            # Only arrays owning their memory can be made writable again.
            if (
                pixels is not prev
                and pixels.shape == prev.shape
                and pixels.flags.owndata
                and sys.getrefcount(pixels) <= 3
            ):
                # The free buffer that is least behind costs the least copying.
                stale = entry[1]
                cost = pixels.size if stale is None else sum(r.area for r in stale)
                if chosen is None or cost < chosen_cost:
                    chosen, chosen_cost = entry, cost
        if chosen is None:
            frame = prev.copy()
            chosen = [frame, []]
            self._pool.append(chosen)
        else:
            frame, stale = chosen
            frame.flags.writeable = True
            if stale is None:
                np.copyto(frame, prev)
            else:
                for rect in stale:
                    # What the grab is about to overwrite needs no copy (a
                    # video repainting one area: every frame).
                    if not any(d.contains(rect) for d in damage):
                        frame[rect.slices()] = prev[rect.slices()]
            chosen[1] = []
        # Every other buffer is now behind by this damage.
        for entry in self._pool:
            if entry is not chosen and entry[1] is not None:
                entry[1].extend(damage)
                if len(entry[1]) > self.MAX_STALE_RECTS:
                    entry[1] = None
        self._trim(keep=chosen)
        return frame

    def _trim(self, keep: list[Any] | None = None) -> None:
        while len(self._pool) > self.MAX_BUFFERS:
            oldest = self._pool[0] if self._pool[0] is not keep else self._pool[1]
            self._pool.remove(oldest)


class X11Source(Source):
    """Shares the X display `display` (":0", ":1.0", "host:2").

    The constructor opens the capture connection, so a display that cannot be
    opened fails here (`DisplayGone`) rather than inside the server.
    `use_shm=False` captures with plain XGetImage (what a remote display
    needs anyway); `capture_method` then says what is in use.

    When the X server goes away, `run()` calls `listener.source_ended` and
    returns; captures from then on return the last frame. A source that is
    never run should be `close()`d.
    """

    def __init__(
        self,
        display: str,
        *,
        use_shm: bool = True,
        name: str | None = None,
        clipboard_max_size: int = 1024 * 1024,
        max_rects: int = 32,
    ) -> None:
        self.display = display
        self.name = name if name is not None else f"trivnc {display}"
        self.use_shm = use_shm
        self.clipboard_max_size = clipboard_max_size
        self._screen: ScreenCapture | None = open_capture(display, use_shm=use_shm)
        width, height = self._screen.screen_size()
        #: Written on the trio thread only; the capture thread reads it.
        self._size = (width, height)
        self._damage = DamageQueue(width, height, max_rects=max_rects)
        # Capture state: touched only inside `capture` (one worker thread at a
        # time) and by `_close_screen`, under this lock.
        self._capture_lock = threading.Lock()
        self._frame: Pixels | None = None
        self._buffers = FrameBuffers()
        #: The DAMAGE object that `capture` clears before it grabs, when the
        #: capture connection can (set on the trio thread, read by capture).
        self._clear_on_capture: int | None = None
        # Trio-thread state.
        self._xdisplay: Any = None
        self._x_errors: list[Any] = []
        self._pump_wait: trio.CancelScope | None = None
        self._input: _InputHelper | None = None
        self._clipboard: _ClipboardHelper | None = None
        self._ended = False
        #: Set once run() has connected and started the input and clipboard
        #: helpers; a viewer can be faster than that (capture works from the
        #: constructor on), and its first input or resize must not be lost.
        self._connected = trio.Event()

    async def _wait_connected(self) -> None:
        if not self._connected.is_set() and not self._ended:
            with trio.move_on_after(CONNECT_WAIT):
                await self._connected.wait()

    # -- Source: pixels ----------------------------------------------------------

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    @property
    def capture_method(self) -> str:
        """The capture in use: "shm", "xgetimage" or "xlib" (see
        `shm.open_capture`), or "closed"."""
        screen = self._screen
        return screen.method if screen is not None else "closed"

    async def wait_damage(self) -> Damage:
        return await self._damage.wait()

    def take_damage(self) -> Damage | None:
        return self._damage.take()

    def capture(self, damage: Damage) -> Pixels:
        # Worker thread. Every returned array is new (or the previous one
        # returned again unchanged): the service keeps old frames and reads
        # them from other threads, so a partial refresh copies the last frame
        # first and writes only into the copy.
        with self._capture_lock:
            screen = self._screen
            if screen is not None and not screen.closed:
                try:
                    damage_id = self._clear_on_capture
                    if damage_id is not None:
                        screen.subtract_damage(damage_id)
                    self._frame = self._grab(screen, damage)
                except DisplayGone as exc:
                    log.debug("%s: capture failed: %s", self.display, exc)
                except CaptureError as exc:
                    log.warning("%s: capture failed: %s", self.display, exc)
            if self._frame is None:
                width, height = self._size
                self._frame = np.zeros((height, width, 4), np.uint8)
            return self._frame

    def _grab(self, screen: ScreenCapture, damage: Damage) -> Pixels:
        prev = self._frame
        if prev is None or damage.full or not damage.rects:
            return self._adopt(screen.capture_screen())
        height, width = prev.shape[:2]
        if (width, height) != self._size:
            return self._adopt(screen.capture_screen())
        bounds = Rect(0, 0, width, height)
        rects = [c for c in (r.intersect(bounds) for r in damage.rects) if not c.is_empty()]
        if not rects:
            return prev
        frame = self._buffers.take(prev, rects)
        try:
            for rect in _plan_grabs(rects):
                screen.grab(rect, frame)
        except DisplayGone:
            raise
        except CaptureError:
            # The screen shrank under us (RandR): its new size is on its way
            # as an event; read what is there now.
            return self._adopt(screen.capture_screen())
        return frame

    def _adopt(self, frame: Pixels) -> Pixels:
        self._buffers.reset(frame)
        return frame

    # -- the event loop ------------------------------------------------------------

    async def run(self) -> None:
        from Xlib import display as xdisplay
        from Xlib import error as xerror

        listener: SourceListener = self.listener or _LoggingListener()
        self._ended = False
        if self._screen is None or self._screen.closed:
            # A second run() of the same source (the first one closed it).
            try:
                self._screen = await trio.to_thread.run_sync(
                    lambda: open_capture(self.display, use_shm=self.use_shm)
                )
            except CaptureError as exc:
                self._end(listener, f"cannot capture X display {self.display}: {exc}")
                return
        try:
            try:
                d = await trio.to_thread.run_sync(xdisplay.Display, self.display)
            except (xerror.DisplayError, xerror.ConnectionClosedError, OSError) as exc:
                self._end(listener, f"cannot open X display {self.display}: {exc}")
                return
            try:
                self._xdisplay = d
                await self._serve(d, listener)
            except (xerror.ConnectionClosedError, OSError) as exc:
                log.debug("%s: X connection lost: %s", self.display, exc)
                self._end(listener, f"X server {self.display} went away")
            finally:
                self._xdisplay = None
                self._input = self._clipboard = None
                with contextlib.suppress(xerror.ConnectionClosedError, OSError):
                    d.close()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_screen)

    def _close_screen(self) -> None:
        with self._capture_lock:
            if self._screen is not None:
                self._screen.close()

    def close(self) -> None:
        """Release the capture connection of a source that never ran (`run()`
        releases it when it ends). Blocks briefly if a capture is running."""
        self._close_screen()

    def _end(self, listener: SourceListener, reason: str) -> None:
        if not self._ended:
            self._ended = True
            listener.source_ended(reason)

    async def _serve(self, d: Any, listener: SourceListener) -> None:
        from Xlib import error as xerror
        from Xlib.ext import damage, randr

        d.set_error_handler(self._on_x_error)
        root = d.screen().root
        # DAMAGE refuses requests from a client that has not said which
        # version it speaks (python-xlib then misreports the error).
        d.damage_query_version()
        # DeltaRectangles where the capture connection can clear the damage
        # just before each grab: the server reports only area that is not
        # damaged already, so a video repainting one region sends one event
        # per capture, and the trio thread sends no request per event.
        # Otherwise BoundingBox, cleared here after each batch of events: the
        # server reports each growth of the changed area, then stays quiet
        # until we subtract.
        screen = self._screen
        clear_on_capture = screen is not None and screen.can_subtract_damage
        damage_id = root.damage_create(
            damage.DamageReportDeltaRectangles
            if clear_on_capture
            else damage.DamageReportBoundingBox
        )
        d.xrandr_query_version()
        root.xrandr_select_input(randr.RRScreenChangeNotifyMask)
        d.flush()  # python-xlib buffers requests: nothing is selected until sent
        if clear_on_capture:
            # Round trip first: the capture connection must not use the
            # damage before the server has created it.
            d.sync()
            self._clear_on_capture = damage_id
        self._screen_changed(*_root_size(root))

        lost: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._start_helpers(nursery, listener)
            self._connected.set()
            # Caught in here: escaping the nursery it would arrive at run()
            # wrapped in an ExceptionGroup.
            try:
                await self._pump(d, root, None if clear_on_capture else damage_id)
            except (xerror.ConnectionClosedError, OSError) as exc:
                lost = exc
            finally:
                self._clear_on_capture = None
            nursery.cancel_scope.cancel()  # the helpers' connections are dead too
        if lost is not None:
            raise lost

    async def _pump(self, d: Any, root: Any, damage_id: int | None) -> None:
        """Turn X events into damage and size changes. `damage_id` is the
        DAMAGE object to clear after each batch, None when captures clear it."""
        from Xlib import X

        damage_event = d.extension_event.DamageNotify
        screen_event = d.extension_event.ScreenChangeNotify
        while True:
            damaged = False
            # Drain first: round trips (ours, or set_size's) may already have
            # read events off the socket into python-xlib's queue. One
            # pending_events (a poll of the socket) per batch, not per event.
            for _ in range(d.pending_events()):
                event = d.next_event()
                if event.type == damage_event:
                    area = event.area
                    self._damage.add(Rect(area.x, area.y, area.width, area.height))
                    damaged = True
                elif event.type == screen_event:
                    self._screen_changed(*_root_size(root))
            if damaged and damage_id is not None:
                d.damage_subtract(damage_id, X.NONE, X.NONE)
                d.flush()
                # python-xlib's flush also reads whatever has arrived, so drain
                # again rather than wait on the socket; the checkpoint keeps a
                # desktop that never stops changing from starving other tasks.
                await trio.lowlevel.checkpoint()
                continue
            # set_size cancels this wait after its round trips, which may have
            # queued events that the socket will not signal again.
            with trio.CancelScope() as self._pump_wait:
                await trio.lowlevel.wait_readable(d.fileno())
            self._pump_wait = None

    def _wake_pump(self) -> None:
        if self._pump_wait is not None:
            self._pump_wait.cancel()

    def _on_x_error(self, error: Any, request: Any) -> None:
        # Errors for requests without replies (RandR's SetScreenSize, ...)
        # arrive here; set_size looks at them, the rest are only logged.
        self._x_errors.append(error)
        log.debug("%s: X error %s", self.display, error)

    def _screen_changed(self, width: int, height: int) -> None:
        if (width, height) != self._size:
            log.info("%s: screen is now %dx%d", self.display, width, height)
            self._size = (width, height)
            self._damage.reset(width, height)

    # -- input, clipboard and cursor helpers ----------------------------------------

    def _start_helpers(self, nursery: trio.Nursery, listener: SourceListener) -> None:
        input_class = _optional_class("input", "X11Input")
        if input_class is not None:
            self._input = input_class(self.display)
        clipboard_class = _optional_class("clipboard", "X11Clipboard")
        if clipboard_class is not None:
            clipboard: _ClipboardHelper = clipboard_class(
                self.display, listener, self.clipboard_max_size
            )
            self._clipboard = clipboard
            nursery.start_soon(self._run_helper, "clipboard", clipboard.run)
        cursor_class = _optional_class("cursor", "X11Cursor")
        if cursor_class is not None:
            cursor: _RunningHelper = cursor_class(self.display, listener)
            nursery.start_soon(self._run_helper, "cursor", cursor.run)
        input_run = getattr(self._input, "run", None)
        if input_run is not None:
            nursery.start_soon(self._run_helper, "input", input_run)

    async def _run_helper(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        # A helper that fails costs its feature, not the desktop: the event
        # loop notices a dead X server by itself.
        from Xlib import error as xerror

        try:
            await run()
        except (xerror.ConnectionClosedError, OSError) as exc:
            log.debug("%s: X11 %s ended: %s", self.display, what, exc)
        except Exception:
            log.exception("%s: X11 %s failed", self.display, what)

    async def _forward(self, call: Callable[[], Awaitable[None]]) -> None:
        from Xlib import error as xerror

        try:
            await call()
        except (xerror.ConnectionClosedError, OSError) as exc:
            # The X server is going away; run() reports that once.
            log.debug("%s: input dropped: %s", self.display, exc)

    async def key_event(self, keysym: int, down: bool) -> None:
        await self._wait_connected()
        helper = self._input
        if helper is not None:
            await self._forward(lambda: helper.key_event(keysym, down))

    async def pointer_event(self, x: int, y: int, buttons: int) -> None:
        await self._wait_connected()
        helper = self._input
        if helper is not None:
            await self._forward(lambda: helper.pointer_event(x, y, buttons))

    async def scroll_event(self, x: int, y: int, dx: int, dy: int) -> None:
        await self._wait_connected()
        helper = self._input
        if helper is not None:
            await self._forward(lambda: helper.scroll_event(x, y, dx, dy))

    async def clipboard_text(self, text: str) -> None:
        await self._wait_connected()
        helper = self._clipboard
        if helper is not None:
            await self._forward(lambda: helper.set_text(text))

    # -- resize ------------------------------------------------------------------------

    async def set_size(self, width: int, height: int) -> bool:
        """Resize the screen with RandR. True only if the root window now has
        exactly that size (Xvfb cannot grow beyond its -screen size)."""
        from Xlib import error as xerror

        await self._wait_connected()
        d = self._xdisplay
        if d is None or not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            return False
        try:
            done = randr_resize(d, width, height, self._x_errors)
        except xerror.XError as exc:
            log.info("%s: resize to %dx%d refused: %s", self.display, width, height, exc)
            done = False
        except (xerror.ConnectionClosedError, OSError) as exc:
            log.debug("%s: resize failed: %s", self.display, exc)
            done = False
        finally:
            self._wake_pump()
        if done:
            self._screen_changed(width, height)
        return done


# -- RandR --------------------------------------------------------------------


def randr_resize(d: Any, width: int, height: int, errors: list[Any]) -> bool:
    """Resize the screen of python-xlib Display `d` with RandR 1.2: find or
    make a mode of that size, add it to the active output, set the CRTC, set the
    screen size. `errors` is the list that `d`'s error handler appends to. True
    only if the root window now has exactly that size. Short local round trips."""
    from Xlib.ext import randr

    root = d.screen().root
    limits = root.xrandr_get_screen_size_range()
    if not (
        limits.min_width <= width <= limits.max_width
        and limits.min_height <= height <= limits.max_height
    ):
        log.info(
            "%s: %dx%d is outside the screen's range %dx%d..%dx%d",
            d.get_display_name(), width, height, limits.min_width, limits.min_height,
            limits.max_width, limits.max_height,
        )  # fmt: skip
        return False
    resources = root.xrandr_get_screen_resources()
    timestamp = resources.config_timestamp
    target = _pick_output(d, resources)
    if target is None:
        log.info("%s: no RandR output to resize", d.get_display_name())
        return False
    output, crtc, output_modes = target
    mode = next((m.id for m in resources.modes if (m.width, m.height) == (width, height)), None)
    if mode is None:
        name = f"{width}x{height}"
        info = {
            "id": 0, "width": width, "height": height, "dot_clock": width * height * 60,
            "h_sync_start": width, "h_sync_end": width, "h_total": width, "h_skew": 0,
            "v_sync_start": height, "v_sync_end": height, "v_total": height,
            "name_length": len(name), "flags": 0,
        }  # fmt: skip
        mode = root.xrandr_create_mode(info, name).mode
    if mode not in output_modes:
        d.xrandr_add_output_mode(output, mode)

    def screen_size(w: int, h: int) -> None:
        root.xrandr_set_screen_size(w, h, round(w / _DPI * 25.4), round(h / _DPI * 25.4))

    errors.clear()
    current_w, current_h = _root_size(root)
    # A CRTC must fit inside the screen: grow the screen before the mode,
    # shrink it after.
    if width > current_w or height > current_h:
        screen_size(max(width, current_w), max(height, current_h))
    reply = d.xrandr_set_crtc_config(crtc, timestamp, 0, 0, mode, randr.Rotate_0, [output])
    if reply.status != 0:
        log.info("%s: RandR SetCrtcConfig failed (status %d)", d.get_display_name(), reply.status)
        screen_size(current_w, current_h)
        d.sync()
        return False
    screen_size(width, height)
    d.sync()  # the errors of the requests above reach `errors` by now
    for error in errors:
        log.info("%s: resize to %dx%d: X error %s", d.get_display_name(), width, height, error)
    return _root_size(root) == (width, height)


def _pick_output(d: Any, resources: Any) -> tuple[int, int, list[int]] | None:
    """The output to resize (the first one driven by a CRTC, else the
    first connected one) with its CRTC and modes."""
    fallback = None
    for output in resources.outputs:
        info = d.xrandr_get_output_info(output, resources.config_timestamp)
        if info.crtc:
            return output, info.crtc, list(info.modes)
        if fallback is None and info.connection == 0 and info.crtcs:
            fallback = (output, info.crtcs[0], list(info.modes))
    return fallback


def _root_size(root: Any) -> tuple[int, int]:
    geometry = root.get_geometry()
    return int(geometry.width), int(geometry.height)

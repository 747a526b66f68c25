# The X pointer shape, for viewers that draw the cursor themselves (RFB
# pseudo-encodings Cursor, rfbproto "Cursor Pseudo-encoding", and VMware's
# alpha cursor). XFIXES reports every change of the displayed cursor with a
# serial number and hands out its image as premultiplied ARGB32.
from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import trio
from Xlib import error as xerror
from Xlib.display import Display
from Xlib.ext import xfixes

from ..base import CursorImage, Pixels, SourceListener

log = logging.getLogger(__name__)


def argb32_to_rgba(argb: Any, width: int, height: int) -> Pixels:
    """XFIXES cursor pixels (one premultiplied ARGB value per 32-bit word, in
    host order as python-xlib decodes them) as RGBA (height, width, 4) uint8,
    still premultiplied."""
    words = np.asarray(argb, dtype=np.uint32)
    if words.size != width * height or width == 0 or height == 0:
        # An empty or truncated reply: show nothing rather than fail.
        return np.zeros((1, 1, 4), np.uint8)
    words = words.reshape(height, width)
    rgba = np.empty((height, width, 4), np.uint8)
    rgba[..., 0] = words >> 16
    rgba[..., 1] = words >> 8
    rgba[..., 2] = words
    rgba[..., 3] = words >> 24
    return rgba


class X11Cursor:
    """Watches the X display's cursor and reports each new shape to
    `listener.cursor_changed`. Owns its own connection, used only on the trio
    thread."""

    def __init__(self, display_name: str, listener: SourceListener) -> None:
        self.display_name = display_name
        self.listener = listener
        self._serial: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report the current cursor, then every change, until cancelled or the
        X server goes away."""
        try:
            d = Display(self.display_name)
        except (xerror.DisplayError, OSError) as exc:
            log.error("X11 cursor: cannot open display %s: %s", self.display_name, exc)
            task_status.started()
            return
        try:
            d.set_error_handler(self._on_x_error)
            if not d.query_extension("XFIXES").present:
                log.warning("X11 cursor: no XFIXES on %s; cursor shape not shared", d)
                task_status.started()
                return
            # XFIXES answers nothing else until the version is negotiated.
            d.xfixes_query_version()
            root = d.screen().root
            d.xfixes_select_cursor_input(root, xfixes.XFixesDisplayCursorNotifyMask)
            self._refresh(d)  # the shape showing now; also flushes the select
            task_status.started()
            cursor_notify = d.extension_event.DisplayCursorNotify
            while True:
                while d.pending_events():
                    ev = d.next_event()
                    if (ev.type, getattr(ev, "sub_code", None)) == cursor_notify and (
                        ev.cursor_serial != self._serial
                    ):
                        self._refresh(d)
                await trio.lowlevel.wait_readable(d.fileno())
        except xerror.XError as exc:
            # Setup failed (XFIXES refused a request): this feature is off.
            log.warning("X11 cursor: stopped by X error: %s", exc)
        except (xerror.ConnectionClosedError, OSError) as exc:
            log.warning("X11 cursor: connection to %s lost: %s", self.display_name, exc)
        finally:
            with contextlib.suppress(xerror.ConnectionClosedError, OSError):
                d.close()

    @staticmethod
    def _on_x_error(err: Any, request: Any = None) -> None:
        log.warning("X11 cursor: X error %s", err)

    def _refresh(self, d: Any) -> None:
        """Fetch the current image; report it if its serial is new."""
        try:
            reply = d.xfixes_get_cursor_image(d.screen().root)
        except xerror.XError as exc:
            log.warning("X11 cursor: GetCursorImage failed: %s", exc)
            return
        if reply.cursor_serial == self._serial:
            return
        self._serial = reply.cursor_serial
        rgba = argb32_to_rgba(reply.cursor_image, reply.width, reply.height)
        hotspot = (min(reply.xhot, rgba.shape[1] - 1), min(reply.yhot, rgba.shape[0] - 1))
        self.listener.cursor_changed(CursorImage(rgba, hotspot, reply.cursor_serial))

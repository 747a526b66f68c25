# Screen capture from an X server, for the X11 source's capture thread.
#
# python-xlib has no MIT-SHM and parses GetImage replies in pure Python (about
# 18 ms per 1920x1080 frame), so this module talks to libX11 and libXext
# through ctypes on a C-level connection of its own: the server writes the
# pixels straight into a System V shared-memory segment (XShmGetImage) and we
# copy them out of a numpy view of that segment. Without MIT-SHM (a remote
# display, or a server without the extension) the same connection falls back to
# XGetImage, and without libX11 at all to python-xlib's get_image.
#
# Whatever the backend, the connection belongs to one capture thread at a time
# (every method takes the backend's lock): neither libX11 without
# XInitThreads nor python-xlib may be used from two threads at once, and the
# X11 source's event loop has its own python-xlib connection on the trio
# thread.
#
# libX11's default error handlers call exit(): an X error (BadMatch when the
# screen shrank under a GetImage) or a lost connection would end the whole
# process. We install process-wide handlers that turn errors on our own
# connections into exceptions (other connections still get the previous
# handlers) and, per connection, an I/O-error exit handler (libX11 >= 1.7)
# that returns instead of exiting. Where that exit handler does not exist,
# `open_capture` refuses the ctypes backends and uses python-xlib, which
# raises exceptions on its own.
from __future__ import annotations

import abc
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from typing import Final, Literal

import numpy as np

from ...geometry import Rect
from ..base import Pixels

log = logging.getLogger("trivnc.x11")

CaptureMethod = Literal["shm", "xgetimage", "xlib"]

_ZPIXMAP: Final = 2
_LSB_FIRST: Final = 0
_IPC_PRIVATE: Final = 0
_IPC_CREAT: Final = 0o1000
_IPC_RMID: Final = 0
#: Every plane: XAllPlanes() is ~0 as an unsigned long.
_ALL_PLANES: Final = ctypes.c_ulong(-1).value
#: The only pixel layout trivnc serves: 32 bits per pixel, little-endian,
#: red in bits 16-23, which is BGRX in memory (the X byte is 0 on Xvfb).
_BGRX_MASKS: Final = (0xFF0000, 0x00FF00, 0x0000FF)


class CaptureError(Exception):
    """A capture request failed; the connection is still usable (typically the
    screen changed size while we asked for a rectangle of the old one)."""


class DisplayGone(CaptureError):
    """The X connection is broken (the server exited)."""


class UnsupportedDisplay(CaptureError):
    """The display cannot be captured this way (no MIT-SHM, not a 32-bit
    TrueColor screen, no libX11...)."""


# -- ctypes declarations ------------------------------------------------------


class _XImage(ctypes.Structure):
    # The leading fields of Xlib's XImage, up to `obdata`. We only ever hold a
    # pointer that Xlib allocated, so the trailing function table (which we
    # never touch) may be left out.
    _fields_ = (
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("xoffset", ctypes.c_int),
        ("format", ctypes.c_int),
        # char * as c_void_p: c_char_p would turn it into a bytes copy.
        ("data", ctypes.c_void_p),
        ("byte_order", ctypes.c_int),
        ("bitmap_unit", ctypes.c_int),
        ("bitmap_bit_order", ctypes.c_int),
        ("bitmap_pad", ctypes.c_int),
        ("depth", ctypes.c_int),
        ("bytes_per_line", ctypes.c_int),
        ("bits_per_pixel", ctypes.c_int),
        ("red_mask", ctypes.c_ulong),
        ("green_mask", ctypes.c_ulong),
        ("blue_mask", ctypes.c_ulong),
        ("obdata", ctypes.c_void_p),
    )


class _XShmSegmentInfo(ctypes.Structure):
    _fields_ = (
        ("shmseg", ctypes.c_ulong),
        ("shmid", ctypes.c_int),
        ("shmaddr", ctypes.c_void_p),
        ("readOnly", ctypes.c_int),
    )


class _XErrorEvent(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_int),
        ("display", ctypes.c_void_p),
        ("resourceid", ctypes.c_ulong),
        ("serial", ctypes.c_ulong),
        ("error_code", ctypes.c_ubyte),
        ("request_code", ctypes.c_ubyte),
        ("minor_code", ctypes.c_ubyte),
    )


_ErrorHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_XErrorEvent))
_IOErrorHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_IOErrorExitHandler = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)

_XImagePointer = ctypes.POINTER(_XImage)
_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_uint_p = ctypes.POINTER(ctypes.c_uint)
_c_ulong_p = ctypes.POINTER(ctypes.c_ulong)


class _Libraries:
    """libX11, libXext and libc with the signatures we call, loaded once."""

    def __init__(self) -> None:
        x11_name = ctypes.util.find_library("X11")
        if x11_name is None:
            raise UnsupportedDisplay("libX11 is not installed")
        x11 = ctypes.CDLL(x11_name)
        self.x11 = x11
        vp, i, ui, ul = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_ulong
        for name, restype, argtypes in (
            ("XOpenDisplay", vp, [ctypes.c_char_p]),
            ("XCloseDisplay", i, [vp]),
            ("XDefaultScreen", i, [vp]),
            ("XRootWindow", ul, [vp, i]),
            ("XDefaultVisual", vp, [vp, i]),
            ("XDefaultDepth", i, [vp, i]),
            ("XSync", i, [vp, i]),
            ("XFree", i, [vp]),
            ("XGetGeometry", i, [vp, ul, _c_ulong_p, _c_int_p, _c_int_p] + [_c_uint_p] * 4),
            ("XGetImage", _XImagePointer, [vp, ul, i, i, ui, ui, ul, i]),
            ("XSetErrorHandler", _ErrorHandler, [_ErrorHandler]),
            ("XSetIOErrorHandler", _IOErrorHandler, [_IOErrorHandler]),
        ):
            function = getattr(x11, name)
            function.restype = restype
            function.argtypes = argtypes
        # libX11 >= 1.7 only. Without it a lost connection calls exit().
        self.has_exit_handler = hasattr(x11, "XSetIOErrorExitHandler")
        if self.has_exit_handler:
            x11.XSetIOErrorExitHandler.restype = None
            x11.XSetIOErrorExitHandler.argtypes = [vp, _IOErrorExitHandler, vp]

        xext_name = ctypes.util.find_library("Xext")
        self.xext: ctypes.CDLL | None = None
        if xext_name is not None:
            xext = ctypes.CDLL(xext_name)
            shm_info_p = ctypes.POINTER(_XShmSegmentInfo)
            for name, restype, argtypes in (
                ("XShmQueryExtension", i, [vp]),
                ("XShmCreateImage", _XImagePointer, [vp, vp, ui, i, vp, shm_info_p, ui, ui]),
                ("XShmAttach", i, [vp, shm_info_p]),
                ("XShmDetach", i, [vp, shm_info_p]),
                ("XShmGetImage", i, [vp, ul, _XImagePointer, i, i, ul]),
            ):
                function = getattr(xext, name)
                function.restype = restype
                function.argtypes = argtypes
            self.xext = xext

        # XDamageSubtract from the capture connection, so that the damage
        # is cleared in order with the grab that follows (optional).
        xdamage_name = ctypes.util.find_library("Xdamage")
        self.xdamage: ctypes.CDLL | None = None
        if xdamage_name is not None:
            xdamage = ctypes.CDLL(xdamage_name)
            for name, restype, argtypes in (
                ("XDamageQueryExtension", i, [vp, _c_int_p, _c_int_p]),
                ("XDamageQueryVersion", i, [vp, _c_int_p, _c_int_p]),
            ):
                function = getattr(xdamage, name)
                function.restype = restype
                function.argtypes = argtypes
            xdamage.XDamageSubtract.restype = None
            xdamage.XDamageSubtract.argtypes = [vp, ul, ul, ul]
            self.xdamage = xdamage

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.shmget.restype, libc.shmget.argtypes = i, [i, ctypes.c_size_t, i]
        libc.shmat.restype, libc.shmat.argtypes = vp, [i, vp, i]
        libc.shmdt.restype, libc.shmdt.argtypes = i, [vp]
        libc.shmctl.restype, libc.shmctl.argtypes = i, [i, i, vp]
        self.libc = libc


_libraries: _Libraries | None = None
_libraries_lock = threading.Lock()


def _load() -> _Libraries:
    global _libraries  # noqa: PLW0603 - loaded once, on first use
    with _libraries_lock:
        if _libraries is None:
            _libraries = _Libraries()
            _install_error_handlers(_libraries)
        return _libraries


# -- error handling -----------------------------------------------------------


class _ConnectionState:
    """What the error handlers learnt about one of our connections."""

    __slots__ = ("dead", "error_code", "request_code")

    def __init__(self) -> None:
        self.error_code = 0
        self.request_code = 0
        self.dead = False

    def take_error(self) -> int:
        code, self.error_code = self.error_code, 0
        return code


#: Our C connections by Display pointer. The handlers run on the thread that
#: made the failing call, which holds that connection's lock.
_connections: dict[int, _ConnectionState] = {}
# The handlers that were installed before ours (libX11's defaults unless some
# other library in this process set its own), for connections that are not ours.
_previous_error_handler: Callable[..., int] | None = None
_previous_io_error_handler: Callable[..., int] | None = None


def _on_error(display: int | None, event: ctypes._Pointer[_XErrorEvent]) -> int:
    state = _connections.get(display or 0)
    if state is None:
        # Somebody else's connection in this process: keep its old behaviour.
        if _previous_error_handler is not None:
            return int(_previous_error_handler(display, event))
        return 0
    state.error_code = int(event.contents.error_code)
    state.request_code = int(event.contents.request_code)
    return 0


def _on_io_error(display: int | None) -> int:
    state = _connections.get(display or 0)
    if state is None:
        if _previous_io_error_handler is not None:
            return int(_previous_io_error_handler(display))
        return 0
    # Quietly: the default handler prints "XIO: fatal IO error"; the source
    # reports the end of the desktop itself.
    state.dead = True
    return 0


def _on_io_error_exit(display: int | None, data: int | None) -> None:
    # Returning (instead of libX11's exit(1)) leaves the connection marked
    # broken: later calls on it fail at once, and XCloseDisplay frees it.
    state = _connections.get(display or 0)
    if state is not None:
        state.dead = True


# The C callables must outlive every connection: keep them at module level.
_error_handler = _ErrorHandler(_on_error)
_io_error_handler = _IOErrorHandler(_on_io_error)
_io_error_exit_handler = _IOErrorExitHandler(_on_io_error_exit)


def _install_error_handlers(libs: _Libraries) -> None:
    global _previous_error_handler, _previous_io_error_handler  # noqa: PLW0603
    _previous_error_handler = libs.x11.XSetErrorHandler(_error_handler)
    _previous_io_error_handler = libs.x11.XSetIOErrorHandler(_io_error_handler)


# -- backends -----------------------------------------------------------------


class ScreenCapture(abc.ABC):
    """Reads pixels of one X screen's root window. Thread-safe (one lock), but
    meant for one capture thread at a time."""

    method: CaptureMethod

    def __init__(self, display: str) -> None:
        self.display = display
        self._lock = threading.Lock()
        self._closed = False

    @abc.abstractmethod
    def _screen_size(self) -> tuple[int, int]: ...

    @abc.abstractmethod
    def _grab(self, rect: Rect, out: Pixels) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def screen_size(self) -> tuple[int, int]:
        """The root window's current (width, height) (one round trip)."""
        with self._lock:
            self._check_open()
            return self._screen_size()

    def grab(self, rect: Rect, out: Pixels) -> None:
        """Read `rect` of the screen into `out[rect.slices()]`. Raises
        CaptureError if the rect is not on the screen (any more)."""
        if rect.is_empty():
            return
        with self._lock:
            self._check_open()
            self._grab(rect, out)

    #: Whether `subtract_damage` works on this connection.
    can_subtract_damage = False

    def subtract_damage(self, damage: int) -> None:
        """Clear the DAMAGE object `damage` (made by another connection to
        the same server) on this connection, so that the X server handles it
        before this connection's next grab: anything drawn after the clear
        is reported anew, and nothing drawn before it escapes the grab."""
        with self._lock:
            self._check_open()
            self._subtract_damage(damage)

    def _subtract_damage(self, damage: int) -> None:
        raise NotImplementedError("this capture cannot clear damage")

    def capture_screen(self, *, attempts: int = 3) -> Pixels:
        """The whole screen as a new BGRX (height, width, 4) array. Retries
        when the screen changes size between asking for its size and reading
        it."""
        for attempt in range(attempts):
            width, height = self.screen_size()
            out = np.empty((height, width, 4), np.uint8)
            try:
                self.grab(Rect(0, 0, width, height), out)
            except DisplayGone:
                raise
            except CaptureError:
                if attempt == attempts - 1:
                    raise
                continue
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Release the connection (and shared memory). Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise DisplayGone(f"capture connection to {self.display} is closed")


class _CConnection(ScreenCapture):
    """A libX11 connection with our error handlers; the base of the ctypes
    backends."""

    def __init__(self, display: str) -> None:
        super().__init__(display)
        libs = _load()
        if not libs.has_exit_handler:
            raise UnsupportedDisplay(
                "libX11 older than 1.7 would exit the process if the X server went away"
            )
        self._libs = libs
        self._x11 = libs.x11
        dpy = self._x11.XOpenDisplay(display.encode())
        if not dpy:
            raise DisplayGone(f"cannot open X display {display!r}")
        self._dpy: int = dpy
        self._state = _ConnectionState()
        _connections[dpy] = self._state
        self._x11.XSetIOErrorExitHandler(dpy, _io_error_exit_handler, None)
        screen = self._x11.XDefaultScreen(dpy)
        self._root: int = self._x11.XRootWindow(dpy, screen)
        self._visual: int = self._x11.XDefaultVisual(dpy, screen)
        self._depth: int = self._x11.XDefaultDepth(dpy, screen)
        if self._depth not in (24, 32):
            self._release_connection()
            raise UnsupportedDisplay(
                f"{display}: depth {self._depth}; trivnc captures 24-bit TrueColor screens"
            )
        self._xdamage = libs.xdamage
        if self._xdamage is not None:
            event, error, major, minor = (ctypes.c_int() for _ in range(4))
            # DAMAGE ignores a client until it has said which version it speaks.
            self.can_subtract_damage = bool(
                self._xdamage.XDamageQueryExtension(dpy, ctypes.byref(event), ctypes.byref(error))
                and self._xdamage.XDamageQueryVersion(dpy, ctypes.byref(major), ctypes.byref(minor))
                and major.value >= 1
            )

    def _subtract_damage(self, damage: int) -> None:
        if not self.can_subtract_damage or self._xdamage is None:
            raise NotImplementedError("this capture cannot clear damage")
        # No reply: an error (the damage is gone with its connection) shows
        # at the next round trip, the grab.
        self._xdamage.XDamageSubtract(self._dpy, damage, 0, 0)

    def _check(self, what: str) -> None:
        """Turn what the error handlers recorded into an exception."""
        if self._state.dead:
            raise DisplayGone(f"X server {self.display} went away")
        code = self._state.take_error()
        if code:
            raise CaptureError(f"{what} on {self.display} failed with X error {code}")

    def _screen_size(self) -> tuple[int, int]:
        root = ctypes.c_ulong()
        x, y = ctypes.c_int(), ctypes.c_int()
        w, h, border, depth = (ctypes.c_uint() for _ in range(4))
        ok = self._x11.XGetGeometry(
            self._dpy, self._root, ctypes.byref(root), ctypes.byref(x), ctypes.byref(y),
            ctypes.byref(w), ctypes.byref(h), ctypes.byref(border), ctypes.byref(depth),
        )  # fmt: skip
        self._check("GetGeometry")
        if not ok:
            raise CaptureError(f"GetGeometry on {self.display} failed")
        return int(w.value), int(h.value)

    def _release_connection(self) -> None:
        self._x11.XCloseDisplay(self._dpy)
        _connections.pop(self._dpy, None)

    def _close(self) -> None:
        self._release_connection()


def _check_layout(image: _XImage, display: str) -> None:
    masks = (int(image.red_mask), int(image.green_mask), int(image.blue_mask))
    if image.bits_per_pixel != 32 or image.byte_order != _LSB_FIRST or masks != _BGRX_MASKS:
        raise UnsupportedDisplay(
            f"{display}: {image.bits_per_pixel} bpp, byte order {image.byte_order}, "
            f"masks {[hex(m) for m in masks]}; trivnc needs 32 bpp BGRX"
        )


class XGetImageCapture(_CConnection):
    """Plain XGetImage through libX11: one copy in the X library, one into
    `out`. Works on any display, local or remote."""

    method: CaptureMethod = "xgetimage"

    def _grab(self, rect: Rect, out: Pixels) -> None:
        image_p = self._x11.XGetImage(
            self._dpy, self._root, rect.x, rect.y, rect.w, rect.h, _ALL_PLANES, _ZPIXMAP
        )
        try:
            self._check("GetImage")
            if not image_p:
                raise CaptureError(f"GetImage on {self.display} failed")
            image = image_p.contents
            _check_layout(image, self.display)
            stride = int(image.bytes_per_line)
            buffer = (ctypes.c_ubyte * (stride * rect.h)).from_address(image.data)
            rows = np.frombuffer(memoryview(buffer), np.uint8).reshape(rect.h, stride)
            out[rect.slices()] = rows[:, : rect.w * 4].reshape(rect.h, rect.w, 4)
        finally:
            if image_p:
                # What XDestroyImage does for an image that XGetImage made:
                # free the pixels, then the structure.
                self._x11.XFree(image_p.contents.data)
                self._x11.XFree(image_p)


class ShmCapture(_CConnection):
    """XShmGetImage into a shared-memory segment as large as the screen; the
    server writes the pixels there directly and we copy them into `out` from
    a numpy view of the segment. The XImage header is reused for rects of any
    size by rewriting its width and height (the server packs rows of a
    32 bpp ZPixmap without padding)."""

    method: CaptureMethod = "shm"

    def __init__(self, display: str) -> None:
        super().__init__(display)
        xext = self._libs.xext
        if xext is None:
            self._release_connection()
            raise UnsupportedDisplay("libXext is not installed")
        self._xext = xext
        if not xext.XShmQueryExtension(self._dpy):
            self._release_connection()
            raise UnsupportedDisplay(f"{display} has no MIT-SHM extension")
        self._info = _XShmSegmentInfo(shmseg=0, shmid=-1, shmaddr=None, readOnly=0)
        self._image: ctypes._Pointer[_XImage] | None = None
        self._view: np.ndarray[tuple[int], np.dtype[np.uint8]] | None = None
        self._capacity = 0  # pixels
        try:
            width, height = self._screen_size()
            self._allocate(width * height)
        except BaseException:
            self._free_segment()
            self._release_connection()
            raise

    def _allocate(self, pixels: int) -> None:
        """A segment for `pixels` BGRX pixels, attached to the server and
        already marked for removal, so that a crash cannot leak it."""
        self._free_segment()
        libc = self._libs.libc
        size = pixels * 4
        shmid = libc.shmget(_IPC_PRIVATE, size, _IPC_CREAT | 0o600)
        if shmid < 0:
            raise UnsupportedDisplay(f"shmget({size}) failed: errno {ctypes.get_errno()}")
        self._info.shmid = shmid
        address = libc.shmat(shmid, None, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            libc.shmctl(shmid, _IPC_RMID, None)
            self._info.shmid = -1
            raise UnsupportedDisplay(f"shmat failed: errno {ctypes.get_errno()}")
        self._info.shmaddr = address
        self._info.readOnly = 0
        image_p = self._xext.XShmCreateImage(
            self._dpy, self._visual, self._depth, _ZPIXMAP, address,
            ctypes.byref(self._info), 1, 1,
        )  # fmt: skip
        if not image_p:
            raise UnsupportedDisplay("XShmCreateImage failed")
        self._image = image_p
        _check_layout(image_p.contents, self.display)
        attached = self._xext.XShmAttach(self._dpy, ctypes.byref(self._info))
        # Wait for the server to map the segment (an X error here means it
        # cannot, e.g. on a remote display), then drop our id at once: the
        # segment lives while the server or we have it attached.
        self._x11.XSync(self._dpy, 0)
        libc.shmctl(shmid, _IPC_RMID, None)
        if self._state.dead:
            raise DisplayGone(f"X server {self.display} went away")
        if not attached or self._state.take_error():
            self._info.shmseg = 0
            raise UnsupportedDisplay(f"{self.display} cannot attach our shared memory")
        buffer = (ctypes.c_ubyte * size).from_address(address)
        self._view = np.frombuffer(memoryview(buffer), np.uint8)
        self._capacity = pixels

    def _free_segment(self) -> None:
        if self._info.shmseg and not self._state.dead:
            self._xext.XShmDetach(self._dpy, ctypes.byref(self._info))
            self._x11.XSync(self._dpy, 0)
        self._info.shmseg = 0
        self._view = None
        if self._image is not None:
            # The segment is not the image's to free: only the header goes.
            self._x11.XFree(self._image)
            self._image = None
        if self._info.shmaddr:
            self._libs.libc.shmdt(self._info.shmaddr)
            self._info.shmaddr = None
        if self._info.shmid >= 0:
            # Already removed after attach unless setting up failed before it.
            self._libs.libc.shmctl(self._info.shmid, _IPC_RMID, None)
            self._info.shmid = -1
        self._capacity = 0

    def _grab(self, rect: Rect, out: Pixels) -> None:
        if rect.area > self._capacity:
            # The screen grew (RandR): a segment for the whole new screen.
            width, height = self._screen_size()
            self._allocate(max(width * height, rect.area))
        image_p, view = self._image, self._view
        assert image_p is not None and view is not None  # set by _allocate
        image = image_p.contents
        image.width, image.height = rect.w, rect.h
        image.bytes_per_line = rect.w * 4
        ok = self._xext.XShmGetImage(self._dpy, self._root, image_p, rect.x, rect.y, _ALL_PLANES)
        self._check("ShmGetImage")
        if not ok:
            raise CaptureError(f"ShmGetImage on {self.display} failed")
        out[rect.slices()] = view[: rect.area * 4].reshape(rect.h, rect.w, 4)

    def _close(self) -> None:
        self._free_segment()
        self._release_connection()


class XlibCapture(ScreenCapture):
    """python-xlib's get_image on a Display of its own: the slowest backend
    (the reply is parsed in Python), used only when libX11 cannot be loaded
    or is too old to survive a lost connection."""

    method: CaptureMethod = "xlib"

    def __init__(self, display: str) -> None:
        super().__init__(display)
        from Xlib import display as xdisplay
        from Xlib import error as xerror

        try:
            self._display = xdisplay.Display(display)
        except (xerror.DisplayError, xerror.ConnectionClosedError, OSError) as exc:
            raise DisplayGone(f"cannot open X display {display!r}: {exc}") from exc
        self._root = self._display.screen().root

    def _screen_size(self) -> tuple[int, int]:
        from Xlib import error as xerror

        try:
            geometry = self._root.get_geometry()
        except (xerror.ConnectionClosedError, OSError) as exc:
            raise DisplayGone(f"X server {self.display} went away") from exc
        return int(geometry.width), int(geometry.height)

    def _grab(self, rect: Rect, out: Pixels) -> None:
        from Xlib import X
        from Xlib import error as xerror

        try:
            image = self._root.get_image(rect.x, rect.y, rect.w, rect.h, X.ZPixmap, 0xFFFFFFFF)
        except (xerror.ConnectionClosedError, OSError) as exc:
            raise DisplayGone(f"X server {self.display} went away") from exc
        except xerror.XError as exc:
            raise CaptureError(f"GetImage on {self.display} failed: {exc}") from exc
        data = image.data
        if isinstance(data, str):  # python-xlib on some versions
            data = data.encode("latin-1")
        if len(data) != rect.area * 4:
            raise UnsupportedDisplay(f"{self.display}: GetImage gave {len(data)} bytes")
        out[rect.slices()] = np.frombuffer(data, np.uint8).reshape(rect.h, rect.w, 4)

    def _close(self) -> None:
        try:
            self._display.close()
        except Exception:  # closing a dead connection may fail in many ways
            log.debug("closing python-xlib capture connection failed", exc_info=True)


def open_capture(display: str, *, use_shm: bool = True) -> ScreenCapture:
    """The fastest capture that works on `display`: MIT-SHM if allowed and
    available, else XGetImage through libX11, else python-xlib. Raises
    DisplayGone if the display cannot be opened."""
    backends: list[type[ScreenCapture]] = [XGetImageCapture, XlibCapture]
    if use_shm:
        backends.insert(0, ShmCapture)
    for backend in backends:
        try:
            capture = backend(display)
        except DisplayGone:
            raise
        except UnsupportedDisplay as exc:
            log.info("%s: %s capture unavailable: %s", display, backend.method, exc)
            continue
        log.debug("%s: capturing with %s", display, capture.method)
        return capture
    raise UnsupportedDisplay(f"no way to capture {display}")  # pragma: no cover

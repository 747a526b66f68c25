"""Xvfb workloads: trivnc, TigerVNC's X0tigervnc and x11vnc side by side.

One Xvfb (1920x1080x24 by default, --geometry) and, per workload, one driver
process (MIT-SHM puts and core drawing through libX11 via ctypes, reusing
trivnc.sources.x11.shm's bindings) that draws on it:

  video       a 1280x720 region repainted at 60 fps from precomputed
              photo-like frames (1/f "natural image" texture and hard-edged
              discs, panned like a camera, with grain; about 160 KB per frame
              as a quality-90 JPEG), one XShmPutImage per frame
  fullscreen  the same at the size of the whole screen, 60 fps
  scroll      an 800x600 terminal-like window scrolling one line of text at
              30 lines/s (XCopyArea inside the window, then the new line)
  idle        a static desktop; nothing changes

Every frame the driver puts carries a frame-number marker in the top-left
corner of the changed area: 16 black/white blocks of 32x32 (12-bit counter,
4-bit check), which survive JPEG quality 8. The driver records how many frames
it actually put and when (shared memory-mapped file), so a slow driver is
reported as a lower source frame rate, not as frames the servers dropped.

Each server in turn shares the display on a free loopback port without
authentication (the command lines are bench/xvfb_compare.py's). One viewer:
RFB 3.8, security None, shared, BGRX 32bpp, SetEncodings [Tight, CopyRect, JPEG
quality level 8, compression level 2, LastRect, DesktopSize], a new incremental
whole-screen request as soon as each update is read. The viewer decodes with
trivnc.testing.decode; by default it skips decoding the JPEG rects that do not
touch the marker (--decode full decodes everything). --psnr compares decoded
frames of the video and fullscreen workloads with the source, one frame every
0.25 s: with --decode full any shown frame; with the lean default the viewer
decodes whole updates from when a sample is due until the changed area is
entirely freshly decoded, then takes the sample (so the viewer's CPU stays
small; the PSNR is the same one a full decoder would see for that frame).
After a warm-up, a window of --seconds gives:

  frames %     distinct frames delivered (marker changes seen by the viewer)
               / frames the driver put, in percent
  MP/s         delivered megapixels per second (areas of pixel-bearing rects)
  upd/s        updates per second carrying pixels
  MB/s         bytes per second received
  CPU s/s      the server's CPU seconds per second (/proc/PID/stat, that PID)
  ms/frame     server CPU milliseconds per delivered distinct frame
  req->upd     ms from sending a FramebufferUpdateRequest to the first byte of
               the update answering it (p50, p95)
  put->view    ms from the driver's put (after XSync) to the end of the update
               that showed that frame (p50, p95)

plus Xvfb's, the driver's and the viewer's CPU s/s for context. The JSON also
has, per run: bad_markers (updates whose marker was torn, i.e. the server
showed parts of two frames at once), max_gap_frames (most consecutive frames
never shown), max_stall_ms (longest time without a new frame), PSNR figures
with --psnr, and server CPU per update. The default 5 s warm-up is there
because x11vnc pauses for about 3 s about a second after a viewer connects
(it measures the link, then sets up XDamage). Servers are
interleaved per repeat; each figure is the median over repeats, and the ratios
trivnc / X0tigervnc and trivnc / x11vnc are printed.

bench/x11_targets.py runs these workloads with PSNR, plus ten viewers and a
2 MB/s link, and checks issue 6's targets.

Run: python bench/x11_workloads.py [--seconds 10] [--repeats 2]
     [--servers trivnc,tigervnc,x11vnc] [--workloads video,fullscreen,scroll,idle]
     [--geometry 1920x1080] [--decode marker|full] [--psnr] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from viewers import TICKS, cpu_seconds
from xvfb_compare import SERVERS, running_server

from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.rfb.pixelformat import BGRX
from trivnc.sources.x11.shm import (
    _IPC_CREAT,
    _IPC_PRIVATE,
    _IPC_RMID,
    _ZPIXMAP,
    UnsupportedDisplay,
    _CConnection,
    _XImagePointer,
    _XShmSegmentInfo,
)
from trivnc.testing.decode import DecodeState, decode_rect

U8Array = npt.NDArray[np.uint8]

FENCE, CONTINUOUS_UPDATES = -312, -313
ENCODINGS = [
    Encoding.TIGHT,
    Encoding.COPY_RECT,  # every desktop viewer offers it (scrolls, window moves)
    -32 + 8,  # JPEG quality level 8
    -256 + 2,  # compression level 2
    PseudoEncoding.LAST_RECT,
    PseudoEncoding.DESKTOP_SIZE,
]
WORKLOADS = ("video", "fullscreen", "scroll", "idle")
LABELS = {"trivnc": "trivnc", "x11vnc": "x11vnc", "tigervnc": "X0tigervnc"}
BINARIES = {"x11vnc": "x11vnc", "tigervnc": "X0tigervnc"}

VIDEO_SIZE = (1280, 720)
SCROLL_SIZE = (800, 600)
SCROLL_LINES_PER_SECOND = 30.0
FRAMES = 30  # precomputed frames, played forwards then backwards

# The marker: 16 blocks of 32x32, 12-bit frame counter then a 4-bit check.
BLOCK = 32
BITS = 16
MARKER_W, MARKER_H = BLOCK * BITS, BLOCK
COUNTER_MOD = 1 << 12


# --------------------------------------------------------------------------
# Workload geometry, frames and the marker (shared by driver and viewer).


def parse_geometry(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    width, height = int(w), int(h)
    if width < MARKER_W or height < 2 * MARKER_H:
        raise ValueError(f"geometry {text} is too small for the frame marker")
    return width, height


def region(workload: str, width: int, height: int) -> Rect | None:
    """The area a workload changes (its marker sits at the top-left)."""
    if workload == "video":
        w, h = min(VIDEO_SIZE[0], width), min(VIDEO_SIZE[1], height)
        return Rect((width - w) // 2, (height - h) // 2, w, h)
    if workload == "fullscreen":
        return Rect(0, 0, width, height)
    if workload == "scroll":
        x, y = min(80, width - MARKER_W), min(80, height - 2 * MARKER_H)
        return Rect(x, y, min(SCROLL_SIZE[0], width - x), min(SCROLL_SIZE[1], height - y))
    return None


def source_rate(workload: str, fps: float) -> float:
    return SCROLL_LINES_PER_SECOND if workload == "scroll" else fps


def marker_code(counter: int) -> int:
    n = counter % COUNTER_MOD
    check = (n ^ (n >> 4) ^ (n >> 8) ^ 0xA) & 0xF
    return (n << 4) | check


def marker_bits(counter: int) -> list[bool]:
    code = marker_code(counter)
    return [bool(code >> (BITS - 1 - i) & 1) for i in range(BITS)]


def draw_marker(image: U8Array, counter: int) -> None:
    """Draw the marker at (0, 0) of a BGRX (h, w, 4) view."""
    for i, bit in enumerate(marker_bits(counter)):
        image[:BLOCK, i * BLOCK : (i + 1) * BLOCK, :3] = 255 if bit else 0


def read_marker(fb: U8Array, x: int, y: int) -> int | None:
    """The counter shown at (x, y), or None when the blocks are not clearly
    black or white or the check fails (a torn or half-updated marker)."""
    q = BLOCK // 4
    strip = fb[y + q : y + BLOCK - q, x : x + MARKER_W, 1].reshape(BLOCK - 2 * q, BITS, BLOCK)
    means = strip[:, :, q : BLOCK - q].mean(axis=(0, 2))
    if np.any((means > 64) & (means < 192)):
        return None
    code = 0
    for m in means:
        code = (code << 1) | int(m >= 128)
    n = code >> 4
    return n if marker_code(n) == code else None


def frame_index(counter: int, frames: int = FRAMES) -> int:
    """Which precomputed frame is shown for `counter`: forwards, then
    backwards, so that the loop has no jump."""
    period = 2 * frames - 2
    k = counter % period
    return k if k < frames else period - k


def _unit_field(
    rng: np.random.Generator, h: int, w: int, exponent: float
) -> npt.NDArray[np.float32]:
    """Noise with an amplitude spectrum 1/f**exponent (natural images are
    near 1/f), zero mean, unit standard deviation."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amplitude = f**-exponent
    amplitude[0, 0] = 0.0
    spectrum = rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape)
    field = np.fft.irfft2(spectrum * amplitude, s=(h, w)).astype(np.float32)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def make_frames(w: int, h: int, out: U8Array, seed: int = 8) -> None:
    """Fill out (FRAMES, h, w, 4), BGRX, with a camera pan over a photo-like
    picture (textured background, hard-edged objects) plus grain.
    Deterministic, so that a viewer can rebuild the source. About 200 KB per
    1280x720 frame as a quality-90 JPEG."""
    n = out.shape[0]
    step_x, step_y = 4, 2
    big_h, big_w = h + step_y * (n - 1), w + step_x * (n - 1)
    rng = np.random.default_rng(seed)
    luma = _unit_field(rng, big_h, big_w, 1.45)
    photo = np.empty((big_h, big_w, 3), np.float32)
    for c in range(3):
        photo[..., c] = 128 + 44 * (luma + 0.35 * _unit_field(rng, big_h, big_w, 1.8))
    # Objects: discs of a flat tint over the texture, with hard edges.
    for _ in range(40):
        r = int(rng.integers(big_h // 40, big_h // 8))
        cx, cy = int(rng.integers(0, big_w)), int(rng.integers(0, big_h))
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, big_h), max(cx - r, 0), min(cx + r, big_w)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        tint = rng.uniform(20, 235, 3).astype(np.float32)
        patch = photo[y0:y1, x0:x1]
        patch[inside] = 0.35 * patch[inside] + 0.65 * tint
    np.clip(photo, 0, 255, out=photo)
    del luma
    for i in range(n):
        crop = photo[i * step_y : i * step_y + h, i * step_x : i * step_x + w]
        grain = rng.integers(-1, 2, (h, w, 1), dtype=np.int16)
        out[i, :, :, :3] = np.clip(crop + grain, 0, 255)
        out[i, :, :, 3] = 0


# --------------------------------------------------------------------------
# The driver's clock: frames put and when, in a memory-mapped file.


class Clock:
    HEAD = 8  # [0] frames put, [1] ready flag
    SLOTS = COUNTER_MOD

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if create:
            path.write_bytes(bytes(8 * (self.HEAD + self.SLOTS)))
        self.a: np.memmap[Any, np.dtype[np.float64]] = np.memmap(
            path, dtype=np.float64, mode="r+", shape=(self.HEAD + self.SLOTS,)
        )

    @property
    def frames(self) -> int:
        return int(self.a[0])

    @property
    def ready(self) -> bool:
        return bool(self.a[1])

    def set_ready(self) -> None:
        self.a[1] = 1.0

    def tick(self, counter: int, when: float) -> None:
        self.a[self.HEAD + counter % self.SLOTS] = when
        self.a[0] = counter + 1

    def put_time(self, counter: int) -> float:
        return float(self.a[self.HEAD + counter % self.SLOTS])


# --------------------------------------------------------------------------
# The driver: libX11/libXext through trivnc's ctypes bindings.


def _declare(x11: ctypes.CDLL, xext: ctypes.CDLL) -> None:
    """Signatures of the drawing calls (shm.py declares the capture ones)."""
    vp, i, ui, ul = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_ulong
    for lib, name, restype, argtypes in (
        (x11, "XCreateSimpleWindow", ul, [vp, ul, i, i, ui, ui, ui, ul, ul]),
        (x11, "XMapRaised", i, [vp, ul]),
        (x11, "XCreateGC", vp, [vp, ul, ul, vp]),
        (x11, "XSetForeground", i, [vp, vp, ul]),
        (x11, "XSetBackground", i, [vp, vp, ul]),
        (x11, "XSetGraphicsExposures", i, [vp, vp, i]),
        (x11, "XFillRectangle", i, [vp, ul, vp, i, i, ui, ui]),
        (x11, "XCopyArea", i, [vp, ul, ul, vp, i, i, ui, ui, i, i]),
        (x11, "XLoadFont", ul, [vp, ctypes.c_char_p]),
        (x11, "XSetFont", i, [vp, vp, ul]),
        (x11, "XDrawImageString", i, [vp, ul, vp, i, i, ctypes.c_char_p, i]),
        (xext, "XShmPutImage", i, [vp, ul, vp, _XImagePointer, i, i, i, i, ui, ui, i]),
    ):
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


def _rgb(r: int, g: int, b: int) -> int:
    return (r << 16) | (g << 8) | b


class Painter(_CConnection):
    """A libX11 connection with trivnc's error handling (X errors become
    exceptions, a lost server does not exit the process), plus the few
    drawing calls the workloads need. Not a capture: _grab is unused."""

    def __init__(self, display: str) -> None:
        super().__init__(display)
        if self._libs.xext is None:
            raise UnsupportedDisplay("libXext is not installed")
        self.xext = self._libs.xext
        _declare(self._x11, self.xext)
        self.root = int(self._root)
        self.gc = self._x11.XCreateGC(self._dpy, self._root, 0, None)
        self._x11.XSetGraphicsExposures(self._dpy, self.gc, 0)
        self._segments: list[_XShmSegmentInfo] = []

    def _grab(self, rect: Rect, out: U8Array) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        self._x11.XSync(self._dpy, 0)
        self._check("drawing")

    def fill(self, drawable: int, colour: int, x: int, y: int, w: int, h: int) -> None:
        self._x11.XSetForeground(self._dpy, self.gc, colour)
        self._x11.XFillRectangle(self._dpy, drawable, self.gc, x, y, w, h)

    def copy(self, drawable: int, x: int, y: int, w: int, h: int, dx: int, dy: int) -> None:
        self._x11.XCopyArea(self._dpy, drawable, drawable, self.gc, x, y, w, h, dx, dy)

    def load_font(self, name: str) -> bool:
        font = self._x11.XLoadFont(self._dpy, name.encode())
        self._x11.XSync(self._dpy, 0)
        if self._state.take_error():
            return False
        self._x11.XSetFont(self._dpy, self.gc, font)
        return True

    def text(self, drawable: int, fg: int, bg: int, x: int, y: int, s: str) -> None:
        raw = s.encode("latin-1", "replace")
        self._x11.XSetForeground(self._dpy, self.gc, fg)
        self._x11.XSetBackground(self._dpy, self.gc, bg)
        self._x11.XDrawImageString(self._dpy, drawable, self.gc, x, y, raw, len(raw))

    def window(self, r: Rect, background: int) -> int:
        win = self._x11.XCreateSimpleWindow(
            self._dpy, self._root, r.x, r.y, r.w, r.h, 0, 0, background
        )
        self._x11.XMapRaised(self._dpy, win)
        self.sync()
        return int(win)

    def marker(self, drawable: int, x: int, y: int, counter: int) -> None:
        for i, bit in enumerate(marker_bits(counter)):
            self.fill(drawable, 0xFFFFFF if bit else 0, x + i * BLOCK, y, BLOCK, BLOCK)

    def shm_image(self, width: int, height: int) -> tuple[Any, U8Array]:
        """An XImage in a new shared-memory segment, attached to the server,
        and a numpy (height, width, 4) view of its pixels."""
        libc = self._libs.libc
        size = width * height * 4
        shmid = libc.shmget(_IPC_PRIVATE, size, _IPC_CREAT | 0o600)
        if shmid < 0:
            raise UnsupportedDisplay(f"shmget({size}) failed: errno {ctypes.get_errno()}")
        address = libc.shmat(shmid, None, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            libc.shmctl(shmid, _IPC_RMID, None)
            raise UnsupportedDisplay("shmat failed")
        info = _XShmSegmentInfo(shmseg=0, shmid=shmid, shmaddr=address, readOnly=0)
        image = self.xext.XShmCreateImage(
            self._dpy, self._visual, self._depth, _ZPIXMAP, address,
            ctypes.byref(info), width, height,
        )  # fmt: skip
        if not image or image.contents.bytes_per_line != width * 4:
            raise UnsupportedDisplay("XShmCreateImage failed or pads rows")
        self.xext.XShmAttach(self._dpy, ctypes.byref(info))
        self.sync()
        libc.shmctl(shmid, _IPC_RMID, None)  # freed when both sides detach or exit
        self._segments.append(info)  # the image points at it
        buffer = (ctypes.c_ubyte * size).from_address(address)
        view = np.frombuffer(memoryview(buffer), np.uint8).reshape(height, width, 4)
        return image, view

    def put(self, image: Any, sx: int, sy: int, dx: int, dy: int, w: int, h: int) -> None:
        self.xext.XShmPutImage(self._dpy, self._root, self.gc, image, sx, sy, dx, dy, w, h, 0)


def paint_desktop(p: Painter, width: int, height: int) -> None:
    """A static desktop: banded wallpaper, a taskbar and a window with text."""
    bands = 48
    for b in range(bands):
        t = b / (bands - 1)
        colour = _rgb(int(30 + 40 * t), int(50 + 50 * t), int(80 + 60 * t))
        y0, y1 = height * b // bands, height * (b + 1) // bands
        p.fill(p.root, colour, 0, y0, width, y1 - y0)
    p.fill(p.root, _rgb(32, 32, 36), 0, height - 32, width, 32)
    for i in range(6):
        p.fill(p.root, _rgb(70 + 20 * i, 90, 120), 8 + 40 * i, height - 28, 32, 24)
    wx, wy, ww, wh = max(0, width - 520), 60, min(460, width), min(300, height - 100)
    p.fill(p.root, _rgb(225, 225, 220), wx, wy, ww, wh)
    p.fill(p.root, _rgb(60, 90, 150), wx, wy, ww, 24)
    p.load_font("fixed")
    for i in range(12):
        line = f"static window line {i:2d}: nothing here changes"
        p.text(p.root, _rgb(20, 20, 20), _rgb(225, 225, 220), wx + 10, wy + 44 + 18 * i, line)
    p.sync()


WORDS = [
    *("trio", "vnc", "frame", "update", "tight", "jpeg", "zlib", "pixel", "rect", "damage"),
    *("xvfb", "shm", "capture", "encode", "viewer", "latency", "scroll", "terminal"),
    *("buffer", "socket", "nursery", "cancel", "deadline", "bytes", "line"),
]


def text_line(n: int, columns: int) -> str:
    rng = random.Random(n)
    out = f"{n:7d} {time.strftime('%H:%M:%S')} "
    while len(out) < columns - 10:
        out += rng.choice(WORDS) + " "
    return out[:columns]


def run_driver(
    workload: str, display: str, width: int, height: int, clock_path: Path, fps: float
) -> None:
    clock = Clock(clock_path)
    p = Painter(display)
    paint_desktop(p, width, height)
    r = region(workload, width, height)
    if r is None:  # idle
        clock.set_ready()
        while True:
            time.sleep(3600)
    period = 1 / source_rate(workload, fps)
    if workload in ("video", "fullscreen"):
        image, view = p.shm_image(r.w, r.h * FRAMES)
        frames = view.reshape(FRAMES, r.h, r.w, 4)
        make_frames(r.w, r.h, frames)

        def draw(counter: int) -> None:
            # From the counter the marker shows (12 bits), as the viewer's
            # reference does: the picture jumps once every 4096 frames, and the
            # source stays known after the counter wraps (68 s at 60 fps).
            i = frame_index(counter % COUNTER_MOD)
            draw_marker(frames[i], counter)
            p.put(image, 0, i * r.h, r.x, r.y, r.w, r.h)

    else:  # scroll
        bg, fg, green = _rgb(16, 20, 24), _rgb(210, 210, 200), _rgb(120, 220, 120)
        if p.load_font("9x15"):
            lh, ascent, cw = 15, 12, 9
        else:
            p.load_font("fixed")
            lh, ascent, cw = 13, 11, 6
        win = p.window(r, bg)
        top = MARKER_H
        lines = (r.h - top) // lh
        columns = r.w // cw
        last = top + (lines - 1) * lh

        def new_line(n: int, y: int) -> None:
            p.fill(win, bg, 0, y, r.w, lh)
            p.text(win, green if n % 7 == 0 else fg, bg, 2, y + ascent, text_line(n, columns))

        for n in range(lines):
            new_line(n - lines, top + n * lh)

        def draw(counter: int) -> None:
            p.copy(win, 0, top + lh, r.w, (lines - 1) * lh, 0, top)
            new_line(counter, last)
            p.marker(win, 0, 0, counter)

    counter = 0
    draw(counter)
    p.sync()
    clock.tick(counter, time.monotonic())
    clock.set_ready()
    next_t = time.monotonic() + period
    while True:
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        counter += 1
        draw(counter)
        p.sync()
        now = time.monotonic()
        clock.tick(counter, now)
        next_t += period
        if now - next_t > period:  # behind: do not burst to catch up
            next_t = now + period


# --------------------------------------------------------------------------
# The viewer: a blocking socket, decoding with trivnc.testing.decode.

_RECT = struct.Struct(">HHHHi")


@dataclass
class Transition:
    """The marker changed: a new distinct frame reached the viewer."""

    t: float
    counter: int
    skipped: int  # frames the driver put in between that were never shown
    latency: float | None  # seconds from the driver's put to the end of the update


class Viewer:
    def __init__(
        self,
        port: int,
        area: Rect | None,
        clock: Clock,
        *,
        decode_all: bool,
        reference: Callable[[int], U8Array] | None = None,
        psnr_interval: float = 0.25,
        max_latency: float = 5.0,
        continuous: bool = False,
    ) -> None:
        # continuous: behave as TigerVNC's viewer does with a server that
        # can: announce Fence and ContinuousUpdates, answer fences, and turn
        # continuous updates on once the server confirms them (150); servers
        # that cannot are asked for each update as usual.
        self.continuous = continuous
        self.cu_enabled = False
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0  # next unread byte in buf
        self.base = 0  # stream offset of buf[0]
        self.chunks: collections.deque[tuple[int, float]] = collections.deque()
        self.received = 0
        self.area = area
        self.marker = Rect(area.x, area.y, MARKER_W, MARKER_H) if area else None
        self.clock = clock
        self.decode_all = decode_all
        self.reference = reference
        self.psnr_interval = psnr_interval
        self.max_latency = max_latency  # put->view latencies beyond are not counted
        # Lean decoding with PSNR: which pixels of fb were not decoded (their
        # rects were skipped); while a PSNR sample is due (`sampling`), whole
        # updates are decoded, and the sample is taken once the area is fresh.
        self.track_stale = reference is not None and not decode_all
        self.sampling = self.track_stale
        self.state = DecodeState(pf=BGRX)
        # Per update: (end time, request->first byte latency or nan, pixel area, marker hit).
        self.updates: list[tuple[float, float, int, bool]] = []
        self.transitions: list[Transition] = []
        self.bad_markers: list[float] = []
        self.psnr: list[tuple[float, float]] = []
        self.other_messages = 0
        self._last: int | None = None
        self._last_psnr = 0.0
        self._handshake()

    # -- bytes --

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        if not data:
            raise EOFError("server closed the connection")
        if self.pos > 1 << 22:
            del self.buf[: self.pos]
            self.base += self.pos
            self.pos = 0
        self.buf += data
        self.received += len(data)
        self.chunks.append((self.base + len(self.buf), time.monotonic()))
        return True

    def _need(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            if not self._recv(30):
                raise TimeoutError("server stopped sending in the middle of a message")

    def read(self, n: int) -> bytes:
        self._need(n)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self._need(n)
        self.pos += n

    def arrival(self) -> float:
        """When the next unread byte arrived."""
        offset = self.base + self.pos
        while self.chunks and self.chunks[0][0] <= offset:
            self.chunks.popleft()
        return self.chunks[0][1] if self.chunks else time.monotonic()

    def compact_length(self) -> int:
        value = 0
        for i in range(3):
            b = self.read(1)[0]
            value |= (b & (0x7F if i < 2 else 0xFF)) << (7 * i)
            if i < 2 and not b & 0x80:
                break
        return value

    def drive(self, gen: Generator[int, bytes, None], first: bytes | None = None) -> None:
        """Run a trivnc.testing.decode decoder on the stream; `first` answers
        its first read (a byte this viewer already took)."""
        try:
            n = next(gen)
            if first is not None:
                n = gen.send(first)
            while True:
                n = gen.send(self.read(n) if n else b"")
        except StopIteration:
            pass

    # -- protocol --

    def _handshake(self) -> None:
        version = self.read(12)
        if not version.startswith(b"RFB 003."):
            raise RuntimeError(f"not an RFB server: {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        types = self.read(self.read(1)[0])
        if 1 not in types:
            raise RuntimeError(f"security None not offered: {list(types)}")
        self.sock.sendall(b"\x01")
        if self.read(4) != b"\0\0\0\0":
            raise RuntimeError("security result: failed")
        self.sock.sendall(b"\x01")  # shared
        width, height = struct.unpack(">HH", self.read(4))
        self.read(16)
        (name_length,) = struct.unpack(">I", self.read(4))
        self.read(name_length)
        self._new_fb(width, height)
        wanted = ENCODINGS + ([FENCE, CONTINUOUS_UPDATES] if self.continuous else [])
        encodings = struct.pack(f">BxH{len(wanted)}i", 2, len(wanted), *wanted)
        self.sock.sendall(b"\x00\x00\x00\x00" + BGRX.pack() + encodings)
        self.t_request = time.monotonic()
        self.sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))

    def _new_fb(self, width: int, height: int) -> None:
        self.fb: U8Array = np.zeros((height, width, 4), np.uint8)
        self.stale = np.ones((height, width), np.bool_) if self.track_stale else None

    def request(self) -> None:
        height, width = self.fb.shape[:2]
        self.t_request = time.monotonic()
        self.sock.sendall(struct.pack(">BBHHHH", 3, 1, 0, 0, width, height))

    def run(self, until: float) -> None:
        """Handle messages until `until` (a whole message at a time)."""
        while True:
            now = time.monotonic()
            if now >= until:
                return
            if self.pos >= len(self.buf) and not self._recv(until - now):
                return
            first_byte = self.arrival()
            kind = self.read(1)[0]
            if kind == 0:
                self._update(first_byte)
                continue
            self.other_messages += 1
            if kind == 1:  # SetColourMapEntries
                _pad, _first, n = struct.unpack(">BHH", self.read(5))
                self.skip(6 * n)
            elif kind == 3:  # ServerCutText
                (n,) = struct.unpack(">3xI", self.read(7))
                self.skip(n)
            elif kind == 248:  # ServerFence: answer requests, as viewers must
                head = self.read(8)
                (flags,) = struct.unpack(">I", head[3:7])
                payload = self.read(head[-1])
                if flags & 1 << 31:
                    reply = struct.pack(">B3xIB", 248, flags & 0x7, len(payload)) + payload
                    self.sock.sendall(reply)
            elif kind == 150 and self.continuous and not self.cu_enabled:
                # The server has continuous updates: turn them on.
                self.cu_enabled = True
                height, width = self.fb.shape[:2]
                self.sock.sendall(struct.pack(">BBHHHH", 150, 1, 0, 0, width, height))
            elif kind not in (2, 150):  # Bell, EndOfContinuousUpdates
                raise RuntimeError(f"unexpected server message {kind}")

    def _update(self, first_byte: float) -> None:
        requested = not self.cu_enabled and first_byte >= self.t_request
        latency = first_byte - self.t_request if requested else math.nan
        (nrects,) = struct.unpack(">xH", self.read(3))
        area = 0
        hit = False
        resized = False
        for _ in range(nrects):
            x, y, w, h, encoding = _RECT.unpack(self.read(12))
            if encoding == PseudoEncoding.LAST_RECT:
                break
            if encoding == PseudoEncoding.DESKTOP_SIZE:
                self._new_fb(w, h)
                resized = True
                continue
            rect = Rect(x, y, w, h)
            touches = self.marker is not None and not rect.intersect(self.marker).is_empty()
            hit |= touches
            area += w * h
            lean = encoding == Encoding.TIGHT and not (self.decode_all or self.sampling or touches)
            if lean:
                self._tight_lean(rect)
            else:
                self.drive(decode_rect(self.state, self.fb, rect, encoding))
            if self.stale is not None:
                self.stale[rect.slices()] = lean
        end = time.monotonic()
        if not self.cu_enabled:
            self.request()  # at once, before any bookkeeping
        if resized and self.marker is not None:
            hit = True
        self.updates.append((end, latency, area, hit))
        if hit and self.marker is not None:
            self._check_marker(end)
        if self.track_stale:
            self.sampling = end - self._last_psnr > self.psnr_interval

    def _tight_lean(self, rect: Rect) -> None:
        """A Tight rect away from the marker: framed, not decoded. Fill and
        JPEG payloads are skipped; zlib data is inflated and thrown away,
        since the four zlib streams must see all their data."""
        ctl = self.read(1)[0]
        for i in range(4):
            if ctl & (1 << i):
                self.state.tight_streams[i] = zlib.decompressobj()
        kind = ctl >> 4
        if kind == 0x8:  # fill: one TPIXEL (3 bytes for 32bpp depth 24)
            self.skip(3)
            return
        if kind == 0x9:  # JPEG
            self.skip(self.compact_length())
            return
        if kind >= 0x8:  # other kinds (not expected here): decode properly
            self.drive(decode_rect(self.state, self.fb, rect, Encoding.TIGHT), bytes([ctl]))
            return
        filter_id = self.read(1)[0] if kind & 0x4 else 0
        size = rect.w * rect.h * 3  # copy and gradient filters: 3-byte TPIXELs
        if filter_id == 1:  # palette
            colours = self.read(1)[0] + 1
            self.skip(3 * colours)
            size = (rect.w + 7) // 8 * rect.h if colours == 2 else rect.w * rect.h
        elif filter_id not in (0, 2):
            raise RuntimeError(f"unknown Tight filter {filter_id}")
        if size < 12:
            self.skip(size)
            return
        data = self.read(self.compact_length())
        inflater = self.state.tight_streams[kind & 0x3]
        inflater.decompress(data)

    def _check_marker(self, end: float) -> None:
        assert self.marker is not None
        mx, my = self.marker.x, self.marker.y
        if my + MARKER_H > self.fb.shape[0] or mx + MARKER_W > self.fb.shape[1]:
            return
        counter = read_marker(self.fb, mx, my)
        if counter is None:
            self.bad_markers.append(end)
            return
        if counter == self._last:
            return
        skipped = 0 if self._last is None else (counter - self._last - 1) % COUNTER_MOD
        self._last = counter
        put = self.clock.put_time(counter)
        latency = end - put if 0 < end - put < self.max_latency else None
        self.transitions.append(Transition(end, counter, skipped, latency))
        if (
            self.reference is not None
            and self.area is not None
            and end - self._last_psnr > self.psnr_interval
            and (self.stale is None or not self.stale[self.area.slices()].any())
        ):
            self._last_psnr = end
            source = self.reference(counter)
            decoded = self.fb[self.area.slices()][..., :3].astype(np.int16)
            mse = float(np.mean((decoded - source[..., :3]) ** 2))
            self.psnr.append((end, 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)))

    def close(self) -> None:
        self.sock.close()


def reference_frames(workload: str, width: int, height: int) -> Callable[[int], U8Array] | None:
    """The source picture of the changed area for a counter (video and
    fullscreen only), for PSNR."""
    r = region(workload, width, height)
    if r is None or workload not in ("video", "fullscreen"):
        return None
    frames: U8Array = np.empty((FRAMES, r.h, r.w, 4), np.uint8)
    make_frames(r.w, r.h, frames)

    def reference(counter: int) -> U8Array:
        frame: U8Array = frames[frame_index(counter)].copy()
        draw_marker(frame, counter)
        return frame

    return reference


# --------------------------------------------------------------------------
# One measured run.


def machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all cores, not idle)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / TICKS  # minus idle and iowait


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def latency_trend(transitions: list[Transition], t0: float, t1: float) -> dict[str, float | None]:
    """Does put->view latency grow over the window (a queue building up)?
    The median latency of the frames shown in its first and last thirds, and
    the slope of a straight line through all of them (ms per second)."""
    third = (t1 - t0) / 3
    points = [(tr.t - t0, 1000 * tr.latency) for tr in transitions if tr.latency is not None]
    first = [v for t, v in points if t < third]
    last = [v for t, v in points if t >= 2 * third]
    slope = None
    if len(points) >= 3:
        xs = np.array([t for t, _ in points], np.float64)
        ys = np.array([v for _, v in points], np.float64)
        if np.ptp(xs) > 0:
            slope = float(np.polyfit(xs, ys, 1)[0])
    return {
        "frame_latency_first_third_p50_ms": _percentile(first, 50),
        "frame_latency_last_third_p50_ms": _percentile(last, 50),
        "frame_latency_slope_ms_per_s": slope,
    }


def measure(
    port: int,
    pids: dict[str, int],
    workload: str,
    width: int,
    height: int,
    clock: Clock,
    args: argparse.Namespace,
    reference: Callable[[int], U8Array] | None,
    *,
    max_latency: float = 5.0,
    counters: Callable[[], dict[str, float]] | None = None,
    continuous: bool = False,
) -> dict[str, Any]:
    """One viewer on `port` (the server's, or a proxy's in front of it):
    warm-up, then a window of args.seconds. CPU figures are read for every
    process in `pids` ("server" is the one per-frame figures use); `counters`
    (cumulative counts kept elsewhere, e.g. by other viewers) are read at both
    ends of the window too and reported per second."""
    area = region(workload, width, height)
    viewer = Viewer(
        port, area, clock, decode_all=args.decode == "full", reference=reference,
        max_latency=max_latency, continuous=continuous,
    )  # fmt: skip
    try:
        viewer.run(time.monotonic() + args.warmup)
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        m0 = machine_busy_seconds()
        k0 = counters() if counters else {}
        f0, r0, t0 = clock.frames, viewer.received, time.monotonic()
        viewer.run(t0 + args.seconds)
        c1 = {k: cpu_seconds(p) for k, p in pids.items()}
        m1 = machine_busy_seconds()
        k1 = counters() if counters else {}
        f1, r1, t1 = clock.frames, viewer.received, time.monotonic()
    finally:
        viewer.close()
    wall = t1 - t0
    cpu = {k: (c1[k] - c0[k]) / wall for k in pids}
    updates = [u for u in viewer.updates if t0 <= u[0] < t1]
    pixel_updates = [u for u in updates if u[2] > 0]
    transitions = [tr for tr in viewer.transitions if t0 <= tr.t < t1]
    latencies = [1000 * u[1] for u in updates if not math.isnan(u[1])]
    frame_latencies = [1000 * tr.latency for tr in transitions if tr.latency is not None]
    psnr = [v for t, v in viewer.psnr if t0 <= t < t1]
    put = f1 - f0
    delivered = len(transitions)
    server_cpu = cpu["server"] * wall
    return {
        "seconds": wall,
        "source_fps": put / wall,
        "frames_put": put,
        "frames_delivered": delivered,
        "frames_per_second": delivered / wall,
        "delivered_pct": 100 * delivered / put if put else None,
        "max_gap_frames": max((tr.skipped for tr in transitions[1:]), default=None),
        "max_stall_ms": 1000 * float(np.diff([t0, *(tr.t for tr in transitions), t1]).max())
        if put
        else None,
        "bad_markers": sum(1 for t in viewer.bad_markers if t0 <= t < t1),
        "updates_per_second": len(pixel_updates) / wall,
        "empty_updates": len(updates) - len(pixel_updates),
        "megapixels_per_second": sum(u[2] for u in updates) / wall / 1e6,
        "bytes_per_second": (r1 - r0) / wall,
        "bytes_per_frame": (r1 - r0) / delivered if delivered else None,
        "server_cpu_per_second": cpu["server"],
        "server_cpu_ms_per_frame": 1000 * server_cpu / delivered if delivered else None,
        "server_cpu_ms_per_update": 1000 * server_cpu / len(pixel_updates)
        if pixel_updates
        else None,
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p95_ms": _percentile(latencies, 95),
        "frame_latency_p50_ms": _percentile(frame_latencies, 50),
        "frame_latency_p95_ms": _percentile(frame_latencies, 95),
        "frame_latency_missing": sum(1 for tr in transitions if tr.latency is None),
        **latency_trend(transitions, t0, t1),
        "psnr_samples": len(psnr),
        "psnr_median_db": statistics.median(psnr) if psnr else None,
        "psnr_min_db": min(psnr) if psnr else None,
        **{f"{k}_cpu_per_second": v for k, v in cpu.items() if k != "server"},
        # Everything else on the machine: a busy neighbour skews a run.
        "unrelated_cpu_per_second": (m1 - m0) / wall - sum(cpu.values()),
        "other_messages": viewer.other_messages,
        "counters_per_second": {k: (k1[k] - k0[k]) / wall for k in k1},
    }


# --------------------------------------------------------------------------
# Report.

METRICS = (
    "source_fps",
    "delivered_pct",
    "max_gap_frames",
    "max_stall_ms",
    "bad_markers",
    "updates_per_second",
    "megapixels_per_second",
    "bytes_per_second",
    "server_cpu_per_second",
    "server_cpu_ms_per_frame",
    "server_cpu_ms_per_update",
    "latency_p50_ms",
    "latency_p95_ms",
    "frame_latency_p50_ms",
    "frame_latency_p95_ms",
    "psnr_median_db",
    "psnr_min_db",
    "xvfb_cpu_per_second",
    "driver_cpu_per_second",
    "viewer_cpu_per_second",
)
RATIO_METRICS = (
    "delivered_pct",
    "megapixels_per_second",
    "updates_per_second",
    "bytes_per_second",
    "server_cpu_per_second",
    "server_cpu_ms_per_frame",
    "latency_p50_ms",
    "latency_p95_ms",
    "frame_latency_p50_ms",
    "frame_latency_p95_ms",
)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for run in runs:
        out.setdefault(run["workload"], {}).setdefault(run["server"], {})
    for workload, by_server in out.items():
        for server in by_server:
            rows = [r for r in runs if r["workload"] == workload and r["server"] == server]
            for m in METRICS:
                values = [float(r[m]) for r in rows if r.get(m) is not None]
                by_server[server][m] = statistics.median(values) if values else None
    return out


def ratios(
    table: dict[str, dict[str, dict[str, float | None]]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for workload, by_server in table.items():
        mine = by_server.get("trivnc")
        if mine is None:
            continue
        for other, theirs in by_server.items():
            if other == "trivnc":
                continue
            q: dict[str, float | None] = {}
            for m in RATIO_METRICS:
                a, b = mine.get(m), theirs.get(m)
                q[m] = a / b if a is not None and b else None
            out.setdefault(workload, {})[other] = q
    return out


def _f(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def _pair(a: float | None, b: float | None, width: int = 11) -> str:
    if a is None:
        return f"{'-':>{width}}"
    text = f"{a:.1f}/" + ("-" if b is None else f"{b:.1f}")
    return f"{text:>{width}}"


def print_table(
    table: dict[str, dict[str, dict[str, float | None]]],
    q: dict[str, dict[str, dict[str, float | None]]],
    servers: list[str],
    psnr: bool,
) -> None:
    for workload, by_server in table.items():
        print()
        print(f"== {workload} ==")
        header = (
            f"{'server':10} {'src fps':>7} {'frames%':>7} {'MP/s':>6} {'upd/s':>6} "
            f"{'MB/s':>6} {'CPU s/s':>7} {'ms/frame':>8} {'req->upd':>11} {'put->view':>11} "
            f"{'Xvfb':>5} {'drv':>5} {'view':>5}"
        )
        if psnr:
            header += f" {'PSNR dB':>7}"
        print(header)
        for server in servers:
            m = by_server.get(server)
            if m is None:
                continue
            line = (
                f"{LABELS[server]:10} {_f(m['source_fps'], '.1f', 7)} "
                f"{_f(m['delivered_pct'], '.1f', 7)} {_f(m['megapixels_per_second'], '.1f', 6)} "
                f"{_f(m['updates_per_second'], '.1f', 6)} "
                f"{_f((m['bytes_per_second'] or 0) / 1e6, '.2f', 6)} "
                f"{_f(m['server_cpu_per_second'], '.3f', 7)} "
                f"{_f(m['server_cpu_ms_per_frame'], '.2f', 8)} "
                f"{_pair(m['latency_p50_ms'], m['latency_p95_ms'])} "
                f"{_pair(m['frame_latency_p50_ms'], m['frame_latency_p95_ms'])} "
                f"{_f(m['xvfb_cpu_per_second'], '.2f', 5)} "
                f"{_f(m['driver_cpu_per_second'], '.2f', 5)} "
                f"{_f(m['viewer_cpu_per_second'], '.2f', 5)}"
            )
            if psnr:
                line += f" {_f(m['psnr_median_db'], '.1f', 7)}"
            print(line)
        for other, r in q.get(workload, {}).items():
            print(
                f"  trivnc/{LABELS[other]}: frames% x{_f(r['delivered_pct'], '.2f', 0)}, "
                f"MP/s x{_f(r['megapixels_per_second'], '.2f', 0)}, "
                f"bytes/s x{_f(r['bytes_per_second'], '.2f', 0)}, "
                f"CPU s/s x{_f(r['server_cpu_per_second'], '.2f', 0)}, "
                f"CPU/frame x{_f(r['server_cpu_ms_per_frame'], '.2f', 0)}, "
                f"req->upd p50 x{_f(r['latency_p50_ms'], '.2f', 0)} "
                f"p95 x{_f(r['latency_p95_ms'], '.2f', 0)}, "
                f"put->view p50 x{_f(r['frame_latency_p50_ms'], '.2f', 0)}"
            )


def target_verdict(
    table: dict[str, dict[str, dict[str, float | None]]],
    q: dict[str, dict[str, dict[str, float | None]]],
) -> str | None:
    """The issue's target: every frame of the video workload delivered, at no
    more server CPU per frame than X0tigervnc."""
    mine = table.get("video", {}).get("trivnc")
    vs = q.get("video", {}).get("tigervnc")
    if mine is None or vs is None:
        return None
    pct, cpu = mine["delivered_pct"], vs["server_cpu_ms_per_frame"]
    met = pct is not None and pct >= 99.5 and cpu is not None and cpu <= 1.0
    return (
        f"Target (video): every frame delivered [trivnc {_f(pct, '.1f', 0)} %] at no more CPU "
        f"per frame than X0tigervnc [x{_f(cpu, '.2f', 0)}]: {'met' if met else 'NOT met'}"
    )


# --------------------------------------------------------------------------
# The run.


def _wait_ready(clock: Clock, driver: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not clock.ready:
        if driver.poll() is not None:
            sys.exit(f"the workload driver exited ({driver.returncode})")
        if time.monotonic() > deadline:
            sys.exit("the workload driver did not start in time")
        time.sleep(0.1)


@dataclass
class Driver:
    process: subprocess.Popen[bytes]
    clock: Clock


@contextlib.contextmanager
def running_driver(
    workload: str, display: str, geometry: str, home: Path, fps: float
) -> Iterator[Driver]:
    path = home / f"clock-{workload}"
    clock = Clock(path, create=True)
    process = subprocess.Popen(
        [
            sys.executable, __file__, "--driver", workload, "--display", display,
            "--geometry", geometry, "--clock", str(path), "--fps", str(fps),
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ready(clock, process)
        yield Driver(process, clock)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# One viewer per server, for each workload in turn; `extra` may measure more
# on the same server (it gets the context and returns more runs).
Extra = Callable[["RunContext"], list[dict[str, Any]]]


@dataclass
class RunContext:
    workload: str
    server: str
    repeat: int
    port: int
    pids: dict[str, int]
    driver: Driver
    run: dict[str, Any]  # the one-viewer run just measured on this server
    reference: Callable[[int], U8Array] | None
    width: int
    height: int
    args: argparse.Namespace
    home: Path


def progress(r: dict[str, Any], label: str = "") -> None:
    """One line per measured run, as it is done."""
    print(
        f"  {r['workload']:10} {LABELS[r['server']]:10} {label}rep {r['repeat']}: "
        f"src {r['source_fps']:5.1f} fps, "
        f"frames {_f(r['delivered_pct'], '.1f', 5)} %, "
        f"{r['updates_per_second']:5.1f} upd/s, "
        f"{r['megapixels_per_second']:6.1f} MP/s, "
        f"{r['bytes_per_second'] / 1e6:5.2f} MB/s, "
        f"CPU {r['server_cpu_per_second']:.3f} s/s, "
        f"{_f(r['server_cpu_ms_per_frame'], '.2f', 5)} ms/frame, "
        f"req->upd p50 {_f(r['latency_p50_ms'], '.1f', 5)} ms, "
        f"put->view p95 {_f(r['frame_latency_p95_ms'], '.1f', 5)} ms, "
        f"PSNR {_f(r['psnr_median_db'], '.1f', 4)} dB",
        flush=True,
    )


def run_workloads(
    xvfb: Any,
    home: Path,
    servers: list[str],
    workloads: list[str],
    args: argparse.Namespace,
    extra: Extra | None = None,
) -> list[dict[str, Any]]:
    """Every workload on the Xvfb, with each server in turn (interleaved per
    repeat), one viewer each; a server that fails is reported, not fatal."""
    width, height = parse_geometry(args.geometry)
    runs: list[dict[str, Any]] = []
    for workload in workloads:
        reference = reference_frames(workload, width, height) if args.psnr else None
        with running_driver(workload, xvfb.display, args.geometry, home, args.fps) as driver:
            for rep in range(args.repeats):
                for name in servers:
                    try:
                        with running_server(name, xvfb.display, home) as (pid, port):
                            pids = {
                                "server": pid,
                                "xvfb": xvfb.process.pid,
                                "driver": driver.process.pid,
                                "viewer": os.getpid(),
                            }
                            r = measure(
                                port, pids, workload, width, height, driver.clock, args,
                                reference, continuous=getattr(args, "continuous", False),
                            )  # fmt: skip
                            r = {"workload": workload, "server": name, "repeat": rep, **r}
                            runs.append(r)
                            progress(r)
                            if extra is not None:
                                context = RunContext(
                                    workload, name, rep, port, pids, driver, r, reference,
                                    width, height, args, home,
                                )  # fmt: skip
                                runs.extend(extra(context))
                    except (OSError, EOFError, RuntimeError) as exc:
                        print(f"  {workload:10} {LABELS[name]:10} rep {rep}: FAILED: {exc!r}")
                    if driver.process.poll() is not None:
                        sys.exit("the workload driver exited")
    return runs


def add_run_arguments(parser: argparse.ArgumentParser, *, seconds: float, decode: str) -> None:
    """The options every workload benchmark takes (this one and x11_targets.py)."""
    parser.add_argument("--seconds", type=float, default=seconds, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=5, help="seconds before each window")
    parser.add_argument("--repeats", type=int, default=2, help="cycles over the servers")
    parser.add_argument("--servers", default="trivnc,tigervnc,x11vnc", help="comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--geometry", default="1920x1080", help="Xvfb screen WxH")
    parser.add_argument("--fps", type=float, default=60, help="video/fullscreen frame rate")
    parser.add_argument("--decode", choices=("marker", "full"), default="marker", help=decode)


def parse_run_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[int, int, list[str], list[str]]:
    """Width, height, servers and workloads from add_run_arguments' options;
    a bad value is a usage error."""
    try:
        width, height = parse_geometry(args.geometry)
    except ValueError as exc:
        parser.error(str(exc))
    servers = [s for s in args.servers.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r} (choose from {', '.join(SERVERS)})")
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    return width, height, servers, workloads


def require_binaries(servers: list[str]) -> None:
    for binary in ["Xvfb", *(BINARIES[s] for s in servers if s in BINARIES)]:
        if shutil.which(binary) is None:
            sys.exit(f"{binary} is not installed")


def json_header(width: int, height: int) -> dict[str, Any]:
    """What every JSON result starts with: how and where it was made."""
    return {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cores": os.cpu_count(),
        "geometry": [width, height],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(
        parser,
        seconds=10,
        decode="decode only the JPEG rects touching the marker (lean), or everything",
    )
    parser.add_argument("--psnr", action="store_true", help="PSNR of sampled frames vs source")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--driver", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--display", help=argparse.SUPPRESS)
    parser.add_argument("--clock", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height, servers, workloads = parse_run_arguments(parser, args)
    if args.driver:
        run_driver(args.driver, args.display, width, height, args.clock, args.fps)
        return
    require_binaries(servers)

    from trivnc.testing.xvfb import Xvfb

    with (
        tempfile.TemporaryDirectory(prefix="trivnc-bench-") as tmp,
        Xvfb(width, height) as xvfb,
    ):
        runs = run_workloads(xvfb, Path(tmp), servers, workloads, args)
    table = medians(runs)
    q = ratios(table)
    print()
    print(
        f"Xvfb {width}x{height}x24; Tight JPEG quality 8, compression 2; "
        f"{args.seconds:g} s window after {args.warmup:g} s warm-up; median of {args.repeats}; "
        f"viewer decode: {args.decode}"
    )
    print(
        "frames% = distinct frames delivered / frames put; ms/frame = server CPU per delivered "
        "frame;\nreq->upd, put->view = latency p50/p95 in ms; Xvfb/drv/view = CPU s/s"
    )
    print_table(table, q, servers, args.psnr)
    target = target_verdict(table, q)
    if target:
        print()
        print(target)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **json_header(width, height),
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "decode": args.decode,
                    "fps": args.fps,
                    "runs": runs,
                    "median": table,
                    "ratios_trivnc_over": q,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

"""Throughput of the standard encoders (Raw, RRE, Hextile, zlib, ZRLE) on one
thread, on a 1920x1080 desktop-like frame and a photo-like frame.

    .venv/bin/python bench/_basic_throughput.py [--repeat N] [--band 64] [--pf rgbx]

Prints megapixels per second (best and median of N runs, one thread) and the
payload size. Other processes on the machine move the median more than the
best; quote both. `--band H`
encodes the frame as H-row bands, the way the scheduler splits rects, so the
per-call overhead shows. Meant to be folded into the project benchmark later.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from trivnc.encodings.base import Payload, RectEncoder
from trivnc.encodings.hextile import HextileEncoder
from trivnc.encodings.raw import RawEncoder
from trivnc.encodings.rre import RREEncoder
from trivnc.encodings.zlibrect import ZlibEncoder
from trivnc.encodings.zrle import ZRLEEncoder
from trivnc.rfb.pixelformat import BGR233, BGRX, RGB565, RGBX, PixelFormat

Frame = npt.NDArray[np.uint8]

FORMATS: dict[str, PixelFormat] = {"bgrx": BGRX, "rgbx": RGBX, "rgb565": RGB565, "bgr233": BGR233}


def desktop_frame(h: int = 1080, w: int = 1920, seed: int = 1) -> Frame:
    """A desktop: solid wallpaper and panels, windows with a gradient title
    bar, two-colour text, a few-colour toolbar, and one photo-like picture."""
    rng = np.random.default_rng(seed)
    f = np.zeros((h, w, 4), np.uint8)
    f[..., :3] = (120, 86, 40)  # BGR wallpaper
    f[h - 40 :, :, :3] = (48, 44, 40)  # taskbar
    for i in range(14):  # taskbar icons, four colours each
        x = 12 + 44 * i
        f[h - 34 : h - 6, x : x + 28, :3] = rng.integers(0, 256, 3)
        f[h - 28 : h - 12, x + 6 : x + 22, :3] = rng.integers(0, 256, 3)
    glyphs = rng.random((96, 12, 7)) < 0.35  # a font of 96 random 7x12 glyphs

    def window(x: int, y: int, ww: int, wh: int) -> None:
        f[y : y + wh, x : x + ww, :3] = (236, 236, 236)
        ramp = np.linspace(0, 1, ww)[:, None]  # title bar: a horizontal gradient
        f[y : y + 28, x : x + ww, :3] = (ramp * (200, 120, 40) + (1 - ramp) * (90, 40, 10)).astype(
            np.uint8
        )
        f[y + 28 : y + 60, x : x + ww, :3] = (210, 210, 210)  # toolbar
        for i in range(ww // 40):
            f[y + 34 : y + 54, x + 8 + 40 * i : x + 32 + 40 * i, :3] = (150, 150, 150)
            f[y + 38 : y + 50, x + 12 + 40 * i : x + 28 + 40 * i, :3] = rng.integers(0, 256, 3)

    def text(x: int, y: int, ww: int, wh: int) -> None:
        f[y : y + wh, x : x + ww, :3] = 255
        for line in range(wh // 16 - 1):
            n = int(rng.integers(ww // 16, ww // 8))
            codes = rng.integers(0, 96, n)
            ink = np.concatenate([glyphs[c] for c in codes], axis=1)
            ty, tx = y + 4 + 16 * line, x + 4
            region = f[ty : ty + 12, tx : tx + ink.shape[1]]
            region[ink[:, : region.shape[1]]] = (20, 20, 20, 0)

    window(60, 50, 1000, 760)
    text(70, 120, 980, 680)
    window(1100, 120, 760, 600)
    yy, xx = np.mgrid[0:480, 0:720].astype(np.float32)
    photo = np.stack(
        [
            128 + 90 * np.sin(xx / 37 + yy / 53),
            128 + 90 * np.sin(xx / 23 - yy / 41 + 1),
            128 + 90 * np.cos(yy / 29 + xx / 61),
        ],
        axis=2,
    )
    photo += rng.normal(0, 6, photo.shape)
    f[120 + 70 : 120 + 550, 1120 : 1120 + 720, :3] = np.clip(photo, 0, 255).astype(np.uint8)
    window(400, 820, 700, 200)
    return f


def photo_frame(h: int = 1080, w: int = 1920, seed: int = 2) -> Frame:
    """Smooth colour fields plus sensor-like noise: nearly every pixel differs
    from its neighbours, as in a photo or video."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [
        128 + 100 * np.sin(xx / 91 + yy / 137),
        128 + 100 * np.sin(xx / 53 - yy / 71 + 2),
        128 + 100 * np.cos(yy / 67 + xx / 151),
    ]
    f = np.zeros((h, w, 4), np.uint8)
    f[..., :3] = np.clip(np.stack(planes, axis=2) + rng.normal(0, 8, (h, w, 3)), 0, 255)
    return f


def run(
    encode: Callable[[Frame], list[Payload]], frame: Frame, repeat: int
) -> tuple[float, float, int]:
    """Best and median wall time of `repeat` runs, and the payload size."""
    times = []
    size = 0
    for _ in range(repeat):
        start = time.perf_counter()
        payloads = encode(frame)
        times.append(time.perf_counter() - start)
        size = sum(len(chunk) for p in payloads for chunk in p)
    return min(times), statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description="Standard encoders' throughput, one thread")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--band", type=int, default=0, help="encode as bands of this height")
    parser.add_argument("--pf", choices=sorted(FORMATS), default="bgrx")
    parser.add_argument("--only", default="", help="comma-separated encoder names")
    args = parser.parse_args()
    pf = FORMATS[args.pf]
    encoders: dict[str, Callable[[], RectEncoder]] = {
        "raw": RawEncoder,
        "rre": RREEncoder,
        "hextile": HextileEncoder,
        "zlib": ZlibEncoder,
        "zrle": ZRLEEncoder,
    }
    only = {name for name in args.only.split(",") if name}
    for frame_name, frame in (("desktop", desktop_frame()), ("photo", photo_frame())):
        h, w = frame.shape[:2]
        for name, make in encoders.items():
            if only and name not in only:
                continue
            encoder = make()  # a fresh zlib stream per frame kind, like a new client

            def encode(fr: Frame, enc: RectEncoder = encoder) -> list[Payload]:
                band = args.band or fr.shape[0]
                return [enc.encode(fr[y : y + band], pf) for y in range(0, fr.shape[0], band)]

            best, median, size = run(encode, frame, args.repeat)
            print(
                f"{frame_name:8} {name:8} {args.pf:7} band={args.band or h:<5} "
                f"best {best * 1e3:6.1f} ms = {h * w / best / 1e6:7.1f} MP/s   "
                f"median {median * 1e3:6.1f} ms = {h * w / median / 1e6:7.1f} MP/s   "
                f"{size / 1024:7.0f} KiB"
            )


if __name__ == "__main__":
    main()

"""Micro-benchmark of trivnc.framebuffer.scroll on a 1920x1080 frame.

  scroll (fresh)    detect_moves on an 800x600 text area scrolled by a line,
                    no hashes at hand (the first frame of a scroll)
  scroll (steady)   ScrollDetector on a sequence of such frames (each frame's
                    hashes and offset are reused by the next)
  noise 800x600     detect_moves where everything changed and nothing moved
  noise 1920x1080   the same over the whole frame (a full-screen video)

Each figure is the median over --repeats runs of the mean over a batch, in
milliseconds. Frames of the steady sequence are distinct arrays (as captured
frames are), so they are not all in the CPU cache.

Run: python bench/scroll_detect.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trivnc.framebuffer.scroll import ScrollDetector, detect_moves
from trivnc.geometry import Rect

Pixels = npt.NDArray[np.uint8]
W, H = 1920, 1080
AREA = Rect(80, 80, 800, 600)
LINE = 15


def document(lines: int, seed: int = 5) -> Pixels:
    """A terminal-like page: 9x15 cells of 7x11 glyphs, ragged lines."""
    rng = np.random.default_rng(seed)
    font = rng.random((64, 11, 7)) < 0.4
    page = np.empty((lines * LINE, AREA.w, 4), np.uint8)
    page[...] = (24, 20, 16, 0)
    for n in range(lines):
        for c in range(int(rng.integers(10, 88))):
            cell = page[n * LINE + 2 : n * LINE + 13, 2 + c * 9 : 9 + c * 9]
            cell[font[rng.integers(0, 64)]] = (200, 210, 210, 0)
    return page


def frame(page: Pixels, line: int) -> Pixels:
    out = np.zeros((H, W, 4), np.uint8)
    out[..., 0] = 90
    out[AREA.slices()] = page[line * LINE : line * LINE + AREA.h]
    out[AREA.y : AREA.y + 32, AREA.x : AREA.x + 512] = line * 37 % 256  # frame marker
    return out


def timed(fn: Callable[[], object], batch: int, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        runs.append((time.perf_counter() - start) / batch * 1e3)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    page = document(120)
    seq = [frame(page, i) for i in range(60)]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (H, W, 4), dtype=np.uint8) for _ in range(2)]

    moves = detect_moves(seq[0], seq[1], AREA)
    assert [m.dy for m in moves] == [LINE], moves
    fresh = timed(lambda: detect_moves(seq[0], seq[1], AREA), 50, args.repeats)

    step = [0]
    detector = ScrollDetector()

    def steady() -> None:
        i = step[0] % (len(seq) - 1)
        if i == 0:
            detector.detect(-1, seq[0], 0, seq[0], [])  # forget: a new sequence
        found = detector.detect(i, seq[i], i + 1, seq[i + 1], [AREA])
        assert found and found[0].dy == LINE
        step[0] += 1

    steady_ms = timed(steady, 59, args.repeats)
    small = timed(lambda: detect_moves(noise[0], noise[1], AREA), 50, args.repeats)
    full = timed(lambda: detect_moves(noise[0], noise[1], Rect(0, 0, W, H)), 20, args.repeats)
    print(f"scroll (fresh)   800x600:   {fresh:6.3f} ms  -> {moves}")
    print(f"scroll (steady)  800x600:   {steady_ms:6.3f} ms")
    print(f"noise            800x600:   {small:6.3f} ms")
    print(f"noise            1920x1080: {full:6.3f} ms")


if __name__ == "__main__":
    main()

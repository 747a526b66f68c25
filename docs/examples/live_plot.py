"""A live plot served to VNC viewers.

A trio program draws a small oscilloscope (two sine waves drifting at
different speeds, on a grid) into a numpy `ArraySource` thirty times a second
and serves it with `trivnc.serve` on the loopback address, with no
authentication (trivnc allows that only on loopback addresses)::

    python docs/examples/live_plot.py                 # port 0: a free port, printed
    python docs/examples/live_plot.py --port 5901 --seconds 60

Then ``vncviewer 127.0.0.1::PORT`` (or any VNC viewer) shows the plot. A
click in the viewer freezes and unfreezes it: viewers' input reaches the
program as events from ``source.input_events()``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import trio

import trivnc
from trivnc.sources.array import ArraySource, PointerInput

WIDTH, HEIGHT = 480, 270
BACKGROUND = (12, 16, 32)
GRID = (40, 48, 72)
TRACES = ((255, 196, 0), (0, 200, 255))


def draw(source: ArraySource, t: float) -> None:
    """Draw the plot at time `t` (seconds) and publish it."""
    x = np.arange(WIDTH)
    # Hold the source's lock while drawing so that a capture running in a
    # worker thread never sees a half-drawn frame.
    with source.lock:
        rgb = source.rgb  # an (HEIGHT, WIDTH, 3) view of the BGRX pixels
        rgb[...] = BACKGROUND
        rgb[:: HEIGHT // 6, :] = GRID
        rgb[:, :: WIDTH // 8] = GRID
        for i, colour in enumerate(TRACES):
            phase = 2 * math.pi * (x / WIDTH * (2 + i) - t * (0.5 + 0.3 * i))
            y = HEIGHT / 2 - HEIGHT * (0.35 - 0.1 * i) * np.sin(phase)
            rows = np.clip(y.astype(np.intp), 1, HEIGHT - 2)
            for dy in (-1, 0, 1):  # three pixels thick
                rgb[rows + dy, x] = colour
    source.mark_changed()  # None: the whole desktop may have changed


class Plot:
    """The plot's state: its own clock, which a click pauses and resumes."""

    def __init__(self, source: ArraySource) -> None:
        self.source = source
        self.time = 0.0
        self.paused = False

    async def animate(self, fps: float = 30.0) -> None:
        """Advance and redraw `fps` times a second unless paused."""
        while True:
            if not self.paused:
                self.time += 1 / fps
                draw(self.source, self.time)
            await trio.sleep(1 / fps)

    async def follow_input(self) -> None:
        """Viewers' input, as frozen events: a left click toggles the pause."""
        was_down = False
        async for event in self.source.input_events():
            if isinstance(event, PointerInput):
                down = bool(event.buttons & 1)
                if down and not was_down:
                    self.paused = not self.paused
                was_down = down


async def main(port: int, seconds: float | None) -> None:
    source = ArraySource(WIDTH, HEIGHT, name="live plot")
    draw(source, 0.0)
    config = trivnc.Config(
        source=source,
        listen=["127.0.0.1"],
        rfb_port=port,
        web_port=None,
        insecure_no_auth=True,
        max_frame_rate=30,
    )
    with trio.move_on_after(seconds if seconds is not None else math.inf):
        async with trio.open_nursery() as nursery:
            server: trivnc.Server = await nursery.start(trivnc.serve, config)
            host, bound = server.rfb_addresses[0]
            print(f"live_plot: VNC viewers connect to {host}::{bound}", flush=True)
            plot = Plot(source)
            nursery.start_soon(plot.follow_input)
            await plot.animate()
    print("live_plot: stopped", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="RFB port (default 0: any free port)")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    trio.run(main, args.port, args.seconds)

"""Several desktops in one process.

One trio nursery runs three trivnc servers, each with its own source and
its own port on the loopback address (no authentication, which trivnc allows
only on loopback addresses):

- ``gradient``: a still picture, an existing numpy array served in place;
- ``sketchpad``: a white page that viewers draw on with the left button
  (their pointer events come back to the program, which paints them);
- ``demo``: trivnc's built-in animated demo desktop.

::

    python docs/examples/several_desktops.py               # free ports, printed
    python docs/examples/several_desktops.py --port 5901   # 5901, 5902, 5903

Every server is independent (its own framebuffer service, sessions and
limits); cancelling the nursery stops them all.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import trio

import trivnc
from trivnc.geometry import Rect
from trivnc.sources.array import ArraySource, PointerInput
from trivnc.sources.demo import DemoSource

WIDTH, HEIGHT = 400, 300
BRUSH = 4


def gradient(width: int, height: int) -> np.ndarray:
    """A BGRX (height, width, 4) uint8 picture: red across, blue down."""
    pixels = np.zeros((height, width, 4), np.uint8)
    pixels[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 0] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    pixels[..., 1] = 64
    return pixels


async def sketch(source: ArraySource) -> None:
    """Paint a dot wherever a viewer moves the pointer with the left button held."""
    async for event in source.input_events():
        if isinstance(event, PointerInput) and event.buttons & 1:
            x0, y0 = max(event.x - BRUSH, 0), max(event.y - BRUSH, 0)
            x1, y1 = event.x + BRUSH + 1, event.y + BRUSH + 1
            with source.lock:
                source.rgb[y0:y1, x0:x1] = (20, 20, 160)
            source.mark_changed(Rect(x0, y0, x1 - x0, y1 - y0))


async def main(port: int, seconds: float | None) -> None:
    sketchpad = ArraySource(WIDTH, HEIGHT, name="sketchpad")
    sketchpad.rgb = (255, 255, 255)
    sketchpad.mark_changed()
    desktops: list[tuple[str, trivnc.Source]] = [
        ("gradient", ArraySource.from_array(gradient(WIDTH, HEIGHT), name="gradient")),
        ("sketchpad", sketchpad),
        ("demo", DemoSource(WIDTH, HEIGHT, name="demo")),
    ]
    with trio.move_on_after(seconds if seconds is not None else math.inf):
        async with trio.open_nursery() as nursery:
            for i, (name, source) in enumerate(desktops):
                config = trivnc.Config(
                    source=source,
                    listen=["127.0.0.1"],
                    rfb_port=port + i if port else 0,
                    web_port=None,
                    insecure_no_auth=True,
                    # The servers share the machine's cores: two workers each.
                    encode_threads=2,
                )
                server: trivnc.Server = await nursery.start(trivnc.serve, config)
                host, bound = server.rfb_addresses[0]
                print(f"several_desktops: {name}: VNC viewers connect to {host}::{bound}")
            print("several_desktops: all serving", flush=True)
            nursery.start_soon(sketch, sketchpad)
    print("several_desktops: stopped", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve three desktops from one process.")
    parser.add_argument(
        "--port", type=int, default=0, help="first RFB port; the others follow (default: free)"
    )
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    trio.run(main, args.port, args.seconds)

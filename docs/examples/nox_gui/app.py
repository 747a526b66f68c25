"""A tiny X11 application to test: one window showing a colour.

Keys r, g and b paint the window red, green or blue; a left click draws a
black 20x20 square centred where it happened; q or Escape quits (status 0).
It prints "ready" once its window is mapped and has the keyboard focus.

    DISPLAY=:1 python app.py --title Colours --geometry 300x200+100+100

Only python-xlib (a dependency of trivnc) is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import Any

from Xlib import XK, X, display, error

#: (red, green, blue) of the colours the keys choose.
COLOURS = {"r": (255, 0, 0), "g": (0, 255, 0), "b": (0, 0, 255)}
SQUARE = 20


def parse_geometry(text: str) -> tuple[int, int, int, int]:
    """ "WxH+X+Y" -> (width, height, x, y)."""
    match = re.fullmatch(r"(\d+)x(\d+)\+(\d+)\+(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected WxH+X+Y, got {text!r}")
    width, height, x, y = (int(part) for part in match.groups())
    return width, height, x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--title", default="Colours", help="window title (WM_NAME)")
    parser.add_argument(
        "--geometry", type=parse_geometry, default="300x200+100+100", help="WxH+X+Y"
    )
    args = parser.parse_args(argv)
    width, height, x, y = args.geometry

    d = display.Display()
    screen = d.screen()
    colormap = screen.default_colormap

    def pixel(rgb: tuple[int, int, int]) -> int:
        red, green, blue = (c * 257 for c in rgb)
        return int(colormap.alloc_color(red, green, blue).pixel)

    pixels = {key: pixel(rgb) for key, rgb in COLOURS.items()}
    window = screen.root.create_window(
        x,
        y,
        width,
        height,
        0,
        screen.root_depth,
        X.InputOutput,
        X.CopyFromParent,
        background_pixel=pixels["b"],
        event_mask=X.ExposureMask | X.KeyPressMask | X.ButtonPressMask,
    )
    window.set_wm_name(args.title)
    gc = window.create_gc(foreground=screen.black_pixel)
    squares: list[tuple[int, int]] = []

    def draw_squares() -> None:
        for cx, cy in squares:
            window.fill_rectangle(gc, cx - SQUARE // 2, cy - SQUARE // 2, SQUARE, SQUARE)

    window.map()
    # Without a window manager nobody else gives the window the focus. Mapping
    # is immediate then, so the focus is set before anything can be seen.
    window.set_input_focus(X.RevertToParent, X.CurrentTime)
    d.sync()
    print("ready", flush=True)
    try:
        while True:
            event: Any = d.next_event()
            if event.type == X.Expose and event.count == 0:
                draw_squares()
            elif event.type == X.ButtonPress and event.detail == 1:
                squares.append((event.event_x, event.event_y))
                draw_squares()
            elif event.type == X.KeyPress:
                keysym = d.keycode_to_keysym(event.detail, 0)
                name = XK.keysym_to_string(keysym)
                if keysym == XK.XK_Escape or name == "q":
                    return 0
                if name in pixels:
                    window.change_attributes(background_pixel=pixels[name])
                    window.clear_area()
                    draw_squares()
            d.flush()
    except (error.ConnectionClosedError, KeyboardInterrupt):
        return 0
    finally:
        with contextlib.suppress(error.ConnectionClosedError):
            d.close()


if __name__ == "__main__":
    sys.exit(main())

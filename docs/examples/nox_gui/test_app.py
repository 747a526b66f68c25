"""Tests of app.py on a trivnc desktop, through trivnc's pytest plugin.

The plugin comes with trivnc (an entry point): the `trivnc_desktop` fixture
is a private Xvfb served by trivnc, `trivnc_viewer` a VNC client that sees it
and types and clicks into it. When a test fails, a PNG of the screen at that
moment goes to trivnc-artifacts/ (or --trivnc-artifacts) and into the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from trivnc.testing.pytest_plugin import TrivncDesktop, TrivncViewer

APP = Path(__file__).with_name("app.py")
TITLE = "Colours"
LEFT, TOP, WIDTH, HEIGHT = 100, 100, 300, 200
#: A point inside the window, away from where the tests click.
INSIDE = (LEFT + 10, TOP + 10)
RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


@pytest.fixture
async def app(trivnc_desktop: TrivncDesktop) -> trio.Process:
    """app.py running on the desktop, its window up; stopped after the test."""
    process = await trivnc_desktop.launch(
        [sys.executable, APP, "--title", TITLE, "--geometry", f"{WIDTH}x{HEIGHT}+{LEFT}+{TOP}"]
    )
    await trivnc_desktop.wait_for_window(TITLE)
    return process


async def test_the_window_starts_blue(app: trio.Process, trivnc_viewer: TrivncViewer) -> None:
    await trivnc_viewer.wait_for_pixel(*INSIDE, BLUE)
    # Outside the window the screen is Xvfb's black root window.
    assert trivnc_viewer.pixel(LEFT - 5, TOP - 5) == BLACK


@pytest.mark.parametrize(("key", "colour"), [("r", RED), ("g", GREEN), ("b", BLUE)])
async def test_keys_choose_the_colour(
    app: trio.Process, trivnc_viewer: TrivncViewer, key: str, colour: tuple[int, int, int]
) -> None:
    await trivnc_viewer.wait_for_pixel(*INSIDE, BLUE)
    await trivnc_viewer.type_text("g" if key != "g" else "r")
    await trivnc_viewer.type_text(key)
    await trivnc_viewer.wait_for_pixel(*INSIDE, colour)


async def test_a_click_draws_a_square_where_it_happened(
    app: trio.Process, trivnc_viewer: TrivncViewer
) -> None:
    x, y = LEFT + 150, TOP + 100
    await trivnc_viewer.wait_for_pixel(x, y, BLUE)
    await trivnc_viewer.click(x, y)
    await trivnc_viewer.wait_for_pixel(x, y, BLACK)
    screen = trivnc_viewer.rgb
    # 20x20 and centred: black from x-10 to x+9, blue right outside.
    assert (screen[y - 10 : y + 10, x - 10 : x + 10] == BLACK).all()
    assert tuple(screen[y, x + 10]) == BLUE and tuple(screen[y, x - 11]) == BLUE


async def test_escape_quits(app: trio.Process, trivnc_viewer: TrivncViewer) -> None:
    await trivnc_viewer.wait_for_pixel(*INSIDE, BLUE)
    await trivnc_viewer.press("Escape")
    with trio.fail_after(5):
        assert await app.wait() == 0

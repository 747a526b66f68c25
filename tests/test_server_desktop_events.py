"""What a desktop says besides pixels reaches the viewers: clipboard (old-style
and Extended Clipboard), pointer shape, bell; and a desktop that ends stops
the server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import trio

import trivnc
from trivnc.rfb.constants import ClipboardFlags, Encoding, PseudoEncoding
from trivnc.server import Server
from trivnc.sources.array import ArraySource
from trivnc.sources.base import CursorImage
from trivnc.testing.aclient import open_test_client
from trivnc.testing.client import (
    Bell,
    ClipboardNotify,
    ClipboardProvide,
    CursorShape,
    ServerCutText,
)


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[tuple[Server, ArraySource]]:
    source = ArraySource(64, 48)
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True)
    yield await nursery.start(trivnc.serve, config), source


def listener(source: ArraySource) -> trivnc.server.ServerContext:
    assert isinstance(source.listener, trivnc.server.ServerContext)
    return source.listener


async def test_clipboard_old_style(served: tuple[Server, ArraySource]) -> None:
    server, source = served
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=[Encoding.RAW]) as c:
        await c.screenshot()
        listener(source).clipboard_changed("café")
        event = await c.wait_for(ServerCutText)
        assert event.text == "café"


async def test_clipboard_extended_notify_request_provide(
    served: tuple[Server, ArraySource],
) -> None:
    server, source = served
    encodings = [Encoding.RAW, PseudoEncoding.EXTENDED_CLIPBOARD]
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=encodings) as c:
        await c.screenshot()
        listener(source).clipboard_changed("snow ☃\nline two")
        notify = await c.wait_for(ClipboardNotify)
        assert notify.formats & ClipboardFlags.TEXT
        await c.send(c.conn.clipboard_request(ClipboardFlags.TEXT))
        provide = await c.wait_for(ClipboardProvide)
        assert provide.text == "snow ☃\nline two"


async def test_cursor_shape_and_bell(served: tuple[Server, ArraySource]) -> None:
    server, source = served
    rgba = np.zeros((8, 6, 4), np.uint8)
    rgba[2:6, 1:5] = (200, 100, 50, 255)
    rgba[0, 0] = (64, 32, 16, 128)  # half transparent, premultiplied
    cursor = CursorImage(rgba, (3, 4), serial=7)
    for pseudo in (PseudoEncoding.CURSOR_WITH_ALPHA, PseudoEncoding.CURSOR):
        encodings = [Encoding.RAW, pseudo]
        async with open_test_client("127.0.0.1", server.rfb_port, encodings=encodings) as c:
            await c.screenshot()
            listener(source).cursor_changed(cursor)
            await c.request_update(incremental=True)
            shape = await c.wait_for(CursorShape)
            assert (shape.hotspot_x, shape.hotspot_y, shape.width, shape.height) == (3, 4, 6, 8)
            image = shape.image()
            assert np.array_equal(image[2:6, 1:5], rgba[2:6, 1:5])
            if pseudo == PseudoEncoding.CURSOR_WITH_ALPHA:
                assert np.array_equal(image, rgba)
            listener(source).bell()
            await c.wait_for(Bell)


async def test_a_desktop_that_ends_stops_the_server(nursery: trio.Nursery) -> None:
    source = ArraySource(32, 32)
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True)
    done = trio.Event()

    async def run() -> None:
        await trivnc.serve(config)
        done.set()

    nursery.start_soon(run)
    with trio.fail_after(5):
        while source.listener is None:
            await trio.sleep(0.01)
    listener(source).source_ended("X server :99 went away")
    with trio.fail_after(5):
        await done.wait()

"""The demo desktop as a newcomer meets it: the `trivnc` command prints where to
connect, and over VNC the pointer paints and the keys type."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import trio

import trivnc
from trivnc.rfb.constants import Encoding
from trivnc.sources.demo import DemoSource
from trivnc.testing.aclient import open_test_client


async def test_pointer_paints_and_keys_type_over_vnc(nursery: trio.Nursery) -> None:
    demo = DemoSource(800, 450, animate=False)
    config = trivnc.Config(source=demo, rfb_port=0, insecure_no_auth=True)
    server = await nursery.start(trivnc.serve, config)
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=[Encoding.ZRLE]) as c:
        before = await c.screenshot()
        canvas = demo.layout.canvas
        y = canvas.y + canvas.h // 2
        x0, x1 = canvas.x + 20, canvas.x + canvas.w - 20
        await c.pointer(x0, y, 1)
        for x in range(x0, x1, 15):
            await c.pointer(x, y, 1)
        await c.pointer(x1, y, 1)
        await c.pointer(x1, y, 0)
        await c.type_text("hello")
        with trio.fail_after(10):
            while True:
                after = await c.screenshot()
                painted = (after[y - 2 : y + 3, x0:x1] != before[y - 2 : y + 3, x0:x1]).any(axis=2)
                text = demo.layout.text
                typed = (after[text.slices()] != before[text.slices()]).any()
                if painted.any(axis=0).mean() > 0.8 and typed:
                    break
                await trio.sleep(0.1)
        # Nothing outside the canvas and the text area changed.
        changed = (after != before).any(axis=2)
        changed[canvas.slices()] = False
        changed[demo.layout.text.slices()] = False
        assert not changed.any()


async def test_the_trivnc_command_serves_the_demo() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trivnc.cli",
            "--insecure-no-auth",
            "--rfb-port",
            "0",
            "--web-port",
            "off",
            "--geometry",
            "640x360",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"127\.0\.0\.1::(\d+)", line):
                port = int(m.group(1))
                break
        assert port is not None, lines
        assert "demo desktop (640x360)" in "".join(lines)
        async with open_test_client("127.0.0.1", port) as c:
            shot = await c.screenshot()
            assert shot.shape == (360, 640, 4)
            assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 50  # a real picture
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()

"""trivnc driven by real third-party VNC clients, each started by the test:
vncdotool (Raw, RFB 3.8, SetPixelFormat RGBX), vncsnapshot (RFB 3.3 only),
asyncvnc (Zlib), and TigerVNC's viewer under Xvfb (Tight JPEG and ZRLE)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import imagecodecs
import numpy as np
import numpy.typing as npt
import pytest
import trio

import trivnc
from trivnc.server import Server
from trivnc.sources.array import ArraySource, KeyInput, PointerInput
from trivnc.testing.images import desktop_like, psnr
from trivnc.testing.xvfb import Xvfb

pytestmark = pytest.mark.realclient

BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 400, 300


def require(program: str) -> str:
    path = shutil.which(program) or shutil.which(program, path=str(BIN))
    if path is None:
        pytest.fail(f"{program} is not installed; run tests/system-deps.sh (nox -s tests does)")
    return path


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[tuple[Server, ArraySource]]:
    source = ArraySource.from_array(desktop_like(WIDTH, HEIGHT, seed=7), name="real-clients")
    config = trivnc.Config(source=source, rfb_port=0, insecure_no_auth=True)
    server = await nursery.start(trivnc.serve, config)
    yield server, source


def rgb_of(source: ArraySource) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(source.pixels[..., 2::-1])


async def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)


async def test_vncdotool_capture_is_exact(
    served: tuple[Server, ArraySource], tmp_path: Path
) -> None:
    server, source = served
    out = tmp_path / "capture.png"
    result = await run(
        [require("vncdo"), "-s", f"127.0.0.1::{server.rfb_port}", "capture", str(out)]
    )
    assert result.returncode == 0, result.stderr.decode()
    image = imagecodecs.png_decode(out.read_bytes())
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(image, rgb_of(source))


async def test_vncdotool_input_reaches_the_source(served: tuple[Server, ArraySource]) -> None:
    server, source = served
    events = source.input_events()
    result = await run(
        [
            require("vncdo"),
            "-s",
            f"127.0.0.1::{server.rfb_port}",
            "move",
            "123",
            "45",
            "click",
            "1",
            "key",
            "a",
        ]
    )
    assert result.returncode == 0, result.stderr.decode()
    seen: list[object] = []
    with trio.move_on_after(5):
        while len(seen) < 5:
            seen.append(await events.receive())
    assert PointerInput(123, 45, 0) in seen
    assert PointerInput(123, 45, 1) in seen
    assert KeyInput(ord("a"), True) in seen and KeyInput(ord("a"), False) in seen


@pytest.mark.parametrize("encoding", ["raw", "hextile", "zlib"])
async def test_vncsnapshot_rfb33(
    served: tuple[Server, ArraySource], tmp_path: Path, encoding: str
) -> None:
    server, source = served
    out = tmp_path / "snap.jpg"
    result = await run(
        [
            require("vncsnapshot"),
            "-quality",
            "100",
            "-encodings",
            encoding,
            f"127.0.0.1::{server.rfb_port}",
            str(out),
        ]
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    image = imagecodecs.jpeg8_decode(out.read_bytes())
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert psnr(image, rgb_of(source)) > 35  # vncsnapshot writes JPEG: close, not exact


ASYNCVNC_SCRIPT = """
import asyncio, sys
import asyncvnc, numpy as np

async def main():
    async with asyncvnc.connect("127.0.0.1", int(sys.argv[1])) as client:
        pixels = await client.screenshot()
        np.save(sys.argv[2], pixels)

asyncio.run(main())
"""


async def test_asyncvnc_zlib(served: tuple[Server, ArraySource], tmp_path: Path) -> None:
    server, source = served
    out = tmp_path / "shot.npy"
    result = await run([sys.executable, "-c", ASYNCVNC_SCRIPT, str(server.rfb_port), str(out)])
    assert result.returncode == 0, result.stderr.decode()
    rgba = np.load(out)
    assert rgba.shape == (HEIGHT, WIDTH, 4)
    assert np.array_equal(rgba[..., :3], rgb_of(source))


async def _viewer_screen(
    xvfb: Xvfb, port: int, encoding: str, expected: npt.NDArray[np.uint8], min_psnr: float
) -> float:
    """Run xtigervncviewer full screen on the Xvfb; return the best PSNR of its
    picture against `expected` (RGB) seen within the time limit."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    viewer = subprocess.Popen(
        [
            require("xtigervncviewer"),
            "-FullScreen",
            f"-PreferredEncoding={encoding}",
            "-AutoSelect=0",
            "-QualityLevel=8",
            "-SecurityTypes=None",
            "-Shared=1",
            f"127.0.0.1::{port}",
        ],
        env=xvfb.env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    best = 0.0
    try:
        with trio.move_on_after(30):
            while best < min_psnr:
                await trio.sleep(0.5)
                if viewer.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"viewer exited: {log.read().decode()}")
                screen = await trio.to_thread.run_sync(xvfb.screenshot)
                h, w = expected.shape[:2]
                best = max(best, psnr(np.ascontiguousarray(screen[:h, :w, 2::-1]), expected))
    finally:
        viewer.terminate()
        viewer.wait(5)
        log.close()
    return best


@pytest.mark.xvfb
@pytest.mark.parametrize(("encoding", "min_psnr"), [("Tight", 30.0), ("ZRLE", 99.0)])
async def test_tigervnc_viewer(
    served: tuple[Server, ArraySource], encoding: str, min_psnr: float
) -> None:
    require("Xvfb")
    server, source = served
    with Xvfb(WIDTH, HEIGHT) as xvfb:
        best = await _viewer_screen(xvfb, server.rfb_port, encoding, rgb_of(source), min_psnr)
    assert best >= min_psnr


@pytest.mark.xvfb
async def test_tigervnc_viewer_shows_the_demo_desktop(nursery: trio.Nursery) -> None:
    require("Xvfb")
    from trivnc.sources.demo import DemoSource

    demo = DemoSource(640, 360, animate=False)
    config = trivnc.Config(source=demo, rfb_port=0, insecure_no_auth=True)
    server = await nursery.start(trivnc.serve, config)
    frame = await server.service.wait_ready()
    expected = np.ascontiguousarray(frame.pixels[..., 2::-1])
    with Xvfb(640, 360) as xvfb:
        best = await _viewer_screen(xvfb, server.rfb_port, "Tight", expected, 30.0)
    assert best >= 30.0

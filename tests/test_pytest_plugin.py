"""trivnc's pytest plugin (trivnc/testing/pytest_plugin.py, the pytest11 entry
point) used the way a user uses it: test files written into a pytester
directory and run by pytest in a subprocess (each with its own trio.run), with
docs/examples/nox_gui/app.py as the application under test. An application is
seen and driven, the API client works, a failing test leaves a PNG of the
desktop at the moment it failed and names it in the report, --trivnc-keep-open
keeps a failed desktop reachable until Ctrl+C, and the nox example's tests
pass."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path

import httpx
import imagecodecs
import numpy as np
import pytest
import trio

from trivnc.testing.aclient import open_test_client
from trivnc.testing.pytest_plugin import screenshot_name

pytest_plugins = ["pytester"]

pytestmark = [
    pytest.mark.xvfb,
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "nox_gui"
APP = EXAMPLE / "app.py"
#: Every run below is a fresh pytest process; none should take long.
RUN_TIMEOUT = 120

#: The user's configuration: trio mode, a small desktop, warnings are errors
#: (so the plugin leaks no sockets, processes or unawaited coroutines).
INI = """
[pytest]
trio_mode = true
trivnc_geometry = 640x480
filterwarnings = error
"""

#: What the user's test files share: app.py in a 200x100 window at (40, 30).
PRELUDE = f"""
import sys

import numpy as np
import pytest
import trio

APP = {str(APP)!r}
RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)
INSIDE = (50, 40)


@pytest.fixture
async def app(trivnc_desktop):
    process = await trivnc_desktop.launch(
        [sys.executable, APP, "--title", "Colours", "--geometry", "200x100+40+30"]
    )
    await trivnc_desktop.wait_for_window("Colours")
    yield process
    # Gone before the desktop's teardown: a screenshot taken there would not
    # show the window, one taken when the test failed does.
    process.kill()
    await process.wait()
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)


def decode_png(path: Path) -> np.ndarray:
    pixels: np.ndarray = imagecodecs.png_decode(path.read_bytes())
    return pixels


def test_an_application_is_seen_and_driven_through_the_fixtures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_user=PRELUDE
        + """

async def test_the_desktop(trivnc_desktop):
    assert (trivnc_desktop.width, trivnc_desktop.height) == (640, 480)
    assert trivnc_desktop.display.startswith(":")
    assert trivnc_desktop.env()["DISPLAY"] == trivnc_desktop.display
    assert trivnc_desktop.web_url == f"https://127.0.0.1:{trivnc_desktop.web_port}/"
    assert trivnc_desktop.vnc_address == f"127.0.0.1::{trivnc_desktop.rfb_port}"
    assert trivnc_desktop.username == "owner" and len(trivnc_desktop.password) >= 20
    shot = await trivnc_desktop.screenshot()
    assert shot.shape == (480, 640, 3) and not shot.any()  # Xvfb's black root window


async def test_the_viewer_sees_the_app_and_drives_it(app, trivnc_desktop, trivnc_viewer):
    await trivnc_viewer.wait_for_pixel(*INSIDE, BLUE)
    assert trivnc_viewer.pixel(39, 29) == BLACK  # just outside the window
    await trivnc_viewer.type_text("r")  # the keyboard
    await trivnc_viewer.wait_for_pixel(*INSIDE, RED)
    await trivnc_viewer.click(140, 80)  # the pointer: a square centred there
    await trivnc_viewer.wait_for_pixel(140, 80, BLACK)
    assert trivnc_viewer.pixel(150, 80) == RED and trivnc_viewer.pixel(149, 80) == BLACK
    # What the viewer decoded is what the X server has.
    assert np.array_equal(await trivnc_viewer.screenshot(), await trivnc_desktop.screenshot())
    await trivnc_viewer.press("q")
    with trio.fail_after(5):
        assert await app.wait() == 0


async def test_a_wait_that_times_out_says_what_it_saw(app, trivnc_viewer):
    await trivnc_viewer.wait_for_pixel(*INSIDE, BLUE)
    expected = r"\\(50, 40\\) to be \\(1, 2, 3\\).*it is \\(0, 0, 255\\)"
    with pytest.raises(AssertionError, match=expected):
        await trivnc_viewer.wait_for_pixel(*INSIDE, (1, 2, 3), timeout=0.3)


async def test_the_api_client_is_the_owner(app, trivnc_api):
    users = (await trivnc_api.get("api/get_users")).raise_for_status().json()
    assert users == [{"user": "owner", "read": True, "write": True, "owner": True}]
    shot = (await trivnc_api.get("api/get_screenshot")).raise_for_status()
    assert shot.headers["content-type"] == "image/jpeg" and shot.content[:2] == b"\\xff\\xd8"


@pytest.mark.trivnc(geometry="320x240")
async def test_the_marker_sets_the_size(trivnc_desktop, trivnc_viewer):
    assert trivnc_viewer.size == (320, 240) == (trivnc_desktop.width, trivnc_desktop.height)
"""
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=5)
    assert not (pytester.path / "trivnc-artifacts").exists()


def test_a_failing_test_leaves_a_screenshot_in_the_report(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_user=PRELUDE
        + """

async def test_turns_green_then_fails(app, trivnc_viewer):
    await trivnc_viewer.type_text("g")
    await trivnc_viewer.wait_for_pixel(*INSIDE, GREEN)
    assert False, "deliberately failing"


@pytest.fixture
async def app_that_never_shows(trivnc_desktop):
    await trivnc_desktop.launch([sys.executable, APP, "--title", "Other"])
    await trivnc_desktop.wait_for_window("a title nobody has", timeout=0.5)


async def test_with_a_failing_fixture(app_that_never_shows):
    pass


async def test_passes(app, trivnc_viewer):
    await trivnc_viewer.wait_for_pixel(*INSIDE, BLUE)


async def test_skips(trivnc_desktop):
    pytest.skip("not today")
"""
    )
    result = run(pytester, "--trivnc-artifacts=shots", "--junitxml=report.xml")
    result.assert_outcomes(failed=2, passed=1, skipped=1)
    shots = pytester.path / "shots"
    failed = shots / screenshot_name("test_user.py::test_turns_green_then_fails")
    fixture = shots / screenshot_name("test_user.py::test_with_a_failing_fixture")
    assert sorted(shots.iterdir()) == sorted([failed, fixture])
    # The screen at the moment of the failure: the window turned green.
    pixels = decode_png(failed)
    assert pixels.shape == (480, 640, 3)
    assert tuple(pixels[40, 50]) == (0, 255, 0)
    assert tuple(pixels[10, 10]) == (0, 0, 0)
    assert (pixels[30:130, 40:240] == (0, 255, 0)).all()
    # A fixture failed before the test ran: the desktop's teardown took the
    # screen before it stopped what the fixture had launched.
    # (app.py's own default geometry: 300x200 at (100, 100)).
    assert tuple(decode_png(fixture)[150, 150]) == (0, 0, 255)
    # The report names the files: a section of each failure, and a summary.
    output = result.stdout.str()
    for path in (failed, fixture):
        assert re.search(rf"-+ trivnc screenshot -+\n{re.escape(str(path))}\n", output), output
    assert "trivnc: screenshots of 2 failed test(s)" in output
    properties = ET.parse(pytester.path / "report.xml").getroot().iter("property")
    assert {(p.get("name"), p.get("value")) for p in properties} == {
        ("trivnc_screenshot", str(failed)),
        ("trivnc_screenshot", str(fixture)),
    }


async def test_keep_open_keeps_the_failed_desktop_until_ctrl_c(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_user=PRELUDE
        + """

async def test_turns_green_then_fails(app, trivnc_viewer):
    await trivnc_viewer.type_text("g")
    await trivnc_viewer.wait_for_pixel(*INSIDE, GREEN)
    assert False, "look at me"


async def test_not_run_after_ctrl_c(trivnc_desktop):
    pass
"""
    )
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--trivnc-keep-open"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with trio.open_nursery() as nursery:
        # run_process kills pytest if this test fails or is cancelled.
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                cwd=pytester.path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
        )
        assert process.stdout is not None
        output = b""
        with trio.fail_after(60):
            while b"Press Enter" not in output:
                chunk = await process.stdout.receive_some(65536)
                assert chunk, output.decode()
                output += chunk
        text = output.decode()
        url = re.search(r"browser: +(https://127\.0\.0\.1:\d+/)", text)
        vnc = re.search(r"VNC viewer: +127\.0\.0\.1::(\d+) .*certificate (\S+)\)", text)
        password = re.search(r"password: +(\S+)", text)
        assert url and vnc and password and "user:       owner" in text, text
        # The desktop is up and still shows the application as it failed.
        trust = ssl.create_default_context(cafile=vnc[2])
        async with httpx.AsyncClient(verify=trust, auth=("owner", password[1])) as api:
            response = await api.get(url[1] + "api/get_users")
            assert response.status_code == 200
        async with open_test_client(
            "127.0.0.1",
            int(vnc[1]),
            username="owner",
            password=password[1],
            ssl_context=trust,
        ) as viewer:
            shot = await viewer.screenshot()
            assert tuple(shot[40, 50, 2::-1]) == (0, 255, 0)
        with trio.fail_after(30):
            assert process.returncode is None  # still waiting for us
            process.send_signal(signal.SIGINT)
            async for chunk in process.stdout:
                output += chunk
            await process.wait()
    text = output.decode()
    assert process.returncode == pytest.ExitCode.INTERRUPTED, text
    assert "1 failed" in text and "passed" not in text, text
    assert "interrupted while test_user.py::test_turns_green_then_fails's desktop" in text


def test_keep_open_timeout_goes_on_with_the_tests(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_user="""
async def test_fails(trivnc_desktop):
    assert False


async def test_passes(trivnc_desktop):
    pass
"""
    )
    result = run(pytester, "--trivnc-keep-open", "--trivnc-keep-open-timeout=0.2")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "trivnc: test_user.py::test_fails failed; its desktop stays open",
            "  browser:    https://127.0.0.1:*/  (self-signed certificate)",
            "*going on in 0.2 s.",
            "trivnc: closing the desktop",
        ]
    )


def test_suites_that_do_not_use_it_pay_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_user="""
import sys


def test_sync():
    # No X connection, no Xvfb: the plugin imported nothing for X.
    assert "Xlib" not in sys.modules
    assert "trivnc.sources.x11" not in sys.modules


async def test_async():
    assert "Xlib" not in sys.modules


def test_fails():
    assert False
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=1)
    output = result.stdout.str()
    assert "trivnc screenshot" not in output and "trivnc: screenshots" not in output
    assert not (pytester.path / "trivnc-artifacts").exists()


def test_bad_options_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    result = run(pytester, "--trivnc-geometry=big")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--trivnc-geometry / trivnc_geometry: expected WIDTHxHEIGHT*"])
    pytester.makepyfile(test_user="async def test_nothing(trivnc_desktop): pass")
    pytester.makeini(INI.replace("trio_mode = true", ""))
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs an async test run by pytest-trio*"])


def test_the_nox_example_passes(tmp_path: Path) -> None:
    """docs/examples/nox_gui's tests, as its noxfile runs them (without nox)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--trivnc-artifacts={tmp_path / 'artifacts'}",
            "-W",
            "error",
        ],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b6 passed\b", result.stdout), result.stdout
    assert not (tmp_path / "artifacts").exists()

# trivnc's pytest plugin, registered as the `pytest11` entry point "trivnc":
# installing trivnc is enough. GUI tests under pytest-trio get a private Xvfb
# desktop served by trivnc, a decoding VNC client to watch and drive it, an
# HTTPS client for the developer API, and a PNG screenshot of the desktop
# whenever a test that used it fails.
#
# Cost for suites that do not use it: this module imports only pytest and the
# standard library; trivnc's server, Xlib, numpy and httpx are imported by the
# fixtures, and no Xvfb starts unless `trivnc_desktop` is requested. The hooks
# look at an item only when that fixture is among its fixture names.
#
# Why the screenshot is taken inside the test: pytest-trio runs a test's trio
# fixtures (setup and teardown) and the test itself in one trio.run during the
# call phase, so by the time pytest_runtest_makereport sees a failure the
# desktop and the application under test are gone. The plugin therefore wraps
# the test function before pytest-trio does (a tryfirst pytest_runtest_call
# wrapper) and grabs the screen the moment the test's exception leaves it,
# while fixtures (and applications started with `launch()`) still run; the
# report hook then only attaches the file. A failure before the test body
# runs (a fixture that crashed) is captured by the desktop's own teardown,
# before it stops the applications it launched.
"""pytest fixtures for testing GUI applications on a trivnc desktop.

Fixtures (pytest-trio tests: ``trio_mode = true`` or ``@pytest.mark.trio``):

- ``trivnc_desktop``: a private Xvfb with a trivnc server on loopback
  (:class:`TrivncDesktop`: ``.display``, ``.env()``, ``.launch()``,
  ``.rfb_port``, ``.web_url``, ``.username``/``.password`` of the owner,
  ``.screenshot()``);
- ``trivnc_viewer``: a connected decoding VNC client (:class:`TrivncViewer`:
  pixels, waiting for them, keyboard and pointer);
- ``trivnc_api``: an ``httpx.AsyncClient`` for the developer API, logged in
  as the owner and verifying the server's self-signed certificate.

Options (command line, or ini where noted): ``--trivnc-geometry WxH`` (ini
``trivnc_geometry``, default 1280x720; per test ``@pytest.mark.trivnc(geometry=
"800x600")``), ``--trivnc-artifacts DIR`` (ini ``trivnc_artifacts``, default
``trivnc-artifacts`` beside the ini file), ``--trivnc-keep-open`` and
``--trivnc-keep-open-timeout SECONDS``.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import ssl

    import httpx
    import numpy as np
    import numpy.typing as npt
    import trio

    from ..server import Server
    from .aclient import VncClient

    RGB = npt.NDArray[np.uint8]

__all__ = ["TrivncDesktop", "TrivncViewer"]

DEFAULT_GEOMETRY = "1280x720"
DEFAULT_ARTIFACTS = "trivnc-artifacts"
#: Seconds a launched application gets to exit after SIGTERM.
STOP_TIMEOUT = 5.0
#: Seconds the screenshot of a failure may take before it is given up.
SCREENSHOT_TIMEOUT = 15.0
DESKTOP_FIXTURE = "trivnc_desktop"
SECTION = "trivnc screenshot"

_GEOMETRY = re.compile(r"(\d+)x(\d+)")


# -- configuration ------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trivnc", "trivnc virtual desktop (trivnc_desktop fixture)")
    group.addoption(
        "--trivnc-geometry",
        dest="trivnc_geometry",
        metavar="WxH",
        default=None,
        help=f"size of the trivnc_desktop's screen (ini trivnc_geometry; {DEFAULT_GEOMETRY})",
    )
    group.addoption(
        "--trivnc-artifacts",
        dest="trivnc_artifacts",
        metavar="DIR",
        default=None,
        help="where screenshots of failed tests go (ini trivnc_artifacts; "
        f"default {DEFAULT_ARTIFACTS}/ beside the ini file)",
    )
    group.addoption(
        "--trivnc-keep-open",
        dest="trivnc_keep_open",
        action="store_true",
        default=False,
        help="when a test that uses trivnc_desktop fails, keep its desktop (and the "
        "applications on it) running, print where to connect, and wait: Enter goes on "
        "with the tests, Ctrl+C stops the run",
    )
    group.addoption(
        "--trivnc-keep-open-timeout",
        dest="trivnc_keep_open_timeout",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="with --trivnc-keep-open: go on after this many seconds (default 0: no limit)",
    )
    parser.addini(
        "trivnc_geometry", f"size of the trivnc_desktop's screen (default {DEFAULT_GEOMETRY})"
    )
    parser.addini(
        "trivnc_artifacts",
        "directory for screenshots of failed tests, relative to the ini file "
        f"(default {DEFAULT_ARTIFACTS})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        'trivnc(geometry="WxH"): settings of the trivnc_desktop fixture for this test',
    )
    parse_geometry(_geometry_setting(config), "--trivnc-geometry / trivnc_geometry")
    if config.getoption("trivnc_keep_open_timeout") < 0:
        raise pytest.UsageError("--trivnc-keep-open-timeout must be 0 or more")
    config.stash[_SAVED] = []


def parse_geometry(text: str, where: str = "geometry") -> tuple[int, int]:
    """Parse "1280x720" into (1280, 720); pytest.UsageError when it is not a size."""
    match = _GEOMETRY.fullmatch(text.strip().lower())
    if match is None:
        raise pytest.UsageError(f"{where}: expected WIDTHxHEIGHT, got {text!r}")
    width, height = int(match[1]), int(match[2])
    if not (16 <= width <= 16384 and 16 <= height <= 16384):
        raise pytest.UsageError(f"{where}: {width}x{height} is out of range (16..16384)")
    return width, height


def _geometry_setting(config: pytest.Config) -> str:
    value = config.getoption("trivnc_geometry") or config.getini("trivnc_geometry")
    return str(value or DEFAULT_GEOMETRY)


def artifacts_dir(config: pytest.Config) -> Path:
    """The screenshot directory: --trivnc-artifacts (relative to where pytest
    was started), else the ini option (relative to the ini file), else
    trivnc-artifacts/ beside the ini file (or in the rootdir)."""
    option = config.getoption("trivnc_artifacts")
    if option:
        return (config.invocation_params.dir / str(option)).resolve()
    base = config.inipath.parent if config.inipath is not None else config.rootpath
    return (base / (str(config.getini("trivnc_artifacts") or "") or DEFAULT_ARTIFACTS)).resolve()


def screenshot_name(nodeid: str) -> str:
    """A file name for a test's screenshot: its node id, in characters every
    file system and shell takes ("tests/test_a.py::test_b[x]" ->
    "tests_test_a.py__test_b-x.png")."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid.replace("::", "__").replace("/", "_"))
    name = name.strip("-.") or "test"
    if len(name) > 150:
        import hashlib

        name = name[:130] + "-" + hashlib.sha1(nodeid.encode()).hexdigest()[:12]
    return name + ".png"


# -- state kept on items and the config ----------------------------------------------------


@dataclass
class _Shot:
    """A failure's screenshot: the file once written, or why there is none."""

    path: Path | None = None
    error: str = ""
    #: Pixels grabbed at teardown, written only if the report says failed.
    pending: RGB | None = None


_DESKTOP = pytest.StashKey["TrivncDesktop"]()
_SHOT = pytest.StashKey[_Shot]()
#: How the test function ended: "passed", "failed", or "cancelled".
_BODY = pytest.StashKey[str]()
_SAVED = pytest.StashKey[list[Path]]()


# -- the desktop -----------------------------------------------------------------------------


@dataclass(eq=False)
class TrivncDesktop:
    """A private Xvfb served by trivnc on 127.0.0.1, as `trivnc_desktop` yields it.

    Run the application under test with ``await desktop.launch([...])`` (or
    any way you like with ``env=desktop.env()``); look at it through
    ``trivnc_viewer`` or ``await desktop.screenshot()``; a person can watch
    at :attr:`web_url` (noVNC) or :attr:`vnc_address` with :attr:`username`
    and :attr:`password` (see ``--trivnc-keep-open``).
    """

    #: The X display (":N") for the application: its DISPLAY.
    display: str
    #: Screen size in pixels.
    width: int
    height: int
    #: The running trivnc server (trivnc.Server).
    server: Server
    #: The owner's credentials (read, write, owner: the API too).
    username: str
    password: str = field(repr=False)
    #: The server's self-signed certificate (trust it to verify TLS).
    cert: Path
    #: The KasmVNC-format users file the server uses.
    users_file: Path
    host: str = "127.0.0.1"
    _launched: list[trio.Process] = field(default_factory=list, repr=False)

    @property
    def rfb_port(self) -> int:
        """The VNC port (VeNCrypt X509Plain with the users file)."""
        return self.server.rfb_port

    @property
    def web_port(self) -> int:
        return self.server.web_port

    @property
    def web_url(self) -> str:
        """The HTTPS page (noVNC, when installed) and, under /api/, the developer API."""
        return f"https://{self.host}:{self.web_port}/"

    @property
    def vnc_address(self) -> str:
        """Host and port in VNC viewers' "host::port" spelling."""
        return f"{self.host}::{self.rfb_port}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """os.environ with DISPLAY set to this desktop (and WAYLAND_DISPLAY
        removed, so that GTK and Qt stay on it), plus `extra`."""
        env = dict(os.environ)
        env.pop("WAYLAND_DISPLAY", None)
        env["DISPLAY"] = self.display
        env.update(extra or {})
        return env

    def ssl_context(self) -> ssl.SSLContext:
        """A client SSLContext that trusts exactly this server's certificate."""
        import ssl

        return ssl.create_default_context(cafile=str(self.cert))

    async def launch(
        self,
        command: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> trio.Process:
        """Start `command` on this desktop (DISPLAY set; `env` adds to the
        environment; other arguments go to trio.lowlevel.open_process). Its
        output goes where the test's output goes (pytest captures it). It is
        stopped (SIGTERM, then SIGKILL after 5 s) when the desktop is torn
        down, after a failure's screenshot has been taken."""
        import trio

        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = await trio.lowlevel.open_process(
            [os.fspath(part) for part in command], env=self.env(env), **kwargs
        )
        self._launched.append(process)
        return process

    async def screenshot(self) -> RGB:
        """The screen as the X server has it: RGB, shape (height, width, 3)."""
        import trio

        return await trio.to_thread.run_sync(grab_screen, self.display)

    async def save_screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Write the screen to `path` as PNG; returns the path."""
        pixels = await self.screenshot()
        target = Path(path)
        import trio

        await trio.to_thread.run_sync(write_png, target, pixels)
        return target

    async def wait_for_window(self, title: str, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Wait until a top-level window named `title` exists (its WM_NAME);
        returns its X id. AssertionError after `timeout` seconds."""
        import trio

        with trio.move_on_after(timeout):
            while True:
                found = await trio.to_thread.run_sync(find_window, self.display, title)
                if found is not None:
                    return found
                await trio.sleep(0.05)
        raise AssertionError(f"no window named {title!r} on {self.display} after {timeout} s")

    async def _stop_launched(self) -> None:
        import trio

        with trio.CancelScope(shield=True):
            for process in reversed(self._launched):
                if process.returncode is not None:
                    continue
                process.terminate()
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def grab_screen(display_name: str) -> RGB:
    """The root window of `display_name` as RGB (height, width, 3), read
    with X GetImage over a connection of its own (any thread)."""
    import numpy as np
    from Xlib import X, display

    d = display.Display(display_name)
    try:
        root = d.screen().root
        geometry = root.get_geometry()
        width, height = geometry.width, geometry.height
        image = root.get_image(0, 0, width, height, X.ZPixmap, 0xFFFFFFFF)
        data = image.data if isinstance(image.data, bytes) else image.data.encode("latin-1")
    finally:
        d.close()
    # A 24-bit TrueColor ZPixmap is BGRX, four bytes a pixel.
    bgrx = np.frombuffer(data, np.uint8).reshape(height, width, 4)
    return np.ascontiguousarray(bgrx[..., 2::-1])


def find_window(display_name: str, title: str) -> int | None:
    """The id of a window named `title` among the root's children and their
    children (where a window manager would have reparented it), or None."""
    from Xlib import display, error

    d = display.Display(display_name)
    try:
        pending = list(d.screen().root.query_tree().children)
        depth = {window.id: 0 for window in pending}
        while pending:
            window = pending.pop(0)
            try:
                if window.get_wm_name() == title:
                    return int(window.id)
                if depth[window.id] < 1:
                    for child in window.query_tree().children:
                        depth[child.id] = depth[window.id] + 1
                        pending.append(child)
            except error.XError:
                continue  # gone while we looked
        return None
    finally:
        d.close()


def write_png(path: Path, pixels: RGB) -> None:
    import imagecodecs

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(imagecodecs.png_encode(pixels, level=1))


# -- the viewer ------------------------------------------------------------------------------

#: Short names for press(): anything else is an X keysym name ("Return", "F5", "a").
KEY_ALIASES = {
    "ctrl": "Control_L",
    "control": "Control_L",
    "shift": "Shift_L",
    "alt": "Alt_L",
    "super": "Super_L",
    "meta": "Meta_L",
    "enter": "Return",
    "esc": "Escape",
    "del": "Delete",
    "space": "space",
    "tab": "Tab",
    "backspace": "BackSpace",
}


def keysym(name: str) -> int:
    """The keysym of an X keysym name ("Return", "a") or an alias ("ctrl")."""
    from Xlib import XK

    name = KEY_ALIASES.get(name.lower(), name) if len(name) > 1 else name
    value = int(XK.string_to_keysym(name))
    if not value:
        raise ValueError(f"unknown key name {name!r} (use X keysym names such as 'Return')")
    return value


class TrivncViewer:
    """A connected VNC client of the `trivnc_desktop`, as `trivnc_viewer`
    yields it: it holds the whole screen (lossless encodings), refreshes it
    on request, and sends keys and pointer events. Coordinates are screen
    pixels; colours are (r, g, b). The underlying
    trivnc.testing.aclient.VncClient is :attr:`client`."""

    def __init__(self, client: VncClient, desktop: TrivncDesktop) -> None:
        self.client = client
        self.desktop = desktop

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the remote screen."""
        return self.client.size

    @property
    def rgb(self) -> RGB:
        """A copy of the screen as last received: RGB (height, width, 3)."""
        return self.client.framebuffer[..., 2::-1].copy()

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        """The colour at (x, y) as last received."""
        b, g, r = (int(v) for v in self.client.framebuffer[y, x, :3])
        return r, g, b

    async def screenshot(self) -> RGB:
        """The whole screen as it is now (a full update): RGB (height, width, 3)."""
        return (await self.client.screenshot())[..., 2::-1].copy()

    async def wait_until(
        self,
        predicate: Callable[[RGB], bool],
        timeout: float = 10.0,  # noqa: ASYNC109
        what: str = "the screen to match",
    ) -> RGB:
        """Ask for updates until `predicate(screen)` is true, where screen is
        an RGB (height, width, 3) view of the framebuffer (do not keep it);
        returns a copy of that screen. AssertionError after `timeout` seconds."""
        import math

        import trio

        with trio.move_on_after(timeout):
            while not predicate(self.client.framebuffer[..., 2::-1]):
                # One incremental request at a time: the server answers it
                # when (and only when) something changed.
                await self.client.request_update(incremental=True)
                await self.client.next_update(math.inf)
            return self.rgb
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    async def wait_for_pixel(
        self,
        x: int,
        y: int,
        rgb: tuple[int, int, int],
        *,
        tolerance: int = 0,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Wait until the pixel at (x, y) is `rgb` (each channel within
        `tolerance`). AssertionError after `timeout`, naming the colour seen."""

        def matches(screen: RGB) -> bool:
            h, w = screen.shape[:2]
            if not (0 <= x < w and 0 <= y < h):
                return False
            return all(abs(int(a) - b) <= tolerance for a, b in zip(screen[y, x], rgb, strict=True))

        try:
            await self.wait_until(matches, timeout, f"pixel ({x}, {y}) to be {rgb}")
        except AssertionError as exc:
            w, h = self.size
            seen = self.pixel(x, y) if 0 <= x < w and 0 <= y < h else "outside the screen"
            raise AssertionError(f"{exc}; it is {seen}") from None

    # -- input --

    async def key(self, keysym: int, down: bool | None = None) -> None:
        """Press (down=True), release (False) or both (None) one keysym."""
        await self.client.key(keysym, down)

    async def press(self, *keys: str) -> None:
        """Press keys together and release them in reverse order:
        ``press("ctrl", "c")``, ``press("Return")``. Names are X keysym names
        or the aliases in KEY_ALIASES."""
        syms = [keysym(name) for name in keys]
        for sym in syms:
            await self.client.key(sym, True)
        for sym in reversed(syms):
            await self.client.key(sym, False)

    async def type_text(self, text: str) -> None:
        """Type `text`, one key press and release per character."""
        await self.client.type_text(text)

    async def move(self, x: int, y: int, buttons: int = 0) -> None:
        """Move the pointer to (x, y) with `buttons` held (a mask: 1 left, 2 middle, 4 right)."""
        await self.client.pointer(x, y, buttons)

    async def click(self, x: int, y: int, button: int = 1) -> None:
        """Click `button` (1 left, 2 middle, 3 right) at (x, y)."""
        await self.client.click(x, y, button)

    async def drag(self, start: tuple[int, int], end: tuple[int, int], button: int = 1) -> None:
        """Press `button` at `start`, move to `end`, release there."""
        mask = 1 << (button - 1)
        await self.client.pointer(*start, 0)
        await self.client.pointer(*start, mask)
        await self.client.pointer(*end, mask)
        await self.client.pointer(*end, 0)

    async def scroll(self, x: int, y: int, clicks: int) -> None:
        """Turn the wheel at (x, y): positive clicks scroll down, negative up."""
        await self.client.pointer(x, y, 0, scroll_y=clicks)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _trivnc_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for every desktop of the session."""
    from ..tlsconfig import ensure_self_signed

    return ensure_self_signed(tmp_path_factory.mktemp("trivnc-tls"))


@pytest.fixture
async def trivnc_desktop(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _trivnc_tls: tuple[Path, Path],
) -> AsyncIterator[TrivncDesktop]:
    """A private virtual X desktop served by trivnc, for one test
    (`trivnc --xvfb` in a fixture): Xvfb (-noreset) at --trivnc-geometry
    (or ``@pytest.mark.trivnc(geometry="WxH")``), and a trivnc server on
    127.0.0.1 with ports chosen by the system: VNC (VeNCrypt X509Plain) and
    HTTPS (noVNC page and developer API), a users file in a temporary
    directory with one owner and a random password, and a self-signed
    certificate. Yields a :class:`TrivncDesktop`; start the application under
    test on it with ``await trivnc_desktop.launch([...])`` (stopped at
    teardown) or with ``env=trivnc_desktop.env()``.

    When the test fails, a PNG of the screen at that moment goes to
    --trivnc-artifacts and into the report; with --trivnc-keep-open the
    desktop stays up until you say so."""
    import trio

    import trivnc

    from ..server.users import create_initial
    from ..sources.x11 import X11Source
    from ..sources.x11.xvfb import XvfbDesktop

    item = request.node
    marker = item.get_closest_marker("trivnc")
    if marker is not None and "geometry" in marker.kwargs:
        width, height = parse_geometry(str(marker.kwargs["geometry"]), "@pytest.mark.trivnc")
    else:
        width, height = parse_geometry(_geometry_setting(request.config))
    folder = tmp_path_factory.mktemp("trivnc-desktop")
    users_file = folder / "users"
    _, username, password = create_initial(users_file)
    cert, key = _trivnc_tls
    async with XvfbDesktop(width, height) as xvfb, trio.open_nursery() as nursery:
        config = trivnc.Config(
            source=X11Source(xvfb.display),
            listen=["127.0.0.1"],
            rfb_port=0,
            web_port=0,
            users_file=users_file,
            cert=cert,
            key=key,
        )
        server = await nursery.start(trivnc.serve, config)
        desktop = TrivncDesktop(
            display=xvfb.display,
            width=width,
            height=height,
            server=server,
            username=username,
            password=password,
            cert=cert,
            users_file=users_file,
        )
        item.stash[_DESKTOP] = desktop
        try:
            yield desktop
        finally:
            with trio.CancelScope(shield=True):
                if item.stash.get(_BODY, "") != "passed" and _SHOT not in item.stash:
                    # The test body never finished (a fixture failed, or it
                    # was cancelled): take the screen now, while what was
                    # launched still runs; it is saved if the test failed.
                    shot = _Shot()
                    with trio.move_on_after(SCREENSHOT_TIMEOUT):
                        try:
                            shot.pending = await desktop.screenshot()
                        except Exception as exc:
                            shot.error = f"no screenshot: {exc!r}"
                    item.stash[_SHOT] = shot
                del item.stash[_DESKTOP]
                await desktop._stop_launched()
                nursery.cancel_scope.cancel()


@pytest.fixture
async def trivnc_viewer(trivnc_desktop: TrivncDesktop) -> AsyncIterator[TrivncViewer]:
    """A VNC client connected to `trivnc_desktop` as its owner, over
    VeNCrypt with the certificate verified, holding the whole screen
    (lossless encodings, so pixels are exact). Yields a
    :class:`TrivncViewer`: ``pixel()``, ``screenshot()``, ``wait_until()``,
    ``wait_for_pixel()``, ``press()``, ``type_text()``, ``click()``,
    ``move()``, ``drag()``, ``scroll()``; ``.client`` is the underlying
    trivnc.testing.aclient.VncClient."""
    from .aclient import open_test_client

    desktop = trivnc_desktop
    async with open_test_client(
        desktop.host,
        desktop.rfb_port,
        username=desktop.username,
        password=desktop.password,
        ssl_context=desktop.ssl_context(),
    ) as client:
        await client.screenshot()
        yield TrivncViewer(client, desktop)


@pytest.fixture
async def trivnc_api(trivnc_desktop: TrivncDesktop) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` for `trivnc_desktop`'s web port: base URL
    :attr:`TrivncDesktop.web_url`, HTTP Basic as the owner (who may call
    every API route), and the server's self-signed certificate verified.
    ``await trivnc_api.get("api/get_screenshot")``. Needs httpx."""
    try:
        import httpx
    except ImportError:
        pytest.fail("the trivnc_api fixture needs httpx: pip install httpx", pytrace=False)
    desktop = trivnc_desktop
    async with httpx.AsyncClient(
        base_url=desktop.web_url,
        auth=(desktop.username, desktop.password),
        verify=desktop.ssl_context(),
        timeout=30,
    ) as client:
        yield client


# -- hooks: the failure screenshot and keeping the desktop open -------------------------------


def _uses_desktop(item: pytest.Item) -> bool:
    return DESKTOP_FIXTURE in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _uses_desktop(item) and item.get_closest_marker("trio") is None:
        # Without pytest-trio the async fixtures would never run.
        pytest.fail(
            f"{item.nodeid} uses {DESKTOP_FIXTURE}, which needs an async test run by "
            "pytest-trio: install pytest-trio, then set `trio_mode = true` in the pytest "
            "configuration or mark the test with @pytest.mark.trio",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    # Outermost, so that this runs before pytest-trio's own wrapper reads
    # item.obj: the test function it runs is then ours.
    __tracebackhide__ = True
    if not (isinstance(item, pytest.Function) and _uses_desktop(item) and _wrappable(item.obj)):
        return (yield)
    # Left by an earlier run of the same item (a plugin that reruns tests).
    if _BODY in item.stash:
        del item.stash[_BODY]
    if _SHOT in item.stash:
        del item.stash[_SHOT]
    original = item.obj
    item.obj = _capturing(item, original)
    try:
        return (yield)
    finally:
        item.obj = original


def _wrappable(function: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(function) and not hasattr(function, "hypothesis")


def _capturing(item: pytest.Item, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (the async test), screenshotting the desktop if it fails."""

    @functools.wraps(function)
    async def run_test(**kwargs: Any) -> None:
        __tracebackhide__ = True
        import trio

        try:
            await function(**kwargs)
        except trio.Cancelled:
            item.stash[_BODY] = "cancelled"
            raise
        except BaseException as exc:
            item.stash[_BODY] = "failed"
            if not _is_outcome(exc) and not isinstance(exc, KeyboardInterrupt):
                await _on_failure(item)
            raise
        item.stash[_BODY] = "passed"

    return run_test


def _is_outcome(exc: BaseException) -> bool:
    """pytest.skip / pytest.xfail / pytest.exit: not failures to picture."""
    return isinstance(exc, pytest.skip.Exception | pytest.xfail.Exception | pytest.exit.Exception)


async def _on_failure(item: pytest.Item) -> None:
    import trio

    desktop = item.stash.get(_DESKTOP, None)
    if desktop is None:
        return
    shot = _Shot()
    item.stash[_SHOT] = shot
    with trio.CancelScope(shield=True), trio.move_on_after(SCREENSHOT_TIMEOUT) as scope:
        try:
            shot.path = _save(item, await desktop.screenshot())
        except Exception as exc:
            shot.error = f"no screenshot: {exc!r}"
    if scope.cancelled_caught:
        shot.error = f"no screenshot: it took more than {SCREENSHOT_TIMEOUT} s"
    if item.config.getoption("trivnc_keep_open"):
        await _keep_open(item, desktop, shot)


def _save(item: pytest.Item, pixels: RGB) -> Path:
    path = artifacts_dir(item.config) / screenshot_name(item.nodeid)
    write_png(path, pixels)
    item.config.stash[_SAVED].append(path)
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # Under pytest-trio the desktop lives and dies in the call phase.
    if report.when != "call" or _SHOT not in item.stash:
        return report
    shot = item.stash[_SHOT]
    del item.stash[_SHOT]
    if shot.pending is not None and report.failed:
        try:
            shot.path = _save(item, shot.pending)
        except OSError as exc:
            shot.error = f"no screenshot: {exc!r}"
    shot.pending = None
    if shot.path is not None:
        report.sections.append((SECTION, str(shot.path)))
        item.user_properties.append(("trivnc_screenshot", str(shot.path)))
        _attach_to_html(item.config, report, shot.path)
    elif shot.error and report.failed:
        report.sections.append((SECTION, shot.error))
    return report


def _attach_to_html(config: pytest.Config, report: pytest.TestReport, path: Path) -> None:
    """Embed the screenshot in pytest-html's report, when that plugin runs."""
    if config.pluginmanager.getplugin("html") is None:
        return
    import base64
    import importlib

    try:
        extras: Any = importlib.import_module("pytest_html.extras")
        image = extras.png(base64.b64encode(path.read_bytes()).decode(), name=path.name)
    except (ImportError, AttributeError, OSError):
        return
    report.extras = [*getattr(report, "extras", []), image]  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    saved = config.stash.get(_SAVED, [])
    if not saved:
        return
    terminalreporter.write_sep("-", f"trivnc: screenshots of {len(saved)} failed test(s)")
    for path in saved:
        terminalreporter.write_line(str(path))


# -- --trivnc-keep-open ---------------------------------------------------------------------


async def _keep_open(item: pytest.Item, desktop: TrivncDesktop, shot: _Shot) -> None:
    """Say where the failed test's desktop is, and wait (still inside the
    test, so its fixtures and applications keep running) for Enter on the
    terminal, Ctrl+C (which then stops the run), or the timeout."""
    import trio

    timeout = float(item.config.getoption("trivnc_keep_open_timeout"))
    until = f"; going on in {timeout:g} s" if timeout else ""
    lines = [
        f"trivnc: {item.nodeid} failed; its desktop stays open",
        f"  browser:    {desktop.web_url}  (self-signed certificate)",
        f"  VNC viewer: {desktop.vnc_address}  (VeNCrypt X509Plain; certificate {desktop.cert})",
        f"  user:       {desktop.username}",
        f"  password:   {desktop.password}",
        f"  X display:  DISPLAY={desktop.display}",
        f"  screenshot: {shot.path or shot.error}",
        f"Press Enter to go on with the tests, Ctrl+C to stop the run{until}.",
    ]
    _print_to_terminal(item.config, lines)
    # Shielded: an outer deadline of the test (trio.fail_after) may have
    # passed already; only our own reasons end the wait.
    with trio.CancelScope(shield=True), trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if timeout:
                nursery.cancel_scope.deadline = trio.current_time() + timeout

            async def on_interrupt() -> None:
                async for _ in signals:
                    # pytest stops the run once this test is reported.
                    item.session.shouldstop = (
                        f"trivnc: interrupted while {item.nodeid}'s desktop was kept open"
                    )
                    nursery.cancel_scope.cancel()

            async def on_enter() -> None:
                await _read_enter()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_interrupt)
            nursery.start_soon(on_enter)
    _print_to_terminal(item.config, ["trivnc: closing the desktop"])


async def _read_enter() -> None:
    """Return when a line is entered on the controlling terminal; never if
    there is none (pytest's own stdin is captured)."""
    import trio

    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        await trio.sleep_forever()
    async with trio.lowlevel.FdStream(fd) as tty:
        while True:
            data = await tty.receive_some(1024)
            if not data:
                await trio.sleep_forever()
            if b"\n" in data:
                return


def _print_to_terminal(config: pytest.Config, lines: Iterator[str] | list[str]) -> None:
    """Write past pytest's output capture, straight to the terminal."""
    capture: Any = config.pluginmanager.getplugin("capturemanager")
    writer = config.get_terminal_writer()
    if capture is None:
        for line in lines:
            writer.line(line)
        writer.flush()
        return
    with capture.global_and_fixture_disabled():
        writer.line()
        for line in lines:
            writer.line(line)
        writer.flush()

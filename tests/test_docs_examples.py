"""Every example in the documentation runs: the programs in docs/examples/
(each started as its own process, then checked with a VNC client and, for the
API example, HTTP requests), the doctests of the pages in docs/pages/, and the
generators of the reference pages in docs/hooks.py."""

from __future__ import annotations

import doctest
import importlib.util
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from trivnc.config import Config, load_config_file
from trivnc.rfb.constants import SecurityType
from trivnc.testing.aclient import open_test_client

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PAGES = DOCS / "pages"
#: How long each example runs (its --seconds): enough to start and be checked.
RUN_SECONDS = 5
ADDRESS = re.compile(r"connect to (127\.0\.0\.1)::(\d+)")


class Example:
    """A running example program and what it printed so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""

    async def read_until(self, marker: str, timeout: float = 15) -> str:
        """Read output until a line containing `marker`; return that line."""
        assert self.process.stdout is not None
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if marker in line:
                        return line
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"no {marker!r} in the output: {self.lines}")
                self._buffer += chunk
                *complete, self._buffer = self._buffer.split(b"\n")
                self.lines += [line.decode() for line in complete]

    def address(self, line: str) -> tuple[str, int]:
        match = ADDRESS.search(line)
        assert match is not None, line
        return match.group(1), int(match.group(2))


@asynccontextmanager
async def run_example(name: str, *args: str) -> AsyncIterator[Example]:
    """Start docs/examples/`name` with --seconds RUN_SECONDS; on leaving, wait
    for it to stop by itself and check that it ended cleanly."""
    command = [sys.executable, str(EXAMPLES / name), "--seconds", str(RUN_SECONDS), *args]
    async with trio.open_nursery() as nursery:
        # run_process kills the program if the test fails or is cancelled.
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        example = Example(process)
        yield example
        await example.read_until("stopped", timeout=RUN_SECONDS + 10)
        with trio.fail_after(10):
            assert await process.wait() == 0


def _load(path: Path) -> ModuleType:
    """Import a file that is not in a package (an example, the docs hooks)."""
    name = f"trivnc_docs_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 5, interval: float = 0.05
) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(interval)


# -- the example programs -----------------------------------------------------------------


async def test_live_plot_serves_a_moving_plot_that_a_click_pauses() -> None:
    async with run_example("live_plot.py") as example:
        host, port = example.address(await example.read_until("connect to"))
        async with open_test_client(host, port) as client:
            assert client.size == (480, 270)
            assert client.name == "live plot"
            first = (await client.screenshot()).copy()
            # The yellow trace (R 255, G 196, B 0) is drawn: BGRX order.
            assert np.any(np.all(first[..., :3] == (0, 196, 255), axis=-1))

            async def moved() -> bool:
                shot = await client.screenshot()
                return not np.array_equal(shot[..., :3], first[..., :3])

            await wait_until(moved)
            # A click pauses it: two screenshots a while apart are the same.
            await client.click(10, 10)
            await trio.sleep(0.3)
            paused = (await client.screenshot()).copy()
            await trio.sleep(0.3)
            assert np.array_equal((await client.screenshot())[..., :3], paused[..., :3])


async def test_quart_blueprint_serves_its_routes_and_trivncs_api(tmp_path: Path) -> None:
    users = tmp_path / "users"
    async with run_example("quart_blueprint.py", "--users", str(users)) as example:
        host, port = example.address(await example.read_until("connect to"))
        created = await example.read_until("created")
        match = re.search(r"user (\S+) password (\S+)", created)
        assert match is not None, created
        owner = (match.group(1), match.group(2))
        url = (await example.read_until("web app is at")).rsplit(" ", 1)[1]
        assert url.startswith("http://127.0.0.1:")
        async with (
            httpx.AsyncClient(base_url=url) as http,
            # The users file adds VeNCrypt; the example still offers None.
            open_test_client(host, port, security_types=[SecurityType.NONE]) as client,
        ):
            page = await http.get("/")
            assert page.status_code == 200 and "My application" in page.text
            # The application's own route changes what viewers see.
            assert (await http.get("/paint", params={"colour": "ff8000"})).status_code == 200

            async def orange() -> bool:
                shot = await client.screenshot()
                return bool(np.all(shot[..., :3] == (0, 128, 255)))  # BGRX

            await wait_until(orange)
            assert (await http.get("/paint", params={"colour": "nope"})).status_code == 400
            # trivnc's API answers under /api, behind the owner's credentials.
            assert (await http.get("/api/get_users")).status_code == 401
            bad = await http.get("/api/get_users", auth=(owner[0], "wrong"))
            assert bad.status_code == 401
            listed = await http.get("/api/get_users", auth=owner)
            assert listed.status_code == 200
            assert listed.json() == [{"user": "owner", "read": True, "write": True, "owner": True}]
            shot = await http.get("/api/get_screenshot", auth=owner)
            assert shot.status_code == 200
            assert shot.headers["content-type"] == "image/jpeg"
            assert shot.content[:2] == b"\xff\xd8"
            document = (await http.get("/api/openapi.json", auth=owner)).json()
            assert "/api/get_screenshot" in document["paths"]
    assert users.is_file()


async def test_several_desktops_serve_three_sources() -> None:
    async with run_example("several_desktops.py") as example:
        await example.read_until("all serving")
        addresses = {
            line.split(":")[1].strip(): example.address(line)
            for line in example.lines
            if "connect to" in line
        }
        assert set(addresses) == {"gradient", "sketchpad", "demo"}
        assert len({port for _, port in addresses.values()}) == 3

        module = _load(EXAMPLES / "several_desktops.py")
        async with open_test_client(*addresses["gradient"]) as client:
            assert client.name == "gradient"
            shot = await client.screenshot()
            assert np.array_equal(shot[..., :3], module.gradient(400, 300)[..., :3])

        async with open_test_client(*addresses["sketchpad"]) as client:
            assert np.all((await client.screenshot())[..., :3] == 255)
            await client.pointer(50, 60, buttons=1)
            await client.pointer(50, 60, buttons=0)

            async def painted() -> bool:
                shot = await client.screenshot()
                return bool(np.all(shot[60, 50, :3] == (160, 20, 20)))  # BGRX

            await wait_until(painted)
            assert np.all((await client.screenshot())[200, 300, :3] == 255)

        async with open_test_client(*addresses["demo"]) as client:
            assert client.size == (400, 300)
            shot = await client.screenshot()
            assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 10


# -- the pages ----------------------------------------------------------------------------


def _fences(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def test_doctests_in_the_pages() -> None:
    """Every ```pycon block of docs/pages runs as a doctest (each page's
    blocks in order, sharing their names)."""
    ran = 0
    for page in sorted(PAGES.glob("*.md")):
        blocks = _fences(page.read_text(), "pycon")
        if not blocks:
            continue
        parser = doctest.DocTestParser()
        test = parser.get_doctest("\n".join(blocks), {}, page.name, str(page), 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        result = runner.summarize(verbose=False)
        assert result.failed == 0, f"{page.name}: {result.failed} doctest(s) failed"
        ran += result.attempted
    assert ran >= 5


def test_python_in_the_pages_is_an_example_file_that_runs() -> None:
    """Python code in the pages is included from docs/examples (never copied),
    and every example file is run by a test above."""
    included: set[str] = set()
    for page in PAGES.glob("*.md"):
        for block in _fences(page.read_text(), "python"):
            match = re.fullmatch(r'--8<-- "examples/([\w.]+)"\n', block)
            assert match is not None, f"{page.name}: inline Python code:\n{block}"
            included.add(match.group(1))
    files = {path.name for path in EXAMPLES.glob("*.py")}
    assert included == files
    tested = {"live_plot.py", "quart_blueprint.py", "several_desktops.py"}
    assert files == tested


# -- the generated reference pages --------------------------------------------------------


def _hooks() -> ModuleType:
    return _load(DOCS / "hooks.py")


def test_option_reference_matches_the_code(tmp_path: Path) -> None:
    hooks = _hooks()
    hooks.check_option_tables()  # raises if an option or a Config field is missing
    page: str = hooks.cli_page()
    for option in ("--rfb-port", "--web-port", "--insecure-no-auth", "--no-tls"):
        assert f"<code>{option}</code>" in page
    assert "`network.websocket_port`" in page
    # The example config file on the page is one trivnc accepts.
    (toml,) = _fences(page, "toml")
    path = tmp_path / "trivnc.toml"
    path.write_text(toml)
    values: dict[str, Any] = load_config_file(path)
    Config(**values).validate()


def test_api_reference_lists_every_route() -> None:
    from trivnc.api.blueprint import openapi_document

    document = openapi_document()
    page: str = _hooks().api_page(document)
    for path, methods in document["paths"].items():
        for method in methods:
            assert f"## {method.upper()} {path}\n" in page


@pytest.mark.parametrize("name", ["live_plot.py", "quart_blueprint.py", "several_desktops.py"])
def test_examples_explain_themselves(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "--seconds" in result.stdout and "--port" in result.stdout

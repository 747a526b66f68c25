# `trivnc --xvfb WxH [-- COMMAND ...]`: a private virtual X server, and
# optionally one program in it, that live exactly as long as the session.
#
# Xvfb picks a free display number itself and writes it to a pipe when it is
# ready (-displayfd), so there is no guessing or lock-file race. -noreset keeps
# the screen when its last client disconnects (Xvfb otherwise clears the root
# window).
#
# Size: Xvfb's RandR can shrink the screen but never grow it beyond the
# -screen size it started with. So Xvfb starts with a framebuffer of at least
# `max_size` (3840x2160 by default: 33 MB of memory, nothing else) and is then
# set to the requested size with RandR before the command starts. Viewers can
# later resize the desktop to anything up to that maximum.
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import trio

log = logging.getLogger("trivnc.x11")

#: Largest size viewers may later resize an Xvfb desktop to.
DEFAULT_MAX_SIZE = (3840, 2160)
#: How long a process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0


class XvfbError(RuntimeError):
    """Xvfb could not be started (or set to the requested size)."""


async def _stop_process(process: trio.Process, what: str) -> None:
    """Terminate `process` (this PID only) and reap it. Call shielded."""
    if process.returncode is not None:
        return
    process.terminate()
    with trio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    log.warning("%s (pid %d) ignored SIGTERM; killing it", what, process.pid)
    process.kill()
    await process.wait()


class XvfbDesktop:
    """Runs Xvfb at `width` x `height`, and `command` (if any) in it.

    As a trio task: `desktop = await nursery.start(XvfbDesktop(1280, 720).run)`
    returns once the display is ready (`desktop.display`); `run` returns when
    the command exits (or Xvfb dies), and stops both when cancelled.

    As an async context manager: `async with XvfbDesktop(...) as desktop:`;
    leaving the block stops both. `desktop.ended` is set when the command (or
    Xvfb) exits, which ends the session; `returncode` is the command's exit
    status.
    """

    def __init__(
        self,
        width: int,
        height: int,
        command: Sequence[str] | None = None,
        *,
        max_size: tuple[int, int] = DEFAULT_MAX_SIZE,
        depth: int = 24,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not (0 < width <= 32767 and 0 < height <= 32767):
            raise ValueError(f"Xvfb size {width}x{height} out of range")
        self.width, self.height = width, height
        self.command = list(command) if command else None
        self.screen_size = (max(width, max_size[0]), max(height, max_size[1]))
        self.depth = depth
        self.timeout = timeout
        self._env = dict(env) if env is not None else None
        #: ":N" once Xvfb is ready.
        self.display = ""
        self.xvfb: trio.Process | None = None
        self.process: trio.Process | None = None
        #: Set when the command or Xvfb has exited: the session is over.
        self.ended = trio.Event()
        #: Why it ended, for the log and the user.
        self.end_reason = ""

    @property
    def returncode(self) -> int | None:
        """The command's exit status (None while it runs, or without one)."""
        return self.process.returncode if self.process is not None else None

    def env(self) -> dict[str, str]:
        """The environment for programs on this desktop."""
        base = dict(os.environ) if self._env is None else dict(self._env)
        base["DISPLAY"] = self.display
        # GTK and Qt prefer Wayland when they see it: keep them on this desktop.
        base.pop("WAYLAND_DISPLAY", None)
        return base

    # -- the task -------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[XvfbDesktop] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._start()
            task_status.started(self)
            async with trio.open_nursery() as nursery:
                for process, what in self._processes():
                    nursery.start_soon(self._watch, process, what, nursery.cancel_scope)
        finally:
            await self._stop()

    def _processes(self) -> list[tuple[trio.Process, str]]:
        found = []
        if self.xvfb is not None:
            found.append((self.xvfb, f"Xvfb {self.display}"))
        if self.process is not None and self.command:
            found.append((self.process, self.command[0]))
        return found

    async def _start(self) -> None:
        await self._start_xvfb()
        await trio.to_thread.run_sync(self._resize_screen)
        if self.command:
            self.process = await trio.lowlevel.open_process(
                self.command, env=self.env(), stdin=subprocess.DEVNULL
            )
            log.info("%s: started %s (pid %d)", self.display, self.command[0], self.process.pid)

    async def _stop(self) -> None:
        with trio.CancelScope(shield=True):
            # The command first, so that it does not see the display vanish.
            if self.process is not None:
                await _stop_process(self.process, self.command[0] if self.command else "")
            if self.xvfb is not None:
                await _stop_process(self.xvfb, "Xvfb")
        if not self.ended.is_set():
            self.end_reason = self.end_reason or "stopped"
            self.ended.set()

    async def _watch(
        self, process: trio.Process, what: str, scope: trio.CancelScope | None = None
    ) -> None:
        code = await process.wait()
        if not self.ended.is_set():
            self.end_reason = f"{what} exited with status {code}"
            log.info("%s", self.end_reason)
            self.ended.set()
        if scope is not None:
            scope.cancel()

    async def _start_xvfb(self) -> None:
        binary = shutil.which("Xvfb")
        if binary is None:
            raise XvfbError("Xvfb is not installed (Debian package xvfb)")
        read_fd, write_fd = os.pipe()
        width, height = self.screen_size
        try:
            self.xvfb = await trio.lowlevel.open_process(
                [
                    binary,
                    "-displayfd",
                    str(write_fd),
                    "-screen",
                    "0",
                    f"{width}x{height}x{self.depth}",
                    "-noreset",
                    "-nolisten",
                    "tcp",
                ],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        # Xvfb writes "N\n" once it accepts connections; EOF means it died.
        async with trio.lowlevel.FdStream(read_fd) as pipe:
            data = b""
            with trio.move_on_after(self.timeout) as scope:
                while not data.endswith(b"\n"):
                    chunk = await pipe.receive_some(64)
                    if not chunk:
                        break
                    data += chunk
        if scope.cancelled_caught or not data.strip().isdigit():
            code = self.xvfb.returncode
            # Its messages went to /dev/null (a long-lived Xvfb must not block
            # on a pipe nobody reads): say how to see them.
            raise XvfbError(
                "Xvfb did not start"
                + (f" (exit status {code})" if code is not None else " in time")
                + f"; try `Xvfb :99 -screen 0 {width}x{height}x{self.depth}` by hand to see why"
            )
        self.display = f":{int(data)}"
        log.info("Xvfb on %s (pid %d)", self.display, self.xvfb.pid)

    def _resize_screen(self) -> None:
        # Worker thread, with a python-xlib connection of its own.
        if (self.width, self.height) == self.screen_size:
            return
        from Xlib import display as xdisplay
        from Xlib import error as xerror

        from .source import randr_resize

        try:
            d = xdisplay.Display(self.display)
        except (xerror.DisplayError, xerror.ConnectionClosedError, OSError) as exc:
            raise XvfbError(f"cannot connect to the new Xvfb {self.display}: {exc}") from exc
        try:
            errors: list[Any] = []
            d.set_error_handler(lambda error, request: errors.append(error))
            d.xrandr_query_version()
            if not randr_resize(d, self.width, self.height, errors):
                raise XvfbError(f"Xvfb could not be set to {self.width}x{self.height}")
        finally:
            d.close()

    # -- as an async context manager ----------------------------------------------------

    async def __aenter__(self) -> XvfbDesktop:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        # The watchers only await process exit and set `ended`; as system
        # tasks they need no nursery around the caller's block (which would
        # wrap the caller's own exceptions in ExceptionGroups), and they end
        # by themselves once __aexit__ has reaped the processes.
        for process, what in self._processes():
            trio.lowlevel.spawn_system_task(self._watch, process, what)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

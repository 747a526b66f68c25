"""Start a private Xvfb for tests: a free display number chosen by Xvfb itself
(-displayfd), -noreset so the screen survives its last client, and a clean stop
of exactly the process we started."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from types import TracebackType

import numpy as np
import numpy.typing as npt


class XvfbError(RuntimeError):
    pass


class Xvfb:
    """`with Xvfb(1280, 800) as x: ... x.display ...`"""

    def __init__(
        self, width: int = 1280, height: int = 800, depth: int = 24, *, timeout: float = 20.0
    ) -> None:
        self.width, self.height, self.depth = width, height, depth
        self.timeout = timeout
        self.display = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Xvfb:
        binary = shutil.which("Xvfb")
        if binary is None:
            raise XvfbError("Xvfb is not installed (Debian package xvfb)")
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [
                    binary,
                    "-displayfd",
                    str(write_fd),
                    "-screen",
                    "0",
                    f"{self.width}x{self.height}x{self.depth}",
                    "-noreset",
                    "-nolisten",
                    "tcp",
                ],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(write_fd)
        try:
            number = self._read_display(read_fd)
        finally:
            os.close(read_fd)
        self.display = f":{number}"
        return self

    def _read_display(self, fd: int) -> int:
        deadline = time.monotonic() + self.timeout
        data = b""
        os.set_blocking(fd, False)
        while not data.endswith(b"\n"):
            if time.monotonic() > deadline:
                self.stop()
                raise XvfbError("Xvfb did not report a display number in time")
            try:
                chunk = os.read(fd, 64)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            if not chunk:
                self.stop()
                raise XvfbError("Xvfb exited before reporting its display")
            data += chunk
        return int(data.strip())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "DISPLAY": self.display}

    def screenshot(self) -> npt.NDArray[np.uint8]:
        """The root window as BGRX (height, width, 4)."""
        from Xlib import X, display

        d = display.Display(self.display)
        try:
            root = d.screen().root
            geom = root.get_geometry()
            image = root.get_image(0, 0, geom.width, geom.height, X.ZPixmap, 0xFFFFFFFF)
            data = image.data if isinstance(image.data, bytes) else bytes(image.data, "latin-1")
            return np.frombuffer(data, np.uint8).reshape(geom.height, geom.width, 4).copy()
        finally:
            d.close()

    def __enter__(self) -> Xvfb:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

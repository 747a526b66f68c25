"""Side by side on one Xvfb: trivnc against x11vnc and TigerVNC's X0tigervnc.

One Xvfb (1920x1080x24) and one workload client (a separate process, started
once and kept running for the whole benchmark, so every server sees the same
drawing): a 200x200 box moving at 30 fps, a 640x360 "video" area repainted at
15 fps from precomputed frames, and a line of text changed once a second.

Each server in turn shares that display on a free loopback port without
authentication; 1 and then 10 framing viewers (RFB 3.8, security None, RGBX
32bpp, Tight + JPEG quality 6 + compression 2 + LastRect; the viewers frame the
stream and do not decode it, as in bench/viewers.py) ask for the next
incremental update as soon as the last one arrived. After a warm-up, a fixed
window measures delivered updates per second per viewer, bytes per second per
viewer, and the server's CPU (seconds per second, ms per delivered update) read
from /proc for the server's PID only. Xvfb's CPU over the same window is
reported too: a server that polls the screen makes the X server copy pixels.

The cycle of servers is repeated (interleaved) and each figure is the median
over repeats; the report is the RATIO of trivnc to each C server, since the
machines are shared and absolute times are noisy.

Run: python bench/xvfb_compare.py [--seconds 10] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from viewers import _Reader, cpu_seconds, skip_update, start_viewer

from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.rfb.pixelformat import RGBX, PixelFormat

WIDTH, HEIGHT = 1920, 1080
ENCODINGS = [
    Encoding.TIGHT,
    -32 + 6,  # JPEG quality level 6
    -256 + 2,  # compression level 2
    PseudoEncoding.LAST_RECT,
]
SERVERS = ("trivnc", "x11vnc", "tigervnc")
VIEWER_COUNTS = (1, 10)
WARMUP = 2.0


# --------------------------------------------------------------------------
# The workload: a python-xlib client in its own process.


def workload(display_name: str) -> None:
    import numpy as np
    from Xlib import X, display

    d = display.Display(display_name)
    screen = d.screen()
    root = screen.root
    cmap = screen.default_colormap

    def colour(r: int, g: int, b: int) -> int:
        return int(cmap.alloc_color(r * 257, g * 257, b * 257).pixel)

    bg = root.create_gc(foreground=colour(40, 60, 90))
    box_colours = [
        root.create_gc(foreground=colour(*c))
        for c in ((230, 80, 60), (80, 200, 90), (240, 200, 50), (90, 140, 240))
    ]
    try:
        font = d.open_font("fixed")
        text_gc = root.create_gc(
            foreground=colour(255, 255, 255), background=colour(0, 0, 0), font=font
        )
    except Exception:  # no core fonts: draw the text as boxes instead
        text_gc = None
    root.fill_rectangle(bg, 0, 0, WIDTH, HEIGHT)

    # Precomputed "video": a moving colour gradient with mild noise, BGRX.
    vw, vh, vx, vy = 640, 360, 1180, 80
    yy, xx = np.mgrid[0:vh, 0:vw].astype(np.float32)
    rng = np.random.default_rng(1)
    frames = []
    for i in range(30):
        t = i / 30 * 2 * np.pi
        r = 128 + 100 * np.sin(xx / 70 + t)
        g = 128 + 100 * np.sin(yy / 45 - 2 * t)
        b = 128 + 100 * np.sin((xx + yy) / 90 + 3 * t)
        noise = rng.integers(-20, 21, (vh, vw), dtype=np.int16)
        img = np.zeros((vh, vw, 4), np.uint8)
        img[..., 0] = np.clip(b + noise, 0, 255)
        img[..., 1] = np.clip(g + noise, 0, 255)
        img[..., 2] = np.clip(r + noise, 0, 255)
        frames.append(img)
    # Strips small enough for a core PutImage request (no BIG-REQUESTS here).
    strip = 90
    strips = [[(y, f[y : y + strip].tobytes()) for y in range(0, vh, strip)] for f in frames]

    box, bx, by, dx, dy = 200, 100, 500, 9, 5
    tick, period = 0, 1 / 30
    next_t = window_start = time.monotonic()
    while True:
        # (a) the box at 30 fps
        root.fill_rectangle(bg, bx, by, box, box)
        bx += dx
        by += dy
        if not 0 <= bx <= WIDTH - box - 700 - 0:
            dx = -dx
            bx += 2 * dx
        if not 480 <= by <= HEIGHT - box:
            dy = -dy
            by += 2 * dy
        root.fill_rectangle(box_colours[(tick // 30) % 4], bx, by, box, box)
        # (b) the video at 15 fps
        if tick % 2 == 0:
            for y, data in strips[(tick // 2) % len(strips)]:
                root.put_image(bg, vx, vy + y, vw, min(strip, vh - y), X.ZPixmap, 24, 0, data)
        # (c) a line of text once a second
        if tick % 30 == 0:
            line = f"trivnc benchmark workload  t={tick // 30:6d}  {time.strftime('%H:%M:%S')}"
            if text_gc is not None:
                root.image_text(text_gc, 60, 100, line.encode())
            else:
                root.fill_rectangle(box_colours[(tick // 30) % 4], 60, 90, 8 * len(line), 12)
        d.sync()
        tick += 1
        if tick % 300 == 0:  # the workload must keep its rate, or the runs differ
            now = time.monotonic()
            if now - window_start > 300 * period * 1.1:
                rate = 300 / (now - window_start)
                print(f"workload: behind, {rate:.1f} ticks/s (want 30)", file=sys.stderr)
            window_start = now
        next_t += period
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()


# --------------------------------------------------------------------------
# Servers.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """True once something listens on `port` (read from /proc, so waiting does
    not open a connection the server would count as a client)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def server_command(name: str, display: str, port: int) -> list[str]:
    if name == "trivnc":
        return [
            sys.executable,
            "-m",
            "trivnc.cli",
            "--display",
            display,
            "--insecure-no-auth",
            "--listen",
            "127.0.0.1",
            "--rfb-port",
            str(port),
            "--web-port",
            "off",
        ]
    if name == "x11vnc":
        # Defaults (XDamage hints, polling), without the client-side cache.
        return [
            "x11vnc",
            "-display",
            display,
            "-rfbport",
            str(port),
            "-localhost",
            "-noipv6",
            "-nopw",
            "-forever",
            "-shared",
            "-ncache",
            "0",
        ]
    if name == "tigervnc":
        return [
            "X0tigervnc",
            "-display",
            display,
            "-rfbport",
            str(port),
            "-interface",
            "127.0.0.1",
            "-localhost",
            "-SecurityTypes",
            "None",
            "-AlwaysShared",
            # Ten viewers connecting at once from one host trip TigerVNC's
            # blacklist (5 connections mid-handshake); loopback only here.
            "-UseBlacklist=0",
        ]
    raise ValueError(name)


@contextlib.contextmanager
def running_server(name: str, display: str, home: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    log = open(home / f"{name}-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        server_command(name, display, port),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(home), "DISPLAY": display},
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}); see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on {port}; see {log.name}")
            time.sleep(0.05)
        yield proc.pid, port
    except BaseException:
        log.flush()
        tail = Path(log.name).read_bytes()[-2000:].decode(errors="replace")
        print(f"--- {name} log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# --------------------------------------------------------------------------
# Viewers.


class _CountingReader(_Reader):
    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.received = 0

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError
            self.received += len(chunk)
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class ViewerStats:
    def __init__(self) -> None:
        self.updates = 0  # updates carrying pixels
        self.other: dict[str, int] = {}
        self.reader: _CountingReader | None = None

    @property
    def received(self) -> int:
        return self.reader.received if self.reader else 0


async def viewer(
    port: int,
    stats: ViewerStats,
    encodings: list[int] = ENCODINGS,
    pixel_format: PixelFormat = RGBX,
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    r = stats.reader = _CountingReader(stream)
    async with stream:
        request = await start_viewer(stream, r, encodings, pixel_format)
        while True:
            msg = (await r.read(1))[0]
            if msg == 0:
                pixels, size = await skip_update(r)
                if size is not None:
                    request = b"\x03\x01" + struct.pack(">HHHH", 0, 0, *size)
                if pixels:
                    stats.updates += 1
                else:
                    stats.other["empty update"] = stats.other.get("empty update", 0) + 1
                await stream.send_all(request)
            elif msg == 1:  # SetColourMapEntries
                _pad, _first, n = struct.unpack(">BHH", await r.read(5))
                await r.read(6 * n)
            elif msg == 2:  # Bell
                pass
            elif msg == 3:  # ServerCutText
                (n,) = struct.unpack(">3xI", await r.read(7))
                await r.read(n)
            elif msg == 150:  # EndOfContinuousUpdates
                pass
            elif msg == 248:  # fence
                head = await r.read(8)
                await r.read(head[-1])
            else:
                raise RuntimeError(f"unexpected message {msg}")
            if msg != 0:
                stats.other[str(msg)] = stats.other.get(str(msg), 0) + 1


async def measure(
    port: int, n: int, seconds: float, server_pid: int, xvfb_pid: int, workload_pid: int
) -> dict[str, object]:
    stats = [ViewerStats() for _ in range(n)]
    async with trio.open_nursery() as nursery:
        for s in stats:
            nursery.start_soon(viewer, port, s)
        await trio.sleep(WARMUP)
        u0 = [s.updates for s in stats]
        b0 = [s.received for s in stats]
        pids = (server_pid, xvfb_pid, workload_pid, os.getpid())
        c0, t0 = [cpu_seconds(p) for p in pids], time.perf_counter()
        await trio.sleep(seconds)
        c1, t1 = [cpu_seconds(p) for p in pids], time.perf_counter()
        u1 = [s.updates for s in stats]
        b1 = [s.received for s in stats]
        nursery.cancel_scope.cancel()
    wall = t1 - t0
    per_viewer = [(e - s) / wall for s, e in zip(u0, u1, strict=True)]
    updates = sum(e - s for s, e in zip(u0, u1, strict=True))
    received = sum(e - s for s, e in zip(b0, b1, strict=True))
    cpu = [(e - s) / wall for s, e in zip(c0, c1, strict=True)]
    other: dict[str, int] = {}
    for s in stats:
        for k, v in s.other.items():
            other[k] = other.get(k, 0) + v
    return {
        "viewers": n,
        "fps_per_viewer": updates / n / wall,
        "fps_min_viewer": min(per_viewer),
        "bytes_per_second_per_viewer": received / n / wall,
        "server_cpu_per_second": cpu[0],
        "server_cpu_ms_per_update": 1000 * cpu[0] * wall / max(updates, 1),
        "xvfb_cpu_per_second": cpu[1],
        "workload_cpu_per_second": cpu[2],
        "viewers_cpu_per_second": cpu[3],
        "other_messages": other,
    }


# --------------------------------------------------------------------------
# The run.

METRICS = (
    "fps_per_viewer",
    "fps_min_viewer",
    "bytes_per_second_per_viewer",
    "server_cpu_per_second",
    "server_cpu_ms_per_update",
    "xvfb_cpu_per_second",
    "workload_cpu_per_second",
    "viewers_cpu_per_second",
)


def median_table(runs: list[dict[str, object]]) -> dict[str, dict[int, dict[str, float]]]:
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name in SERVERS:
        out[name] = {}
        for n in VIEWER_COUNTS:
            rows = [r for r in runs if r["server"] == name and r["viewers"] == n]
            if rows:
                out[name][n] = {
                    m: statistics.median(float(r[m]) for r in rows)  # type: ignore[arg-type]
                    for m in METRICS
                }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="measured window per run")
    parser.add_argument("--repeats", type=int, default=2, help="cycles over the servers")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workload", metavar="DISPLAY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        workload(args.workload)
        return
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r}")
    binaries = {"x11vnc": "x11vnc", "tigervnc": "X0tigervnc"}
    for binary in ["Xvfb", *(binaries[s] for s in servers if s in binaries)]:
        if shutil.which(binary) is None:
            sys.exit(f"{binary} is not installed")

    from trivnc.testing.xvfb import Xvfb

    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="trivnc-bench-") as tmp, Xvfb(WIDTH, HEIGHT) as xvfb:
        assert xvfb.process is not None
        home = Path(tmp)
        load = subprocess.Popen(
            [sys.executable, __file__, "--workload", xvfb.display], stdin=subprocess.DEVNULL
        )
        try:
            time.sleep(3)  # precompute frames, start drawing
            if load.poll() is not None:
                sys.exit("the workload client exited")
            for rep in range(args.repeats):
                for name in servers:
                    with running_server(name, xvfb.display, home) as (pid, port):
                        time.sleep(1)
                        for n in VIEWER_COUNTS:
                            r = trio.run(
                                measure, port, n, args.seconds, pid, xvfb.process.pid, load.pid
                            )
                            r = {"server": name, "repeat": rep, **r}
                            runs.append(r)
                            print(
                                f"  {name:9} rep {rep} {n:2d} viewers: "
                                f"{r['fps_per_viewer']:6.1f} fps/viewer, "
                                f"{r['server_cpu_per_second']:.2f} CPU s/s, "
                                f"{r['server_cpu_ms_per_update']:.2f} ms/update, "
                                f"{r['bytes_per_second_per_viewer'] / 1e6:.2f} MB/s/viewer",  # type: ignore[operator]
                                flush=True,
                            )
                            if r["fps_per_viewer"] == 0 or r["bytes_per_second_per_viewer"] == 0:
                                print(f"  WARNING: {name} delivered nothing", flush=True)
                        if load.poll() is not None:
                            sys.exit("the workload client exited")
        finally:
            if load.poll() is None:
                load.terminate()
                load.wait(5)
    table = median_table(runs)
    print()
    print(
        f"Xvfb {WIDTH}x{HEIGHT}x24, box 30 fps + 640x360 video 15 fps + text 1/s; "
        f"Tight JPEG q6; {args.seconds:g} s window; median of {args.repeats}"
    )
    header = (
        f"{'server':9} {'viewers':>7} {'fps/viewer':>10} {'min fps':>8} {'MB/s/viewer':>11} "
        f"{'CPU s/s':>8} {'CPU ms/upd':>10} {'Xvfb s/s':>8}"
    )
    print(header)
    for name in servers:
        for n, m in table[name].items():
            print(
                f"{name:9} {n:>7} {m['fps_per_viewer']:>10.1f} {m['fps_min_viewer']:>8.1f} "
                f"{m['bytes_per_second_per_viewer'] / 1e6:>11.2f} "
                f"{m['server_cpu_per_second']:>8.3f} {m['server_cpu_ms_per_update']:>10.2f} "
                f"{m['xvfb_cpu_per_second']:>8.3f}"
            )
    ratios: dict[str, dict[int, dict[str, float]]] = {}
    if "trivnc" in servers:
        print()
        print("trivnc / other (CPU ms per update: < 1 means trivnc is cheaper; fps: > 1 faster)")
        for other in servers:
            if other == "trivnc":
                continue
            ratios[other] = {}
            for n in VIEWER_COUNTS:
                a, b = table["trivnc"].get(n), table[other].get(n)
                if not a or not b:
                    continue
                ratios[other][n] = {
                    "cpu_ms_per_update": a["server_cpu_ms_per_update"]
                    / max(b["server_cpu_ms_per_update"], 1e-9),
                    "cpu_per_second": a["server_cpu_per_second"]
                    / max(b["server_cpu_per_second"], 1e-9),
                    "fps": a["fps_per_viewer"] / max(b["fps_per_viewer"], 1e-9),
                    "bytes_per_second": a["bytes_per_second_per_viewer"]
                    / max(b["bytes_per_second_per_viewer"], 1e-9),
                }
                q = ratios[other][n]
                print(
                    f"  vs {other:9} {n:2d} viewers: CPU/update x{q['cpu_ms_per_update']:.2f}, "
                    f"CPU/s x{q['cpu_per_second']:.2f}, fps x{q['fps']:.2f}, "
                    f"bytes/s x{q['bytes_per_second']:.2f}"
                )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "cores": os.cpu_count(),
                    "seconds": args.seconds,
                    "repeats": args.repeats,
                    "runs": runs,
                    "median": {k: {str(n): m for n, m in v.items()} for k, v in table.items()},
                    "ratios_trivnc_over": {
                        k: {str(n): q for n, q in v.items()} for k, v in ratios.items()
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

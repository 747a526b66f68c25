"""Load and slow-client benchmark: one trivnc server on the animated demo desktop.

(a) load: N viewers at once (half RFB over TCP, half RFB over WebSocket on the
    web port with --no-tls, HTTP Basic from a users file in a temporary HOME),
    for a bounded time: frames per viewer (min/median/max), the server's CPU
    s/s (from /proc/PID/stat) and RSS at the start and the end.
(b) slow clients: 5 viewers alone, then the same 5 with four bad clients
    present (one that never reads, one that reads one byte a second, one
    that disconnects in the middle of an update in a loop, and one that holds
    1000 connections that never finish the handshake, reopening those the
    server closes): the 5 viewers' frame rate with / without (target: within
    10 %), and the server's RSS.

The viewers are bench/viewers.py's (they frame Tight updates without decoding
them). Run: python bench/load.py [--seconds 20] [--geometry 1280x720] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

import trio
from trio_websocket import open_websocket_url
from viewers import _Reader, cpu_seconds, skip_update, start_viewer

from trivnc.server.users import UserStore
from trivnc.testing.websocket import WebSocketByteStream

USER, PASSWORD = "bench", "bench-password"
SLOW_VIEWERS = 5


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


class Server:
    """`python -m trivnc.cli` on the demo desktop, RFB without authentication
    and the web port without TLS, both on loopback, in a temporary HOME."""

    def __init__(self, geometry: str, extra: list[str]) -> None:
        self.home = tempfile.TemporaryDirectory(prefix="trivnc-load-")
        users = Path(self.home.name) / "users"
        UserStore(users).create(USER, PASSWORD, read=True, write=False, owner=False)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trivnc.cli",
                "--geometry",
                geometry,
                "--insecure-no-auth",
                "--no-tls",
                "--users",
                str(users),
                "--rfb-port",
                "0",
                "--web-port",
                "0",
                *extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={"HOME": self.home.name, "PATH": "/usr/bin:/bin"},
        )
        assert self.proc.stdout is not None
        self.rfb_port = self.web_port = 0
        for line in self.proc.stdout:
            if m := re.search(r"http://[^:]+:(\d+)/", line):
                self.web_port = int(m.group(1))
            if m := re.search(r"::(\d+)", line):
                self.rfb_port = int(m.group(1))
            if "press Ctrl+C" in line:
                break
        if not (self.rfb_port and self.web_port):
            self.stop()
            raise RuntimeError("trivnc did not report its ports")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.home.cleanup()


async def _frames(stream: trio.abc.Stream, counts: list[int], index: int) -> None:
    """bench/viewers.py's viewer loop on any stream: ask for the next update as
    soon as the last one is read, count those that carry pixels."""
    r = _Reader(cast(trio.SocketStream, stream))
    request = await start_viewer(cast(trio.SocketStream, stream), r)
    while True:
        msg = (await r.read(1))[0]
        if msg == 248:  # fence
            head = await r.read(8)
            await r.read(head[-1])
            continue
        if msg == 2:  # bell
            continue
        if msg == 3:  # server cut text
            (n,) = struct.unpack(">3xI", await r.read(7))
            await r.read(n)
            continue
        if msg != 0:
            raise RuntimeError(f"unexpected message {msg}")
        pixels, _size = await skip_update(r)
        if pixels:
            counts[index] += 1
        await stream.send_all(request)


async def tcp_viewer(server: Server, counts: list[int], index: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.rfb_port)
    async with stream:
        await _frames(stream, counts, index)


async def ws_viewer(server: Server, counts: list[int], index: int) -> None:
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    async with open_websocket_url(
        f"ws://127.0.0.1:{server.web_port}/websockify",
        subprotocols=["binary"],
        extra_headers=[(b"Authorization", auth.encode())],
        message_queue_size=4,
        max_message_size=1 << 24,
    ) as ws:
        await _frames(WebSocketByteStream(ws), counts, index)


async def measure(
    server: Server, counts: list[int], warmup: float, seconds: float
) -> dict[str, Any]:
    """Frames per viewer, server CPU and RSS over a window after `warmup`."""
    await trio.sleep(warmup)
    start = list(counts)
    cpu0, t0, rss0 = cpu_seconds(server.pid), time.perf_counter(), rss_bytes(server.pid)
    await trio.sleep(seconds)
    cpu1, t1, rss1 = cpu_seconds(server.pid), time.perf_counter(), rss_bytes(server.pid)
    frames = [e - s for s, e in zip(start, counts, strict=True)]
    wall = t1 - t0
    return {
        "viewers": len(frames),
        "seconds": wall,
        "frames_min": min(frames),
        "frames_median": statistics.median(frames),
        "frames_max": max(frames),
        "viewers_without_frames": sum(1 for f in frames if f == 0),
        "fps_per_viewer": sum(frames) / len(frames) / wall,
        "server_cpu_per_second": (cpu1 - cpu0) / wall,
        "server_rss_window_start_mb": rss0 / 2**20,
        "server_rss_window_end_mb": rss1 / 2**20,
    }


async def run_load(server: Server, viewers: int, seconds: float) -> dict[str, Any]:
    rss_idle = rss_bytes(server.pid)
    counts = [0] * viewers
    async with trio.open_nursery() as nursery:
        for i in range(viewers):
            nursery.start_soon(tcp_viewer if i % 2 == 0 else ws_viewer, server, counts, i)
        result = await measure(server, counts, 5, seconds)
        nursery.cancel_scope.cancel()
    result["tcp_viewers"] = (viewers + 1) // 2
    result["websocket_viewers"] = viewers // 2
    result["server_rss_idle_mb"] = rss_idle / 2**20
    return result


# -- the bad clients ------------------------------------------------------------------


async def _handshake(server: Server, stats: dict[str, int]) -> tuple[trio.SocketStream, bytes]:
    """A connected viewer (retrying while the server refuses: full)."""
    while True:
        stream = await trio.open_tcp_stream("127.0.0.1", server.rfb_port)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            request = await start_viewer(stream, _Reader(stream))
        except (RuntimeError, EOFError, trio.BrokenResourceError):
            stats["bad_clients_refused"] += 1
            await trio.aclose_forcefully(stream)
            await trio.sleep(0.5)
            continue
        return stream, request


async def never_reads(server: Server, stats: dict[str, int]) -> None:
    """Asks for whole frames and reads nothing; reconnects when dropped."""
    full = b"\x03\x00" + struct.pack(">HHHH", 0, 0, 65535, 65535)
    while True:
        stream, _ = await _handshake(server, stats)
        try:
            while True:
                await stream.send_all(full)
                await trio.sleep(0.1)
        except trio.BrokenResourceError:
            stats["never_reading_dropped"] += 1
        finally:
            await trio.aclose_forcefully(stream)


async def one_byte_a_second(server: Server, stats: dict[str, int]) -> None:
    while True:
        stream, request = await _handshake(server, stats)
        try:
            await stream.send_all(request)
            while True:
                if not await stream.receive_some(1):
                    break
                await trio.sleep(1)
            stats["slow_reader_dropped"] += 1
        except trio.BrokenResourceError:
            stats["slow_reader_dropped"] += 1
        finally:
            await trio.aclose_forcefully(stream)


async def vanishes_mid_update(server: Server, stats: dict[str, int]) -> None:
    """Asks for a whole frame, reads a part of it, resets the connection; again."""
    full = b"\x03\x00" + struct.pack(">HHHH", 0, 0, 65535, 65535)
    while True:
        stream, _ = await _handshake(server, stats)
        try:
            await stream.send_all(full)
            got = 0
            while got < 20000:
                chunk = await stream.receive_some(20000 - got)
                if not chunk:
                    break
                got += len(chunk)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (trio.BrokenResourceError, RuntimeError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
        stats["vanished"] += 1
        await trio.sleep(0.1)


async def half_open(server: Server, count: int, stats: dict[str, int]) -> None:
    """`count` connections that never send a byte; one the server closes is
    opened again a second later."""

    async def hold() -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", server.rfb_port)
            except OSError:
                stats["half_open_connect_errors"] += 1
                await trio.sleep(1)
                continue
            stats["half_open_opened"] += 1
            try:
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass
            finally:
                await trio.aclose_forcefully(stream)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(hold)


async def bad_clients(server: Server, half_open_count: int, stats_path: Path) -> None:
    """The four bad clients, until cancelled; their counters go to `stats_path`
    every second."""
    stats = dict.fromkeys(
        [
            "never_reading_dropped",
            "slow_reader_dropped",
            "vanished",
            "half_open_opened",
            "half_open_connect_errors",
            "bad_clients_refused",
        ],
        0,
    )
    async with trio.open_nursery() as bad:
        bad.start_soon(never_reads, server, stats)
        bad.start_soon(one_byte_a_second, server, stats)
        bad.start_soon(vanishes_mid_update, server, stats)
        bad.start_soon(half_open, server, half_open_count, stats)
        while True:
            await trio.sleep(1)
            await trio.Path(stats_path).write_text(json.dumps(stats))


async def run_slow(server: Server, seconds: float, half_open_count: int) -> dict[str, Any]:
    """The bad clients run in a process of their own, so that their event loop
    does not slow down the measuring viewers."""
    counts = [0] * SLOW_VIEWERS
    stats_path = Path(server.home.name) / "bad-clients.json"
    async with trio.open_nursery() as nursery:
        for i in range(SLOW_VIEWERS):
            nursery.start_soon(tcp_viewer, server, counts, i)
        alone = await measure(server, counts, 3, seconds)
        bad = await trio.lowlevel.open_process(
            [
                sys.executable,
                __file__,
                "--bad-clients",
                f"{server.rfb_port},{half_open_count},{stats_path}",
            ]
        )
        try:
            with_bad = await measure(server, counts, 3, seconds)
        finally:
            bad.terminate()
            with trio.move_on_after(10):
                await bad.wait()
        nursery.cancel_scope.cancel()
    ratio = with_bad["fps_per_viewer"] / max(alone["fps_per_viewer"], 1e-9)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return {"alone": alone, "with_bad_clients": with_bad, "fps_ratio": ratio, "bad_clients": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--geometry", default="1280x720")
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--only", choices=["load", "slow"])
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra trivnc option for both runs (repeat), e.g. --server-arg=--max-connections=200",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--bad-clients", help=argparse.SUPPRESS)  # PORT,COUNT,STATS_FILE
    args = parser.parse_args()
    raise_fd_limit(2 * (args.viewers + args.half_open) + 512)
    if args.bad_clients:
        port, count, stats_file = args.bad_clients.split(",", 2)
        target = Server.__new__(Server)
        target.rfb_port = int(port)
        with suppress(KeyboardInterrupt):
            trio.run(bad_clients, target, int(count), Path(stats_file))
        return
    out: dict[str, Any] = {"geometry": args.geometry, "seconds": args.seconds}
    if args.only != "slow":
        server = Server(args.geometry, args.server_arg)
        try:
            out["load"] = load = trio.run(run_load, server, args.viewers, args.seconds)
        finally:
            server.stop()
        print(
            f"load: {load['viewers']} viewers ({load['tcp_viewers']} TCP, "
            f"{load['websocket_viewers']} WebSocket), demo desktop {args.geometry}, "
            f"{load['seconds']:.0f} s"
        )
        print(
            f"  frames per viewer: min {load['frames_min']}, median {load['frames_median']:g}, "
            f"max {load['frames_max']} ({load['fps_per_viewer']:.2f} fps/viewer on average); "
            f"viewers without frames: {load['viewers_without_frames']}"
        )
        print(
            f"  server CPU {load['server_cpu_per_second']:.2f} s/s; RSS idle "
            f"{load['server_rss_idle_mb']:.0f} MB, window start "
            f"{load['server_rss_window_start_mb']:.0f} MB, end "
            f"{load['server_rss_window_end_mb']:.0f} MB"
        )
    if args.only != "load":
        server = Server(args.geometry, args.server_arg)
        try:
            out["slow_clients"] = slow = trio.run(run_slow, server, args.seconds, args.half_open)
        finally:
            server.stop()
        alone, bad = slow["alone"], slow["with_bad_clients"]
        print(f"slow clients: {SLOW_VIEWERS} viewers, {args.seconds:.0f} s each way")
        for name, r in (("alone", alone), ("with bad clients", bad)):
            print(
                f"  {name:>16}: {r['fps_per_viewer']:.2f} fps/viewer (min {r['frames_min']}, "
                f"max {r['frames_max']} frames), server CPU {r['server_cpu_per_second']:.2f} "
                f"s/s, RSS {r['server_rss_window_end_mb']:.0f} MB"
            )
        print(f"  fps ratio with / without: {slow['fps_ratio']:.3f} (target >= 0.9)")
        print(f"  bad clients: {slow['bad_clients']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

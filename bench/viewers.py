"""Viewers benchmark: one and ten viewers on the demo desktop.

Starts `trivnc` in a subprocess on the animated demo desktop, connects N
viewers from this process (each asking for the next update as soon as it has
the last one, Tight with JPEG quality 6, as TigerVNC's viewer does by default;
they frame the stream without decoding pixels, so their CPU stays small), and
reports delivered frames per second per viewer and the server's CPU seconds
per delivered frame, read from /proc for the server's PID only.
Run: python bench/viewers.py [--seconds 10] [--geometry 1920x1080]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import trio

from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.rfb.pixelformat import RGBX, PixelFormat

ENCODINGS = [
    Encoding.TIGHT,
    -32 + 6,  # JPEG quality level 6
    -256 + 2,  # compression level 2
    PseudoEncoding.LAST_RECT,
    PseudoEncoding.EXTENDED_DESKTOP_SIZE,
]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def start_server(geometry: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trivnc.cli",
            "--geometry",
            geometry,
            "--insecure-no-auth",
            "--rfb-port",
            "0",
            "--web-port",
            "off",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"::(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError("trivnc did not report its port")


class _Reader:
    """Exact reads from a trio stream (the benchmark's viewers only frame the
    stream; they do not decode pixels, so the viewers' CPU stays out of it)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def compact_length(self) -> int:
        value = 0
        for i in range(3):
            b = (await self.read(1))[0]
            value |= (b & (0x7F if i < 2 else 0xFF)) << (7 * i)
            if i < 2 and not b & 0x80:
                break
        return value


async def _skip_tight(r: _Reader, w: int, h: int) -> None:
    """Skip one Tight rect (RGB888 client: 3-byte TPIXELs)."""
    ctl = (await r.read(1))[0] >> 4
    if ctl == 0x8:
        await r.read(3)
        return
    if ctl in (0x9, 0xA, 0xB, 0xC):
        await r.read(await r.compact_length())
        return
    bits_per_pixel = 24
    if ctl & 0x4:  # explicit filter
        flt = (await r.read(1))[0]
        if flt == 1:
            colours = (await r.read(1))[0] + 1
            await r.read(3 * colours)
            bits_per_pixel = 1 if colours == 2 else 8
    row = (w * bits_per_pixel + 7) // 8
    size = row * h
    if size < 12:
        await r.read(size)
    else:
        await r.read(await r.compact_length())


async def start_viewer(
    stream: trio.SocketStream,
    r: _Reader,
    encodings: list[int] = ENCODINGS,
    pixel_format: PixelFormat = RGBX,
) -> bytes:
    """RFB 3.8 with security None, RGBX pixels (so Tight uses 3-byte TPIXELs,
    as for TigerVNC and noVNC; another 32bpp depth-24 format works too),
    `encodings`, and a first full-screen request; returns the incremental
    request to send after each update."""
    version = await r.read(12)
    if not version.startswith(b"RFB 003.00"):
        raise RuntimeError(f"not an RFB server: {version!r}")
    await stream.send_all(b"RFB 003.008\n")
    types = await r.read((await r.read(1))[0])
    if not types:
        (n,) = struct.unpack(">I", await r.read(4))
        raise RuntimeError(f"connection refused: {(await r.read(n)).decode(errors='replace')}")
    if 1 not in types:
        raise RuntimeError(f"security None not offered: {list(types)}")
    await stream.send_all(b"\x01")
    if await r.read(4) != b"\0\0\0\0":
        raise RuntimeError("security result: failed")
    await stream.send_all(b"\x01")  # shared
    width, height = struct.unpack(">HH", await r.read(4))
    await r.read(16)
    (name_len,) = struct.unpack(">I", await r.read(4))
    await r.read(name_len)
    await stream.send_all(b"\x00\x00\x00\x00" + pixel_format.pack())
    await stream.send_all(
        b"\x02\x00" + struct.pack(f">H{len(encodings)}i", len(encodings), *encodings)
    )
    await stream.send_all(b"\x03\x00" + struct.pack(">HHHH", 0, 0, width, height))
    return b"\x03\x01" + struct.pack(">HHHH", 0, 0, width, height)


async def skip_update(r: _Reader) -> tuple[bool, tuple[int, int] | None]:
    """Read one FramebufferUpdate (its type byte already read) without
    decoding it: whether it carried pixels, and the new desktop size if it
    announced one."""
    (nrects,) = struct.unpack(">xH", await r.read(3))
    pixels = False
    size = None
    while nrects:
        _x, _y, w, h, enc = struct.unpack(">HHHHi", await r.read(12))
        nrects -= 1
        if enc == Encoding.TIGHT:
            await _skip_tight(r, w, h)
            pixels = True
        elif enc == Encoding.RAW:
            await r.read(4 * w * h)
            pixels = True
        elif enc == PseudoEncoding.EXTENDED_DESKTOP_SIZE:
            n = (await r.read(4))[0]
            await r.read(16 * n)
            size = (w, h)
        elif enc == PseudoEncoding.DESKTOP_SIZE:
            size = (w, h)
        elif enc == PseudoEncoding.LAST_RECT:
            break
        else:
            raise RuntimeError(f"unexpected encoding {enc}")
    return pixels, size


async def viewer(port: int, seconds: float, counts: list[int], index: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    r = _Reader(stream)
    request = await start_viewer(stream, r)
    deadline = trio.current_time() + seconds
    async with stream:
        while trio.current_time() < deadline:
            msg = (await r.read(1))[0]
            if msg == 248:  # fence
                head = await r.read(8)
                await r.read(head[-1])
                continue
            if msg != 0:
                raise RuntimeError(f"unexpected message {msg}")
            pixels, _size = await skip_update(r)
            if pixels:
                counts[index] += 1
            await stream.send_all(request)


async def run_viewers(port: int, n: int, seconds: float, pid: int) -> dict[str, float]:
    counts = [0] * n
    # Warm up (first full frames), then measure a window.
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(viewer, port, seconds + 2, counts, i)
        await trio.sleep(2)
        start_counts = list(counts)
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await trio.sleep(seconds)
        cpu1, t1 = cpu_seconds(pid), time.perf_counter()
        end_counts = list(counts)
    frames = sum(e - s for s, e in zip(start_counts, end_counts, strict=True))
    wall = t1 - t0
    return {
        "viewers": n,
        "fps_per_viewer": frames / n / wall,
        "server_cpu_per_second": (cpu1 - cpu0) / wall,
        "server_cpu_ms_per_frame": 1000 * (cpu1 - cpu0) / max(frames, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--geometry", default="1920x1080")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    proc, port = start_server(args.geometry)
    try:
        results = [trio.run(run_viewers, port, n, args.seconds, proc.pid) for n in (1, 10)]
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"demo desktop {args.geometry}, {args.seconds:.0f} s per run, Tight JPEG q6")
    print(f"{'viewers':>8} {'fps/viewer':>11} {'server CPU s/s':>15} {'CPU ms/frame':>13}")
    for r in results:
        print(
            f"{r['viewers']:>8.0f} {r['fps_per_viewer']:>11.1f} "
            f"{r['server_cpu_per_second']:>15.3f} {r['server_cpu_ms_per_frame']:>13.2f}"
        )
    ratio = results[1]["server_cpu_per_second"] / max(results[0]["server_cpu_per_second"], 1e-9)
    print(f"CPU ratio, ten viewers / one viewer: {ratio:.2f} (target < 1.5)")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "cpu_ratio_10_vs_1": ratio}, indent=2))


if __name__ == "__main__":
    main()

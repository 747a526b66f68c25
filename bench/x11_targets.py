"""Issue 6's figures in one run: trivnc beside X0tigervnc and x11vnc.

The same Xvfb workloads as bench/x11_workloads.py (whose driver, viewer,
servers and per-run measurement this reuses), at 1920x1080 and 60 frames per
second, each server in turn, interleaved per repeat, figures the median over
repeats:

  workloads    video, fullscreen, scroll, idle with one viewer (Tight, JPEG
               quality level 8): frames delivered %, delivered MP/s, bytes/s,
               server CPU s/s and ms per delivered frame, request->update and
               put->view latency p50/p95, and PSNR of decoded frames against
               the source (video, fullscreen). The viewer decodes the marker
               rects of every update and whole updates only for a PSNR sample
               (one frame every 0.25 s; --decode full decodes everything).
  ten viewers  video again on the same server, right after the one-viewer
               run: the same tracking viewer plus 9 more (same pixel format
               and encodings; they frame the stream without decoding it, in a
               separate process so that their CPU is not the tracker's). The
               server's CPU s/s with ten / with one, per repeat.
  slow link    video again, one viewer through trivnc.testing.throttle's proxy
               (a subprocess, 2,000,000 bytes/s by default): delivered frames
               per second, put->view latency p50/p95 and its trend over the
               window (median of the first third vs the last third, and the
               slope of a line through all: a queue that grows shows as a
               rising latency), bytes/s and PSNR. This viewer behaves as
               TigerVNC's: it announces Fence and ContinuousUpdates, answers
               fences, and uses continuous updates where the server has them
               (trivnc, X0tigervnc); x11vnc is asked for each update.

It ends with one table: per section and metric, each server's figure and the
ratios trivnc / X0tigervnc and trivnc / x11vnc, then the issue's targets
checked against trivnc's figures (criteria printed beside each).

Run: python bench/x11_targets.py [--seconds 6] [--warmup 5] [--repeats 2]
     [--servers trivnc,tigervnc,x11vnc] [--workloads video,fullscreen,scroll,idle]
     [--parts workloads,ten,slow] [--viewers 10] [--slow-rate 2000000]
     [--slow-seconds 10] [--decode marker|full] [--json PATH]

About 8 minutes with the defaults (2 cores). The 5 s warm-up is for x11vnc,
which pauses for about 3 s a second after each viewer connects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from x11_workloads import (
    ENCODINGS,
    LABELS,
    RunContext,
    add_run_arguments,
    json_header,
    measure,
    parse_run_arguments,
    progress,
    require_binaries,
    run_workloads,
)
from xvfb_compare import ViewerStats
from xvfb_compare import viewer as framing_viewer

from trivnc.rfb.pixelformat import BGRX

PARTS = ("workloads", "ten", "slow")
Row = dict[str, Any]
Table = dict[tuple[str, str, str], dict[str, float]]  # (section, workload, server) -> medians


# --------------------------------------------------------------------------
# More viewers: a separate process framing N streams, counts in a memmap.


def run_framing_viewers(port: int, count: int, stats_path: Path) -> None:
    """The --framing-viewers child: `count` viewers that frame the stream,
    their cumulative (updates, bytes) written to stats_path every 50 ms."""
    out = np.memmap(stats_path, dtype=np.float64, mode="r+", shape=(count, 2))

    async def main() -> None:
        stats = [ViewerStats() for _ in range(count)]
        async with trio.open_nursery() as nursery:
            for s in stats:
                nursery.start_soon(framing_viewer, port, s, ENCODINGS, BGRX)
            while True:
                for i, s in enumerate(stats):
                    out[i] = (s.updates, s.received)
                await trio.sleep(0.05)

    trio.run(main)


def _stop(process: subprocess.Popen[Any]) -> None:
    """End a helper process this script started (by its PID), politely first."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def framing_viewers(
    port: int, count: int, home: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[], dict[str, float]]]]:
    path = home / f"viewers-{port}"
    path.write_bytes(bytes(16 * count))
    stats = np.memmap(path, dtype=np.float64, mode="r", shape=(count, 2))
    process = subprocess.Popen(
        [sys.executable, __file__, "--framing-viewers", str(port), "--viewers", str(count + 1),
         "--stats", str(path)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def counters() -> dict[str, float]:
        if process.poll() is not None:
            raise RuntimeError(f"the framing viewers exited ({process.returncode})")
        snapshot = np.array(stats)
        out = {f"viewer{i}_updates": float(u) for i, (u, _) in enumerate(snapshot)}
        out |= {f"viewer{i}_bytes": float(b) for i, (_, b) in enumerate(snapshot)}
        return out

    try:
        yield process, counters
    finally:
        _stop(process)


@contextlib.contextmanager
def throttle(port: int, rate: float) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """trivnc.testing.throttle's CLI in front of 127.0.0.1:port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trivnc.testing.throttle", "--target", f"127.0.0.1:{port}",
         "--rate", str(rate), "--listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the throttling proxy did not start: {line!r}")
        yield process, int(line.rsplit(":", 1)[1])
    finally:
        _stop(process)


# --------------------------------------------------------------------------
# The extra measurements on the video workload's servers.


def video_extras(ctx: RunContext) -> list[Row]:
    args = ctx.args
    if ctx.workload != "video":
        return []
    out: list[Row] = []
    tag = {"workload": ctx.workload, "server": ctx.server, "repeat": ctx.repeat}
    if "ten" in args.parts:
        try:
            with framing_viewers(ctx.port, args.viewers - 1, ctx.home) as (process, counters):
                r = measure(
                    ctx.port, {**ctx.pids, "viewers": process.pid}, ctx.workload,
                    ctx.width, ctx.height, ctx.driver.clock, args, ctx.reference,
                    counters=counters,
                )  # fmt: skip
            rates = r.pop("counters_per_second")
            others = [v for k, v in rates.items() if k.endswith("_updates")]
            r["viewers"] = args.viewers
            r["framing_min_updates_per_second"] = min(others, default=None)
            r["framing_median_updates_per_second"] = statistics.median(others) if others else None
            r["all_viewers_bytes_per_second"] = r["bytes_per_second"] + sum(
                v for k, v in rates.items() if k.endswith("_bytes")
            )
            one = ctx.run["server_cpu_per_second"]
            r["cpu_ratio_vs_one_viewer"] = r["server_cpu_per_second"] / one if one else None
            r["one_viewer_server_cpu_per_second"] = one
            r = {"section": "ten_viewers", **tag, **r}
            out.append(r)
            progress(r, f"{args.viewers} viewers ")
        except (OSError, EOFError, RuntimeError) as exc:
            print(f"  ten viewers {LABELS[ctx.server]:10} rep {ctx.repeat}: FAILED: {exc!r}")
    if "slow" in args.parts:
        try:
            slow_args = argparse.Namespace(**{**vars(args), "seconds": args.slow_seconds})
            with throttle(ctx.port, args.slow_rate) as (process, port):
                r = measure(
                    port, {**ctx.pids, "proxy": process.pid}, ctx.workload, ctx.width,
                    ctx.height, ctx.driver.clock, slow_args, ctx.reference, max_latency=30.0,
                    continuous=True,
                )  # fmt: skip
            r.pop("counters_per_second")
            r = {"section": "slow_link", **tag, "rate": args.slow_rate, **r}
            out.append(r)
            progress(r, "slow link ")
        except (OSError, EOFError, RuntimeError) as exc:
            print(f"  slow link   {LABELS[ctx.server]:10} rep {ctx.repeat}: FAILED: {exc!r}")
    return out


# --------------------------------------------------------------------------
# Medians, the combined table and the targets.


def median_table(runs: list[Row]) -> Table:
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in runs:
        key = (r.get("section", "workloads"), r["workload"], r["server"])
        groups.setdefault(key, []).append(r)
    table: Table = {}
    for key, rows in groups.items():
        keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
        table[key] = {}
        for k in sorted(keys - {"repeat"}):
            values = [float(r[k]) for r in rows if isinstance(r.get(k), int | float)]
            if values:
                table[key][k] = statistics.median(values)
    return table


# (section, workload, metric, label, scale, format)
ROWS: list[tuple[str, str, str, str, float, str]] = []
for _w in ("video", "fullscreen"):
    ROWS += [
        ("workloads", _w, "delivered_pct", "frames delivered %", 1, ".1f"),
        ("workloads", _w, "megapixels_per_second", "delivered MP/s", 1, ".1f"),
        ("workloads", _w, "bytes_per_second", "MB/s", 1e-6, ".2f"),
        ("workloads", _w, "server_cpu_per_second", "server CPU s/s", 1, ".3f"),
        ("workloads", _w, "server_cpu_ms_per_frame", "server CPU ms/frame", 1, ".2f"),
        ("workloads", _w, "latency_p50_ms", "req->upd p50 ms", 1, ".1f"),
        ("workloads", _w, "latency_p95_ms", "req->upd p95 ms", 1, ".1f"),
        ("workloads", _w, "frame_latency_p50_ms", "put->view p50 ms", 1, ".1f"),
        ("workloads", _w, "frame_latency_p95_ms", "put->view p95 ms", 1, ".1f"),
        ("workloads", _w, "psnr_median_db", "PSNR dB (median)", 1, ".1f"),
        ("workloads", _w, "psnr_min_db", "PSNR dB (min)", 1, ".1f"),
    ]
ROWS += [
    ("workloads", "scroll", "delivered_pct", "lines delivered %", 1, ".1f"),
    ("workloads", "scroll", "bytes_per_second", "KB/s", 1e-3, ".1f"),
    ("workloads", "scroll", "bytes_per_frame", "KB/line delivered", 1e-3, ".2f"),
    ("workloads", "scroll", "server_cpu_per_second", "server CPU s/s", 1, ".3f"),
    ("workloads", "scroll", "server_cpu_ms_per_frame", "server CPU ms/line", 1, ".2f"),
    ("workloads", "scroll", "latency_p95_ms", "req->upd p95 ms", 1, ".1f"),
    ("workloads", "scroll", "frame_latency_p95_ms", "put->view p95 ms", 1, ".1f"),
    ("workloads", "idle", "bytes_per_second", "bytes/s", 1, ".0f"),
    ("workloads", "idle", "updates_per_second", "updates/s", 1, ".2f"),
    ("workloads", "idle", "server_cpu_per_second", "server CPU % of a core", 100, ".2f"),
    ("ten_viewers", "video", "one_viewer_server_cpu_per_second", "CPU s/s, 1 viewer", 1, ".3f"),
    ("ten_viewers", "video", "server_cpu_per_second", "CPU s/s, 10 viewers", 1, ".3f"),
    ("ten_viewers", "video", "cpu_ratio_vs_one_viewer", "CPU 10 / 1 viewer", 1, ".2f"),
    ("ten_viewers", "video", "delivered_pct", "frames % (tracked viewer)", 1, ".1f"),
    ("ten_viewers", "video", "framing_min_updates_per_second", "upd/s, slowest other", 1, ".1f"),
    ("ten_viewers", "video", "all_viewers_bytes_per_second", "MB/s, all viewers", 1e-6, ".2f"),
    ("ten_viewers", "video", "viewers_cpu_per_second", "other viewers' CPU s/s", 1, ".2f"),
    ("slow_link", "video", "frames_per_second", "frames delivered/s", 1, ".1f"),
    ("slow_link", "video", "delivered_pct", "frames delivered %", 1, ".1f"),
    ("slow_link", "video", "bytes_per_second", "MB/s", 1e-6, ".3f"),
    ("slow_link", "video", "frame_latency_p50_ms", "put->view p50 ms", 1, ".0f"),
    ("slow_link", "video", "frame_latency_p95_ms", "put->view p95 ms", 1, ".0f"),
    (
        "slow_link",
        "video",
        "frame_latency_first_third_p50_ms",
        "put->view p50, 1st third",
        1,
        ".0f",
    ),
    ("slow_link", "video", "frame_latency_last_third_p50_ms", "put->view p50, 3rd third", 1, ".0f"),
    ("slow_link", "video", "frame_latency_slope_ms_per_s", "put->view trend ms/s", 1, ".1f"),
    ("slow_link", "video", "latency_p95_ms", "req->upd p95 ms", 1, ".0f"),
    ("slow_link", "video", "max_stall_ms", "longest stall ms", 1, ".0f"),
    ("slow_link", "video", "server_cpu_per_second", "server CPU s/s", 1, ".3f"),
    ("slow_link", "video", "psnr_median_db", "PSNR dB (median)", 1, ".1f"),
]
SECTION_TITLES = {
    "workloads": "one viewer",
    "ten_viewers": "ten viewers",
    "slow_link": "slow link",
}


def _cell(value: float | None, scale: float, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value * scale:>{width}{fmt}}"


def combined_table(table: Table, servers: list[str]) -> tuple[list[str], list[Row]]:
    others = [s for s in servers if s != "trivnc"]
    has_trivnc = "trivnc" in servers
    head = f"{'':12} {'metric':28}" + "".join(f" {LABELS[s]:>10}" for s in servers)
    if has_trivnc:
        head += "".join(f" {'/' + LABELS[s]:>11}" for s in others)
    lines = [head, "-" * len(head)]
    records: list[Row] = []
    last = None
    for section, workload, metric, label, scale, fmt in ROWS:
        values = {s: table.get((section, workload, s), {}).get(metric) for s in servers}
        if all(v is None for v in values.values()):
            continue
        group = f"{SECTION_TITLES[section]}: {workload}"
        if group != last:
            lines.append(group)
            last = group
        line = f"{'':12} {label:28}" + "".join(
            f" {_cell(values[s], scale, fmt, 10)}" for s in servers
        )
        record: Row = {"section": section, "workload": workload, "metric": metric, **values}
        if has_trivnc:
            for s in others:
                a, b = values["trivnc"], values[s]
                q = a / b if a is not None and b else None
                record[f"trivnc/{s}"] = q
                line += f" {_cell(q, 1, '.2f', 11)}"
        lines.append(line)
        records.append(record)
    return lines, records


def _get(table: Table, section: str, workload: str, server: str, metric: str) -> float | None:
    return table.get((section, workload, server), {}).get(metric)


def _fmt(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def targets(table: Table) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured, the measured figures)."""
    out: list[tuple[str, bool | None, str]] = []

    def g(section: str, workload: str, metric: str, server: str = "trivnc") -> float | None:
        return _get(table, section, workload, server, metric)

    def ratio(section: str, workload: str, metric: str, other: str = "tigervnc") -> float | None:
        a, b = g(section, workload, metric), g(section, workload, metric, other)
        return a / b if a is not None and b else None

    for w in ("video", "fullscreen"):
        pct = g("workloads", w, "delivered_pct")
        out.append(
            (
                f"{w}: every frame delivered (>= 99.5 %)",
                None if pct is None else pct >= 99.5,
                f"trivnc {_fmt(pct, '.1f')} %, X0tigervnc "
                f"{_fmt(g('workloads', w, 'delivered_pct', 'tigervnc'), '.1f')} %, x11vnc "
                f"{_fmt(g('workloads', w, 'delivered_pct', 'x11vnc'), '.1f')} %",
            )
        )
    for w in ("video", "fullscreen"):
        q = ratio("workloads", w, "server_cpu_ms_per_frame")
        out.append(
            (
                f"{w}: CPU per delivered frame <= 0.8x X0tigervnc's (JPEG level 8 both)",
                None if q is None else q <= 0.8,
                f"trivnc {_fmt(g('workloads', w, 'server_cpu_ms_per_frame'))} ms, X0tigervnc "
                f"{_fmt(g('workloads', w, 'server_cpu_ms_per_frame', 'tigervnc'))} ms: "
                f"x{_fmt(q)}",
            )
        )
    q = ratio("workloads", "scroll", "bytes_per_second")
    out.append(
        (
            "scroll: bytes/s <= a tenth of X0tigervnc's",
            None if q is None else q <= 0.1,
            f"x{_fmt(q)} (per delivered line x"
            f"{_fmt(ratio('workloads', 'scroll', 'bytes_per_frame'))};"
            f" lines delivered trivnc {_fmt(g('workloads', 'scroll', 'delivered_pct'), '.1f')} %,"
            f" X0tigervnc {_fmt(g('workloads', 'scroll', 'delivered_pct', 'tigervnc'), '.1f')} %)",
        )
    )
    b, c = (
        g("workloads", "idle", "bytes_per_second"),
        g("workloads", "idle", "server_cpu_per_second"),
    )
    out.append(
        (
            "idle: zero bytes and < 1 % CPU",
            None if b is None or c is None else b == 0 and c < 0.01,
            f"{_fmt(b, '.0f')} bytes/s, {_fmt(None if c is None else 100 * c)} % of a core",
        )
    )
    q = g("ten_viewers", "video", "cpu_ratio_vs_one_viewer")
    out.append(
        (
            "ten viewers: server CPU < 1.5x one viewer's (video)",
            None if q is None else q < 1.5,
            f"x{_fmt(q)} (X0tigervnc x"
            f"{_fmt(g('ten_viewers', 'video', 'cpu_ratio_vs_one_viewer', 'tigervnc'))}, x11vnc x"
            f"{_fmt(g('ten_viewers', 'video', 'cpu_ratio_vs_one_viewer', 'x11vnc'))})",
        )
    )
    first = g("slow_link", "video", "frame_latency_first_third_p50_ms")
    last = g("slow_link", "video", "frame_latency_last_third_p50_ms")
    stall = g("slow_link", "video", "max_stall_ms")
    fps = g("slow_link", "video", "frames_per_second")
    psnr_slow, psnr_fast = (
        g("slow_link", "video", "psnr_median_db"),
        g("workloads", "video", "psnr_median_db"),
    )
    bounded = None if first is None or last is None else last <= 1.5 * first + 50
    flowing = (
        None
        if stall is None or fps is None or psnr_slow is None or psnr_fast is None
        else stall < 1000 and fps > 0 and psnr_slow < psnr_fast
    )
    out.append(
        (
            "slow link: latency bounded (put->view p50 of the last third "
            "<= 1.5x the first third's + 50 ms)",
            bounded,
            f"{_fmt(first, '.0f')} -> {_fmt(last, '.0f')} ms, trend "
            f"{_fmt(g('slow_link', 'video', 'frame_latency_slope_ms_per_s'), '.1f')} ms/s, "
            f"p95 {_fmt(g('slow_link', 'video', 'frame_latency_p95_ms'), '.0f')} ms",
        )
    )
    out.append(
        (
            "slow link: frames keep flowing (no stall >= 1 s) at a lower quality (PSNR)",
            flowing,
            f"{_fmt(fps, '.1f')} frames/s, longest stall {_fmt(stall, '.0f')} ms, PSNR "
            f"{_fmt(psnr_slow, '.1f')} dB vs {_fmt(psnr_fast, '.1f')} dB unthrottled",
        )
    )
    return out


# --------------------------------------------------------------------------
# The run.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(
        parser,
        seconds=6,
        decode="the tracking viewer decodes marker rects (+ PSNR samples), or everything",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS)
    )
    parser.add_argument("--viewers", type=int, default=10, help="viewers in the 'ten' part")
    parser.add_argument("--slow-rate", type=float, default=2_000_000, help="bytes/s")
    parser.add_argument("--slow-seconds", type=float, default=10, help="slow-link window")
    parser.add_argument(
        "--continuous",
        action="store_true",
        help="the workloads' viewer behaves as TigerVNC's (fences, continuous updates where "
        "the server has them) instead of asking for each update",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--framing-viewers", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.framing_viewers:
        run_framing_viewers(args.framing_viewers, args.viewers - 1, args.stats)
        return
    args.psnr = True
    width, height, servers, workloads = parse_run_arguments(parser, args)
    args.parts = [p for p in args.parts.split(",") if p]
    for p in args.parts:
        if p not in PARTS:
            parser.error(f"unknown part {p!r} (choose from {', '.join(PARTS)})")
    if args.viewers < 2:
        parser.error("--viewers must be at least 2")
    if "workloads" not in args.parts:
        workloads = ["video"]  # the base of the other parts, which run on its servers
    elif {"ten", "slow"} & set(args.parts) and "video" not in workloads:
        workloads.insert(0, "video")
    require_binaries(servers)

    from trivnc.testing.xvfb import Xvfb

    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="trivnc-bench-") as tmp,
        Xvfb(width, height) as xvfb,
    ):
        runs = run_workloads(xvfb, Path(tmp), servers, workloads, args, extra=video_extras)
    if "workloads" not in args.parts:  # measured only as the base of the others
        runs = [r for r in runs if "section" in r or r["workload"] != "video"]
    table = median_table(runs)
    lines, records = combined_table(table, servers)
    checks = targets(table) if "trivnc" in servers else []
    print()
    slow = "slow" in args.parts
    print(
        f"Xvfb {width}x{height}x24, source {args.fps:g} fps; Tight JPEG quality level 8, "
        f"compression 2; {args.seconds:g} s windows"
        + (f" ({args.slow_seconds:g} s on the slow link)" if slow else "")
        + f" after {args.warmup:g} s warm-up; median of {args.repeats}; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print(
        f"viewer decode: {args.decode}, PSNR from one frame every 0.25 s "
        + ("(whole updates decoded for it)" if args.decode == "marker" else "")
        + (f"; slow link {args.slow_rate:,.0f} bytes/s (trivnc.testing.throttle)" if slow else "")
        + f"; ten viewers: 1 tracking + {args.viewers - 1} framing"
    )
    busy = [r["unrelated_cpu_per_second"] for r in runs if "unrelated_cpu_per_second" in r]
    if busy:
        print(
            "CPU used by unrelated processes during the windows: median "
            f"{statistics.median(busy):.2f} s/s, max {max(busy):.2f} s/s "
            f"(of {os.cpu_count()} cores)"
        )
    print()
    print("\n".join(lines))
    if checks:
        print()
        print("Targets (trivnc):")
        for name, met, detail in checks:
            verdict = "not measured" if met is None else "met" if met else "NOT met"
            print(f"  [{verdict:^12}] {name}: {detail}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **json_header(width, height),
                    "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                    "runs": runs,
                    "table": records,
                    "targets": [{"target": n, "met": m, "measured": d} for n, m, d in checks],
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()

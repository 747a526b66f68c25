"""Measurement and adaptive encoding: congestion control, bottleneck scores
under a throttled link and a slowed encoder, frame-stat spans, dynamic
quality, video mode, and one frame's Tight encoding split across threads."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import trivnc
from trivnc.api.server_backend import ServerBackend
from trivnc.encodings.tight import TightEncoder, TightSettings, scale_down
from trivnc.geometry import Rect
from trivnc.rfb.constants import Encoding, PseudoEncoding
from trivnc.rfb.pixelformat import BGRX
from trivnc.server import Server
from trivnc.server import encoding as encoding_module
from trivnc.server.adapt import DynamicQuality, VideoDetector, VideoSettings
from trivnc.server.congestion import Congestion, InFlight
from trivnc.server.encoding import encode_parallel, split_rect
from trivnc.server.measure import BottleneckTracker
from trivnc.server.session import ClientSession
from trivnc.server.users import UserStore
from trivnc.sources.array import ArraySource
from trivnc.testing.aclient import VncClient, open_test_client
from trivnc.testing.images import desktop_like, photo_like, psnr
from trivnc.testing.throttle import throttling_proxy

W, H = 480, 360
FPS = 30.0
#: Tight with JPEG level 8, fences and continuous updates: what TigerVNC's
#: viewer and noVNC announce for the features used here.
ENCODINGS = [
    Encoding.TIGHT,
    -32 + 8,
    PseudoEncoding.FENCE,
    PseudoEncoding.CONTINUOUS_UPDATES,
    PseudoEncoding.LAST_RECT,
]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- units ------------------------------------------------------------------------


def test_congestion_window_follows_acknowledgements() -> None:
    clock = Clock()
    c = Congestion(1 / 60, clock=clock)
    assert c.can_send(0)
    c.sent(InFlight(1, 1, 100_000, 100_000, clock.now, 0.0))
    # Until the first acknowledgement: one update at a time.
    assert not c.can_send(100_000)
    clock.now += 0.05  # 100 kB in 50 ms: 2 MB/s
    delivery = c.acknowledged(1)
    assert delivery is not None
    assert delivery.rtt == pytest.approx(0.05)
    assert c.bandwidth == pytest.approx(2_000_000)
    assert c.can_send(100_000)
    # 100 kB unacknowledged drains in 50 ms, more than a 16.7 ms frame.
    c.sent(InFlight(2, 2, 100_000, 200_000, clock.now, 0.0))
    assert not c.can_send(200_000)
    # 20 kB drains in 10 ms: another may go.
    assert c.unacked_bytes(120_000) == 20_000
    assert c.can_send(120_000)


def test_congestion_delay_excludes_the_base_round_trip() -> None:
    clock = Clock()
    c = Congestion(1 / 60, clock=clock)
    c.rtt_sample(0.020)  # a 20 ms link
    c.sent(InFlight(7, 1, 1000, 1000, clock.now, waited=0.010))
    clock.now += 0.030
    delivery = c.acknowledged(7)
    assert delivery is not None
    # 10 ms waiting for the window + 30 ms to the ack - 20 ms round trip.
    assert delivery.delay == pytest.approx(0.020)
    assert c.acknowledged(7) is None  # counted once
    assert c.in_flight == 0


def test_bottleneck_scores_count_slow_encodes_and_late_deliveries() -> None:
    clock = Clock()
    t = BottleneckTracker(50, clock=clock)  # 20 ms frames
    for _ in range(10):
        record = t.frame(0.001)
        t.network(record, 0.001)
    assert t.scores() == [10.0, 10.0, 10.0, 10.0]
    for _ in range(10):
        record = t.frame(0.045)  # two whole intervals each
        t.network(record, 0.5)
    cpu_recent, cpu_total, net_recent, net_total = t.scores()
    assert cpu_recent == 0.0 and net_recent == 5.0
    clock.now += 11  # the recent window forgets; the totals do not
    assert t.scores()[0] == 10.0 and t.scores()[1] == cpu_total == 0.0
    assert net_total == 5.0


def test_dynamic_quality_steps_down_fast_and_up_slowly() -> None:
    clock = Clock()
    q = DynamicQuality(3, 8, clock=clock)
    assert q.level == 8
    for _ in range(10):  # one late update now and then is a hiccup, not a slow link
        q.delivered(0.1, 1 / 60)
        for _ in range(4):
            q.delivered(0.001, 1 / 60)
        clock.now += 1
    assert q.level == 8
    for _ in range(20):  # a burst of late updates within 50 ms: one level
        q.delivered(0.1, 1 / 60)
        clock.now += 0.0025
    assert q.level == 7
    for _ in range(40):
        q.delivered(0.1, 1 / 60)
        clock.now += 0.25
    assert q.level == 3  # never below the minimum
    for _ in range(7):
        q.delivered(0.001, 1 / 60)
        clock.now += 1
    assert q.level == 3  # not yet: eight fast updates in a row are needed
    q.delivered(0.001, 1 / 60)
    assert q.level == 4
    q.configure(2, 5)
    assert q.level == 4
    q.configure(0, 2)
    assert q.level == 2


def test_video_mode_enters_and_leaves_after_its_times() -> None:
    clock = Clock()
    v = VideoDetector(VideoSettings(area=40, enter_seconds=2, leave_seconds=1), clock=clock)
    for _ in range(19):
        assert not v.frame(80)
        clock.now += 0.1
    clock.now += 0.15
    assert v.frame(80)
    assert v.frame(10)  # a small change does not end it at once...
    clock.now += 1.0
    assert not v.frame(10)  # ...one second of them does
    assert not v.frame(90)  # and it takes the full time again to come back


def _mixed_frame() -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Desktop-like text and UI with a photo in the middle."""
    frame = desktop_like(1024, 768, seed=5).copy()
    frame[200:600, 300:800] = photo_like(500, 400, seed=6)
    return frame


@pytest.mark.parametrize("jpeg", [True, False], ids=["jpeg", "lossless"])
async def test_parallel_tight_is_byte_identical_to_sequential(jpeg: bool) -> None:
    """Splitting one update across threads changes nothing on the wire: the
    rects come out in order, and the zlib-stream rects are finished in order."""
    frame = _mixed_frame()
    encodings = [Encoding.TIGHT, -32 + 6] if jpeg else [Encoding.TIGHT]
    settings = TightSettings.from_encodings(encodings)
    rects = split_rect(Rect(0, 0, 1024, 768), Encoding.TIGHT)
    sequential = TightEncoder(settings)
    expected = [sequential.encode(frame[r.slices()], BGRX) for r in rects]
    parallel = TightEncoder(settings)
    limiter = trio.CapacityLimiter(4)
    for _ in range(2):  # twice: the streams stay in step across updates
        got, cpu = await encode_parallel(parallel, limiter, frame, rects, BGRX)
        assert got == expected
        assert cpu > 0
        expected = [sequential.encode(frame[r.slices()], BGRX) for r in rects]


# -- end to end -------------------------------------------------------------------


@asynccontextmanager
async def _server(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[Server, ArraySource]]:
    source = ArraySource.from_array(photo_like(W, H, seed=1))
    settings: dict[str, Any] = {
        "source": source,
        "rfb_port": 0,
        "insecure_no_auth": True,
        "max_frame_rate": FPS,
    }
    settings.update(config)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(trivnc.serve, trivnc.Config(**settings))
        try:
            yield server, source
        finally:
            nursery.cancel_scope.cancel()


async def _animate(source: ArraySource, fps: float = FPS) -> None:
    """A video: the whole screen changes every frame."""
    frames = [photo_like(W, H, seed=10 + i) for i in range(8)]
    i = 0
    while True:
        source.pixels[...] = frames[i % len(frames)]
        source.mark_changed()
        i += 1
        await trio.sleep(1 / fps)


async def _watch(c: VncClient, seconds: float) -> int:
    """Take continuous updates for `seconds`; returns how many came."""
    await c.send(b"\x96\x01" + struct.pack(">HHHH", 0, 0, W, H))  # EnableContinuousUpdates
    count = 0
    with trio.move_on_after(seconds):
        while True:
            await c.next_update(timeout=seconds + 5)
            count += 1
    return count


def _session(server: Server) -> ClientSession:
    (session,) = server.sessions
    return session


def _backend(server: Server, tmp_path: Path) -> ServerBackend:
    """The developer API's backend over the server (its RFB port runs
    without users here, so the users file is the test's own)."""
    return ServerBackend(server.context, UserStore(tmp_path / "kasmpasswd"))


def _scores(server: Server, tmp_path: Path) -> list[float]:
    """The one connection's [cpu, cpu_total, net, net_total], as
    /api/get_bottleneck_stats gives them."""
    (per_user,) = _backend(server, tmp_path).bottleneck_stats().values()
    (scores,) = per_user.values()
    return scores


async def test_throttled_link_lowers_the_network_score_and_the_quality(tmp_path: Path) -> None:
    rate = 400_000  # bytes/s; a frame is about 100 kB at level 8
    async with _server(tmp_path) as (server, source), trio.open_nursery() as n:
        n.start_soon(_animate, source)
        async with (
            # A link with a deep queue (bufferbloat): only the server's own
            # pacing keeps it from filling.
            throttling_proxy(
                "127.0.0.1", server.rfb_port, rate=rate, link_buffer=1_500_000
            ) as proxy,
            open_test_client("127.0.0.1", proxy.port, encodings=ENCODINGS) as c,
        ):
            await c.screenshot()
            session = _session(server)
            backlog: list[int] = []

            async def sample() -> None:
                while True:
                    await trio.sleep(0.25)
                    backlog.append(session.stats.bytes_sent - proxy.delivered)

            n.start_soon(sample)
            count = await _watch(c, 6.0)
            cpu, _, net, _ = _scores(server, tmp_path)
            level = session.quality.level
            n.cancel_scope.cancel()
    assert net < 5, (cpu, net)
    assert cpu > 7, (cpu, net)
    # Frames keep flowing, at a lower quality...
    assert count >= 10
    assert level < 8
    # ...and no queue builds up between server and client: what was written
    # and not yet delivered stays within about two frames, from start to end.
    assert max(backlog) < 400_000, backlog
    late = backlog[len(backlog) // 2 :]
    assert max(late) < 400_000, backlog


@pytest.fixture
def slow_encoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """Every encode takes 80 ms longer (a starved or overloaded CPU)."""
    delay = 0.08
    for name in ("encode_batch", "analyse_batch"):
        original = getattr(encoding_module, name)

        def slowed(*args: Any, _original: Any = original) -> Any:
            time.sleep(delay)
            return _original(*args)

        monkeypatch.setattr(encoding_module, name, slowed)
    yield delay


async def test_slow_encoder_lowers_the_cpu_score(slow_encoder: float, tmp_path: Path) -> None:
    async with _server(tmp_path) as (server, source), trio.open_nursery() as n:
        n.start_soon(_animate, source)
        async with open_test_client("127.0.0.1", server.rfb_port, encodings=ENCODINGS) as c:
            await c.screenshot()
            count = await _watch(c, 4.0)
            cpu, _, net, _ = _scores(server, tmp_path)
            n.cancel_scope.cancel()
    assert count >= 5
    assert cpu < 5, (cpu, net)
    assert net > 7, (cpu, net)


async def test_neither_bottleneck_keeps_both_scores_high(tmp_path: Path) -> None:
    async with _server(tmp_path) as (server, source), trio.open_nursery() as n:
        n.start_soon(_animate, source, 15.0)
        async with open_test_client("127.0.0.1", server.rfb_port, encodings=ENCODINGS) as c:
            await c.screenshot()
            count = await _watch(c, 4.0)
            cpu, _, net, _ = _scores(server, tmp_path)
            level = _session(server).quality.level
            n.cancel_scope.cancel()
    assert count >= 20
    assert cpu > 8 and net > 8, (cpu, net)
    assert level == 8  # a link that carries the frames keeps the client's quality


async def test_frame_stats_spans_add_up_to_server_time(slow_encoder: float, tmp_path: Path) -> None:
    async with _server(tmp_path) as (server, source), trio.open_nursery() as n:
        n.start_soon(_animate, source, 5.0)
        async with open_test_client("127.0.0.1", server.rfb_port, encodings=ENCODINGS) as c:
            await c.screenshot()
            n.start_soon(_watch, c, 30.0)
            stats = await _backend(server, tmp_path).frame_stats("all", "")
            n.cancel_scope.cancel()
    server_time = stats["frame"]["server_time"]
    spans = {s["process_name"]: s["time"] for s in stats["server_side"]}
    order = ["Screenshot", "Analysis", "Queue", "Encoding_total", "Send"]
    assert [name for name in spans if name in order] == order
    # Encoder entries (with a rect count) break Encoding_total down by CPU;
    # every other entry is a span of the frame's timeline.
    timeline = [s for s in stats["server_side"] if "count" not in s]
    total = sum(s["time"] for s in timeline)
    assert abs(total - server_time) <= 0.1 * server_time, (spans, server_time)
    # The spans are real: the encoder's injected 80 ms shows where it was spent.
    assert spans["Encoding_total"] >= slow_encoder * 1000
    assert spans["Encoding_total"] > 0.5 * server_time
    assert "TightEncoder" in spans
    (client,) = stats["client_side"]
    assert 0 < client["client_time"] < 5000
    assert client["ping"] < 1000


async def test_video_mode_lowers_quality_and_ends_when_the_video_stops(tmp_path: Path) -> None:
    settings = {"video_time": 0.5, "video_out_time": 0.5, "video_quality": 2}
    async with (
        _server(tmp_path, **settings) as (server, source),
        open_test_client("127.0.0.1", server.rfb_port, encodings=ENCODINGS) as c,
    ):
        await c.screenshot()
        session = _session(server)
        async with trio.open_nursery() as n:
            n.start_soon(_animate, source)
            n.start_soon(_watch, c, 30.0)
            with trio.fail_after(10):
                while not session.encoders.video:
                    await trio.sleep(0.05)
            assert session.encoders.quality_level == 2
            await trio.sleep(0.3)
            n.cancel_scope.cancel()
        await _watch(c, 0.5)  # the last frame drawn arrives
        # In video mode the picture is still the source's, coarser.
        assert psnr(c.framebuffer[..., :3], source.pixels[..., :3]) > 20
        async with trio.open_nursery() as n:
            n.start_soon(_watch, c, 30.0)
            # Small changes only: video mode ends.
            with trio.fail_after(10):
                while session.encoders.video:
                    source.pixels[0:8, 0:8] = np.uint8(time.monotonic() * 100 % 256)
                    source.mark_changed(Rect(0, 0, 8, 8))
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
        assert session.encoders.quality_level == 8


def test_scale_down_averages_and_keeps_the_picture() -> None:
    smooth = photo_like(400, 300, seed=2)
    half = scale_down(smooth, 0.5)
    assert half.shape == (150, 200, 4)
    # A flat picture stays exactly flat; a smooth one stays close to the
    # source sampled at the same points.
    flat = np.full((64, 64, 4), 77, np.uint8)
    assert (scale_down(flat, 0.5) == 77).all()
    assert psnr(half[..., :3], smooth[1::2, 1::2, :3]) > 25
    assert scale_down(smooth, 0.01).shape[:2] == (3, 4)


def test_congestion_writes_off_an_update_never_acknowledged() -> None:
    """A client that announced fences and never answers them is not shut out
    for good: after GIVE_UP_AFTER seconds the update counts as gone."""
    clock = Clock()
    c = Congestion(1 / 60, clock=clock)
    c.sent(InFlight(1, 1, 50_000, 50_000, clock.now, 0.0))
    clock.now += 4.9
    assert not c.can_send(50_000)
    clock.now += 0.2
    assert c.can_send(50_000)
    assert c.in_flight == 0 and c.bandwidth is None  # no sample from a write-off

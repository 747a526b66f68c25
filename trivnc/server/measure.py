# Bottleneck scores (protocol.md B.9, KasmVNC's VNCSConnectionST.cxx): per
# connection, count frames, frames whose encoding took at least one frame
# interval (CPU slow, once per whole interval) or 80 % of one (CPU close), and
# frames the network delivered late (network slow), over the last 10 seconds
# and since connect; report 10 - 10 * ratio. The formulas, and how they stay
# apart, are in docs/performance.md ("Bottleneck scores").
#
# Where trivnc differs on purpose: scores are clamped to 0..10, an idle window
# reports 10 rather than KasmVNC's `nan` (which is not JSON), and "network
# slow" is measured, not predicted. For a client that answers fences it is
# decided when the client acknowledges the update: the time the update waited
# for the congestion window plus the time from its first byte written to the
# acknowledgement, less the base round trip, exceeds one frame interval. For
# a client without fences it is the time the write blocked.
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

RECENT_SECONDS = 10.0


@dataclass
class _Counts:
    frames: int = 0
    cpu_slow: float = 0.0
    cpu_close: int = 0
    net_slow: int = 0

    def scores(self) -> tuple[float, float]:
        if not self.frames:
            return 10.0, 10.0
        cpu = (self.cpu_slow + 0.2 * self.cpu_close) / self.frames
        net = min(1.0, self.net_slow / self.frames)
        return _score(cpu), _score(net)


@dataclass
class FrameRecord:
    """One update's entry in the bottleneck counts."""

    at: float
    cpu_slow: float
    cpu_close: bool
    net_slow: bool = False


def _score(ratio: float) -> float:
    return round(max(0.0, min(10.0, 10.0 - 10.0 * ratio)), 1)


class BottleneckTracker:
    """Per-connection bottleneck bookkeeping: `frame()` per update sent, then
    `network()` once its delivery is known."""

    def __init__(
        self,
        frame_rate: float,
        *,
        recent: float = RECENT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = 1.0 / frame_rate
        self.recent = recent
        self._clock = clock
        self._total = _Counts()
        self._events: deque[FrameRecord] = deque(maxlen=10_000)

    def set_frame_rate(self, frame_rate: float) -> None:
        self.interval = 1.0 / frame_rate

    def frame(self, encode_seconds: float) -> FrameRecord:
        """Count an update whose encoding took `encode_seconds` (wall time:
        a starved worker pool is a CPU bottleneck too). Returns the handle
        that `network()` takes."""
        # An encode that took several intervals counts once per interval.
        slow = encode_seconds // self.interval if encode_seconds >= self.interval else 0.0
        close = self.interval * 0.8 <= encode_seconds < self.interval
        self._total.frames += 1
        self._total.cpu_slow += slow
        self._total.cpu_close += close
        event = FrameRecord(self._clock(), slow, close)
        self._events.append(event)
        return event

    def network(self, event: FrameRecord, delivery_seconds: float) -> None:
        """The update of `event` took `delivery_seconds` to get through the
        link (beyond the base round trip)."""
        if delivery_seconds > self.interval and not event.net_slow:
            event.net_slow = True
            self._total.net_slow += 1

    def scores(self) -> list[float]:
        """[cpu_recent, cpu_total, net_recent, net_total], each 0..10."""
        cutoff = self._clock() - self.recent
        while self._events and self._events[0].at < cutoff:
            self._events.popleft()
        recent = _Counts()
        for e in self._events:
            recent.frames += 1
            recent.cpu_slow += e.cpu_slow
            recent.cpu_close += e.cpu_close
            recent.net_slow += e.net_slow
        cpu_recent, net_recent = recent.scores()
        cpu_total, net_total = self._total.scores()
        return [cpu_recent, cpu_total, net_recent, net_total]

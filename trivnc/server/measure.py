# Bottleneck scores, as KasmVNC defines them (protocol.md B.9,
# VNCSConnectionST.cxx): per connection, count frames, frames whose encoding
# took at least one frame interval (CPU slow) or 80 % of one (CPU close), and
# frames whose delivery took longer than a frame interval (network slow), over
# the last 10 seconds and since connect; report 10 - 10 * ratio.
#
# Where trivnc differs on purpose: scores are clamped to 0..10, an idle window
# reports 10 rather than KasmVNC's `nan` (which is not JSON), and "network
# slow" is measured, not predicted: the time the send task spent blocked
# writing an update, which is how long the link took to absorb it.
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


def _score(ratio: float) -> float:
    return round(max(0.0, min(10.0, 10.0 - 10.0 * ratio)), 1)


class BottleneckTracker:
    """Per-connection bottleneck bookkeeping; one `frame()` per update sent."""

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
        self._events: deque[tuple[float, float, bool, bool]] = deque(maxlen=10_000)

    def frame(self, encode_seconds: float, send_seconds: float) -> None:
        # An encode that took several intervals counts once per interval.
        slow = encode_seconds // self.interval if encode_seconds >= self.interval else 0.0
        close = self.interval * 0.8 <= encode_seconds < self.interval
        net = send_seconds > self.interval
        self._total.frames += 1
        self._total.cpu_slow += slow
        self._total.cpu_close += close
        self._total.net_slow += net
        self._events.append((self._clock(), slow, close, net))

    def scores(self) -> list[float]:
        """[cpu_recent, cpu_total, net_recent, net_total], each 0..10."""
        cutoff = self._clock() - self.recent
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()
        recent = _Counts()
        for _, slow, close, net in self._events:
            recent.frames += 1
            recent.cpu_slow += slow
            recent.cpu_close += close
            recent.net_slow += net
        cpu_recent, net_recent = recent.scores()
        cpu_total, net_total = self._total.scores()
        return [cpu_recent, cpu_total, net_recent, net_total]

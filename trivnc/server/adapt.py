# Per-connection adaptation, KasmVNC's "encoding" features: dynamic quality
# (the JPEG/WebP quality level follows what the link delivers, between a
# minimum and a maximum) and video mode (a screen that keeps changing over a
# large area is treated as video: lossy without per-rect analysis, at the
# video quality, scaled down for clients that scale back up). The rules and
# their defaults are documented in docs/performance.md ("Adaptive encoding").
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: Seconds between two steps down / up of the dynamic quality.
STEP_DOWN_EVERY = 0.25
STEP_UP_EVERY = 1.0
#: Consecutive updates delivered well within the frame interval before the
#: quality may go up a level.
FAST_TO_STEP_UP = 8
#: Late updates among the last LATE_WINDOW before it goes down a level: one
#: late update is a hiccup (the client was busy), not a slow link.
LATE_TO_STEP_DOWN = 3
LATE_WINDOW = 5


class DynamicQuality:
    """A JPEG/WebP quality level (0..9) between `low` and `high`.

    Additive steps both ways, at different speeds: one level down when
    LATE_TO_STEP_DOWN of the last LATE_WINDOW updates reached the client later
    than a frame interval (at most every STEP_DOWN_EVERY seconds, so one late
    burst costs one level, not ten), one level up after FAST_TO_STEP_UP
    updates delivered within half an interval (at most every STEP_UP_EVERY
    seconds). A link that carries the frames
    keeps the client's own level; one that cannot settles where it can.
    """

    def __init__(
        self, low: int, high: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.low = self.high = self.level = 9
        self._fast = 0
        self._changed = -1e9
        self._recent: deque[bool] = deque(maxlen=LATE_WINDOW)
        self.configure(low, high, reset=True)

    def configure(self, low: int, high: int, *, reset: bool = False) -> None:
        """A new range (the client's SetEncodings). The level starts at the
        top and is kept within the range."""
        self.high = max(0, min(9, high))
        self.low = max(0, min(self.high, low))
        self.level = self.high if reset else max(self.low, min(self.high, self.level))

    def delivered(self, delay: float, interval: float) -> None:
        """An update reached the client `delay` seconds beyond the round trip."""
        now = self._clock()
        late = delay > interval
        self._recent.append(late)
        if late:
            self._fast = 0
            if (
                sum(self._recent) >= LATE_TO_STEP_DOWN
                and self.level > self.low
                and now - self._changed >= STEP_DOWN_EVERY
            ):
                self.level -= 1
                self._changed = now
                self._recent.clear()  # the next step needs new evidence
        elif delay <= interval / 2:
            self._fast += 1
            if (
                self._fast >= FAST_TO_STEP_UP
                and self.level < self.high
                and now - self._changed >= STEP_UP_EVERY
            ):
                self.level += 1
                self._changed = now
                self._fast = 0


@dataclass(frozen=True)
class VideoSettings:
    """When a connection enters and leaves video mode, and what it does then."""

    #: Percent of the screen that must change in each frame...
    area: int = 45
    #: ...for this many seconds in a row to enter video mode.
    enter_seconds: float = 5.0
    #: Seconds of smaller changes (or none) that end it.
    leave_seconds: float = 3.0
    #: JPEG quality level in video mode; -1 keeps the current (dynamic) level.
    quality: int = -1
    #: Video is scaled down to fit this size for clients that scale back up
    #: (KasmVNC's web client; it may ask for less with message 252).
    max_width: int = 1920
    max_height: int = 1080


class VideoDetector:
    """Video mode for one connection, fed with the changed share of each
    frame it is sent."""

    def __init__(
        self, settings: VideoSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.active = False
        self._big_since: float | None = None
        self._small_since: float | None = None

    def frame(self, changed_percent: float) -> bool:
        """Note a frame; returns whether video mode is on."""
        now = self._clock()
        s = self.settings
        if changed_percent >= s.area:
            self._small_since = None
            if self._big_since is None:
                self._big_since = now
            if not self.active and now - self._big_since >= s.enter_seconds:
                self.active = True
        else:
            self._big_since = None
            if self._small_since is None:
                self._small_since = now
            if self.active and now - self._small_since >= s.leave_seconds:
                self.active = False
        return self.active

    def idle(self) -> bool:
        """No frame for a while counts as small changes."""
        return self.frame(0.0) if self.active else False

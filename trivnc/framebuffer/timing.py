# Per-frame timing spans, named as KasmVNC's frame stats name them
# (protocol.md B.7.5), plus two of trivnc's own so that the spans account for
# every millisecond of `server_time`, the wall time from the start of the
# capture to the last byte of the update written to the client:
#   Screenshot      capturing the pixels (worker thread)
#   Analysis        comparing tiles and finding moved areas (same thread)
#   Queue           the rest until encoding starts: thread hand-offs, and the
#                   client's turn (its request, congestion window, rate cap)
#   Encoding_total  wall time encoding the update
#   Send            writing it to the client's socket
# and per encoder its CPU time, rect count and area, summed over every client
# that encoded the frame (a breakdown of Encoding_total, not a further span).
# When several clients send a frame, the timeline of the one that finished
# last is shown.
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class EncoderSpan:
    time: float = 0.0  # CPU seconds, summed over threads and clients
    count: int = 0  # rects
    area: int = 0  # pixels


@dataclass
class FrameTiming:
    """The spans of one frame. Written only on the trio thread by the
    framebuffer service and (through `FramebufferService.record_encoding`) by
    the sessions that encode the frame."""

    version: int
    width: int
    height: int
    started: float = field(default_factory=time.perf_counter)
    changed_area: int = 0
    spans: dict[str, float] = field(default_factory=dict)  # seconds
    encoders: dict[str, EncoderSpan] = field(default_factory=dict)
    encoding_total: float = 0.0  # wall seconds encoding the update shown
    videoscaling: float = 0.0
    clients: int = 0  # sessions that sent this frame
    #: perf_counter marks of the update shown: encoding started and ended,
    #: last byte written (0: not sent yet).
    encode_start: float = 0.0
    encode_end: float = 0.0
    written: float = 0.0

    def update_sent(
        self, encode_start: float, encode_end: float, written: float, scaling: float = 0.0
    ) -> None:
        """A session wrote this frame's update; the latest to finish is shown."""
        self.clients += 1
        self.videoscaling = max(self.videoscaling, scaling)
        if written >= self.written:
            self.encode_start, self.encode_end, self.written = encode_start, encode_end, written
            self.encoding_total = encode_end - encode_start

    def add_encoder(self, name: str, cpu_seconds: float, count: int, area: int) -> None:
        entry = self.encoders.setdefault(name, EncoderSpan())
        entry.time += cpu_seconds
        entry.count += count
        entry.area += area

    @property
    def changed_percent(self) -> float:
        total = self.width * self.height
        return 100.0 * self.changed_area / total if total else 0.0

    @property
    def server_time(self) -> float:
        """Seconds from the start of capture to the last byte written (to
        the end of the spans so far while no update has been written)."""
        if self.written:
            return self.written - self.started
        return sum(self.spans.values()) + self.encoding_total

    def all_spans(self) -> dict[str, float]:
        """Every span in order, seconds; they add up to server_time."""
        spans = dict(self.spans)
        if self.written:
            spans["Queue"] = max(0.0, self.encode_start - self.started - sum(self.spans.values()))
        spans["Encoding_total"] = self.encoding_total
        if self.written:
            spans["Send"] = self.written - self.encode_end
        return spans

    def as_dict(self) -> dict[str, object]:
        """KasmVNC's get_frame_stats shape, milliseconds."""
        server_side: list[dict[str, object]] = []
        for name, seconds in self.all_spans().items():
            entry: dict[str, object] = {"process_name": name, "time": round(seconds * 1000, 3)}
            if name == "Encoding_total":
                entry["videoscaling"] = round(self.videoscaling * 1000, 3)
            server_side.append(entry)
        for name, enc in self.encoders.items():
            server_side.append(
                {
                    "process_name": name,
                    "time": round(enc.time * 1000, 3),
                    "count": enc.count,
                    "area": enc.area,
                }
            )
        return {
            "frame": {
                "resx": self.width,
                "resy": self.height,
                "changed": round(self.changed_percent, 2),
                "server_time": round(self.server_time * 1000, 3),
            },
            "server_side": server_side,
        }


class TimingHistory:
    """The last `size` frames' timings, looked up by version."""

    def __init__(self, size: int = 256) -> None:
        self._frames: deque[FrameTiming] = deque(maxlen=size)

    def add(self, timing: FrameTiming) -> None:
        self._frames.append(timing)

    def get(self, version: int) -> FrameTiming | None:
        if not self._frames:
            return None
        index = version - self._frames[0].version
        if 0 <= index < len(self._frames) and self._frames[index].version == version:
            return self._frames[index]
        return next((t for t in self._frames if t.version == version), None)

    def latest(self) -> FrameTiming | None:
        return self._frames[-1] if self._frames else None

    def __iter__(self) -> Iterator[FrameTiming]:
        return iter(list(self._frames))

    def __len__(self) -> int:
        return len(self._frames)

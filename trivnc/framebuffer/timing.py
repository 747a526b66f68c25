# Per-frame timing spans, named as KasmVNC's frame stats name them
# (protocol.md B.7.5): "Screenshot" (capture), "Analysis" (damage), and for
# encoding the wall time "Encoding_total" plus one entry per encoder with CPU
# time, rect count and area, summed over every client that encoded the frame.
# The service times capture and analysis in the worker thread that does both
# and records them here.
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
    encoding_total: float = 0.0  # wall seconds from publish to the last rect encoded
    videoscaling: float = 0.0
    clients: int = 0  # sessions that sent this frame

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
        """Seconds from the start of capture to the end of encoding."""
        return sum(self.spans.values()) + self.encoding_total

    def as_dict(self) -> dict[str, object]:
        """KasmVNC's get_frame_stats shape, milliseconds."""
        server_side: list[dict[str, object]] = [
            {"process_name": name, "time": round(seconds * 1000, 3)}
            for name, seconds in self.spans.items()
        ]
        server_side.append(
            {
                "process_name": "Encoding_total",
                "time": round(self.encoding_total * 1000, 3),
                "videoscaling": round(self.videoscaling * 1000, 3),
            }
        )
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

# Congestion control from fence round trips, in the spirit of TigerVNC's
# Congestion.cxx (which KasmVNC inherits): after each update the server sends
# a fence with BlockBefore, which the client answers only once it has
# processed everything sent before it. The answer says which bytes the client
# has really absorbed, how long the round trip is, and how fast the link
# drains. An update is sent only when what is still unacknowledged would
# drain within one frame interval, so at most about one frame waits in the
# network: the newest frame goes out, older ones are coalesced into it, and
# the latency stays bounded however slow the link (no growing queue).
#
# Clients that do not answer fences are paced by their own requests (RFC
# 6143 7.5.3) and by the socket: their writes block when the link is full.
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .measure import FrameRecord

#: Updates unacknowledged at most, whatever the estimates say.
MAX_IN_FLIGHT = 8
#: Round-trip samples older than this are forgotten (routes change).
RTT_WINDOW = 10.0
#: An update unacknowledged this long is written off (no sample taken): a
#: client that announced fences and stopped answering them gets an update
#: this often instead of none, and a link this slow is no worse off.
GIVE_UP_AFTER = 5.0
#: Delivery-rate samples kept; the estimate is their maximum, as in BBR: a
#: sample can only underestimate the link (the sender may have been idle).
RATE_SAMPLES = 16


@dataclass
class InFlight:
    """An update the client has not acknowledged yet."""

    fence_id: int
    version: int
    size: int
    #: Total bytes written to the client once this update is out.
    end_bytes: int
    #: perf_counter when its first byte was written.
    sent_at: float
    #: Seconds it waited for the congestion window before that.
    waited: float
    #: Its entry in the bottleneck counts, decided by the acknowledgement.
    record: FrameRecord | None = None
    #: The frame version whose client_time the API's frame stats await.
    tracked_version: int | None = None


@dataclass(frozen=True)
class Delivery:
    """An acknowledged update: how long the link took with it."""

    update: InFlight
    rtt: float
    #: Seconds beyond the base round trip from ready-to-send to acknowledged:
    #: the network's share of the update's latency.
    delay: float


class Congestion:
    """One client's view of the link, from fence acknowledgements."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval = interval
        self._clock = clock
        self._in_flight: deque[InFlight] = deque()
        self.acked_bytes = 0
        self._rtts: deque[tuple[float, float]] = deque(maxlen=256)
        self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)
        self._last_ack: float | None = None

    # -- estimates -----------------------------------------------------------------

    @property
    def base_rtt(self) -> float | None:
        """The smallest round trip of the last RTT_WINDOW seconds."""
        cutoff = self._clock() - RTT_WINDOW
        while len(self._rtts) > 1 and self._rtts[0][0] < cutoff:
            self._rtts.popleft()
        return min(r for _, r in self._rtts) if self._rtts else None

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second the client absorbs, at least (None: no sample)."""
        return max(self._rates) if self._rates else None

    @property
    def in_flight(self) -> int:
        """Updates sent and not acknowledged."""
        return len(self._in_flight)

    def unacked_bytes(self, bytes_sent: int) -> int:
        return max(0, bytes_sent - self.acked_bytes)

    def can_send(self, bytes_sent: int) -> bool:
        """Whether another update may go now. With nothing in flight it
        always may; until the first acknowledgement, one at a time."""
        now = self._clock()
        while self._in_flight and now - self._in_flight[0].sent_at > GIVE_UP_AFTER:
            written_off = self._in_flight.popleft()
            self.acked_bytes = max(self.acked_bytes, written_off.end_bytes)
        if not self._in_flight:
            return True
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return False
        bandwidth = self.bandwidth
        if bandwidth is None:
            return False
        return self.unacked_bytes(bytes_sent) / bandwidth <= self.interval

    # -- events --------------------------------------------------------------------

    def sent(self, update: InFlight) -> None:
        self._in_flight.append(update)

    def rtt_sample(self, rtt: float) -> None:
        """A round trip measured without an update (the idle-time fence)."""
        self._rtts.append((self._clock(), rtt))

    def acknowledged(self, fence_id: int) -> Delivery | None:
        """The fence after an update came back: the client has processed the
        update and everything before it."""
        while self._in_flight and self._in_flight[0].fence_id != fence_id:
            if self._in_flight[0].fence_id > fence_id:
                return None  # not one of ours, or already counted
            self._in_flight.popleft()  # answered out of order: count as done
        if not self._in_flight:
            return None
        update = self._in_flight.popleft()
        now = self._clock()
        rtt = now - update.sent_at
        delivered = update.end_bytes - self.acked_bytes
        self.acked_bytes = max(self.acked_bytes, update.end_bytes)
        # The link was busy with these bytes from when the first of them was
        # written, or from the previous acknowledgement if that came later.
        start = update.sent_at if self._last_ack is None else max(update.sent_at, self._last_ack)
        self._last_ack = now
        if delivered > 0 and now > start:
            self._rates.append(delivered / (now - start))
        self._rtts.append((now, rtt))
        base = self.base_rtt or 0.0
        delay = max(0.0, update.waited + rtt - base)
        return Delivery(update, rtt, delay)

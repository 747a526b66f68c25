# Failed logins limited per peer address, so that guessing passwords over HTTP
# Basic or VeNCrypt is slow. KasmVNC has no such limit (reference/protocol.md
# B.10); the API answers 429 or 401 while an address is blocked.
from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

__all__ = ["LoginRateLimiter", "peer_key"]


def peer_key(addr: str) -> str:
    """The unit that is limited: an IPv4 address, or an IPv6 /64 (one host
    usually owns a whole /64, so single IPv6 addresses would be free to rotate).
    Anything that is not an IP address (a Unix socket path, a host name) is
    used as it is."""
    host = addr
    # "[::1]:5900" and "1.2.3.4:5900" as some servers report peers.
    if host.startswith("[") and "]" in host:
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _PeerState:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class LoginRateLimiter:
    """After `max_failures` failed logins within `window` seconds an address
    is blocked for `lockout` seconds; a success forgets its failures.

    At most `max_tracked` addresses are remembered; past that the one whose
    last failure is oldest is forgotten, so a flood of addresses costs bounded
    memory. The limiter is not thread-safe: use it from the trio thread.

    Checking a password takes a worker thread a few milliseconds, so
    attempts that arrive together would all pass `blocked` before the first
    failure is counted. Callers therefore check inside `attempt(addr)`,
    which lets one attempt per address run at a time: the sixth of twenty
    simultaneous wrong guesses finds the address blocked, as if they had
    come one after another."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        lockout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 10_000,
    ) -> None:
        if max_failures < 1 or max_tracked < 1:
            raise ValueError("max_failures and max_tracked must be at least 1")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_tracked = max_tracked
        self._clock = clock
        # Ordered by last failure, oldest first.
        self._peers: OrderedDict[str, _PeerState] = OrderedDict()
        # Per address: the lock of `attempt` and how many tasks hold or wait
        # for it (the entry goes when none do, so idle addresses cost nothing).
        self._attempts: dict[str, tuple[trio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def blocked(self, addr: str) -> float:
        """Seconds until `addr` may try again; 0 if it may try now."""
        state = self._peers.get(peer_key(addr))
        if state is None:
            return 0.0
        return max(0.0, state.blocked_until - self._clock())

    def failure(self, addr: str) -> None:
        key = peer_key(addr)
        now = self._clock()
        state = self._peers.get(key)
        if state is None:
            state = self._peers[key] = _PeerState()
            while len(self._peers) > self.max_tracked:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(key)
        if state.blocked_until > now:
            # Attempts while blocked are refused before checking a password;
            # one that gets here anyway does not extend the block.
            return
        failures = state.failures
        failures.append(now)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) >= self.max_failures:
            state.blocked_until = now + self.lockout
            failures.clear()

    def success(self, addr: str) -> None:
        self._peers.pop(peer_key(addr), None)

    @asynccontextmanager
    async def attempt(self, addr: str) -> AsyncIterator[None]:
        """Hold this while checking `blocked`, verifying a password and
        reporting `failure` or `success`: attempts from one address (one
        `peer_key`) take turns, so concurrency cannot outrun the limit."""
        key = peer_key(addr)
        entry = self._attempts.get(key)
        if entry is None:
            entry = self._attempts[key] = (trio.Lock(), [0])
        lock, holders = entry
        holders[0] += 1
        try:
            async with lock:
                yield
        finally:
            holders[0] -= 1
            if not holders[0]:
                del self._attempts[key]

"""A network fuzzer against a running server: many concurrent loopback
connections sending random bytes, valid sessions, mutated valid sessions and
sessions cut off mid-message, some of them not reading, some half-closing.
Afterwards a clean client must still get a full, exact framebuffer update,
every session must be gone, and nothing may have reached the server's
nursery (the `nursery` fixture would raise).

`TRIVNC_FUZZ_EXAMPLES=N` sends N sessions instead of 120, from a fresh seed
(printed, and set with TRIVNC_FUZZ_SEED to repeat a run)."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
from collections.abc import AsyncIterator
from contextlib import suppress
from types import FrameType

import fuzz_harness as h
import fuzz_protocol
import numpy as np
import pytest
import trio

import trivnc
from trivnc.rfb.connection import Limits
from trivnc.rfb.constants import Encoding
from trivnc.server import Server
from trivnc.sources.array import ArraySource
from trivnc.testing.aclient import open_test_client
from trivnc.testing.images import desktop_like

W, H = 160, 100
FUZZ_EXAMPLES = int(os.environ.get("TRIVNC_FUZZ_EXAMPLES", "0"))
SESSIONS = FUZZ_EXAMPLES or 120
SEED = int(
    os.environ.get("TRIVNC_FUZZ_SEED") or (random.randrange(1 << 32) if FUZZ_EXAMPLES else 20240611)
)
PARALLEL = 30
#: What the receive loop may hold unparsed: the longest message the default
#: limits allow, plus one read.
BUFFER_BOUND = h.max_message_size(Limits()) + 65536


#: A heartbeat later than this counts as a stall of the event loop; after
#: STALL_ALARM seconds without one, SIGALRM breaks into whatever hogs the loop.
STALL_LIMIT = 1.0
STALL_ALARM = 1.5


class LoopStalled(Exception):
    """Raised by SIGALRM in whatever code holds the event loop."""


@pytest.fixture
async def stalls(nursery: trio.Nursery) -> AsyncIterator[list[float]]:
    """Gaps in a 10 ms heartbeat longer than STALL_LIMIT: a task that never
    reaches a checkpoint freezes every connection, not just its own."""
    found: list[float] = []

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        found.append(math.inf)
        raise LoopStalled(f"no heartbeat for {STALL_ALARM} s")

    async def heartbeat() -> None:
        last = trio.current_time()
        while True:
            signal.setitimer(signal.ITIMER_REAL, STALL_ALARM)
            await trio.sleep(0.01)
            now = trio.current_time()
            if now - last > STALL_LIMIT:
                found.append(now - last)
            last = now

    scope = trio.CancelScope()

    async def beating() -> None:
        with scope:
            await heartbeat()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    nursery.start_soon(beating)
    try:
        yield found
    finally:
        scope.cancel()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
async def source() -> ArraySource:
    return ArraySource.from_array(desktop_like(W, H, seed=11), name="fuzz desk")


@pytest.fixture
async def server(nursery: trio.Nursery, source: ArraySource) -> AsyncIterator[Server]:
    config = trivnc.Config(
        source=source, rfb_port=0, insecure_no_auth=True, handshake_timeout=1, listen=["127.0.0.1"]
    )
    yield await nursery.start(trivnc.serve, config)


def client_streams(rng: random.Random, count: int) -> list[bytes]:
    """Random, valid, mutated and cut-off client byte streams (None security,
    the only type this server offers)."""
    std = fuzz_protocol.standard_messages(h)
    kasm = fuzz_protocol.kasm_messages(h)
    words = std + kasm
    valid = [
        h.handshake(h.version_string(minor), "none", shared=True) + b"".join(std)
        for minor in (3, 7, 8)
    ]
    pool = list(valid)
    out = []
    for i in range(count):
        kind = i % 6
        base = rng.choice(valid)
        if kind == 0:  # noise, with or without a version in front
            data = rng.choice([b"", h.version_string(8)]) + rng.randbytes(rng.randint(0, 2000))
        elif kind == 1:  # a valid session, messages shuffled and repeated
            msgs = rng.choices(std, k=rng.randint(1, 40))
            data = h.handshake(h.version_string(8), "none") + b"".join(msgs)
        elif kind in (2, 3):  # mutated
            data = fuzz_protocol.mutate(base, rng, pool, words)
        elif kind == 4:  # cut off mid-message
            data = base[: rng.randrange(len(base))]
        else:  # the Kasm dialect's messages, which standard RFB does not know
            data = h.handshake(h.version_string(8), "none") + b"".join(rng.choices(kasm, k=5))
        out.append(data)
    return out


async def play(port: int, data: bytes, rng: random.Random) -> None:
    """Send `data` in random pieces, then read, linger, half-close or just go."""
    ending = rng.choice(["close", "read", "linger", "eof"])
    drip = rng.random() < 0.2
    with (
        trio.move_on_after(5),
        suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            pos = 0
            while pos < len(data):
                size = rng.choice([1, 7, 100, 1500, 65536])
                await stream.send_all(data[pos : pos + size])
                pos += size
                if drip:
                    await trio.sleep(0.001)
            if ending == "eof":
                await stream.send_eof()
            if ending in ("read", "eof"):
                with trio.move_on_after(0.5):
                    while await stream.receive_some(65536):
                        pass
            elif ending == "linger":
                await trio.sleep(rng.random() * 0.3)


async def test_fuzzed_sessions_leave_the_server_serving(
    server: Server, source: ArraySource, stalls: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trivnc")
    print(f"network fuzz: {SESSIONS} sessions, TRIVNC_FUZZ_SEED={SEED}")
    rng = random.Random(SEED)
    streams = client_streams(rng, SESSIONS)
    largest = 0
    limiter = trio.CapacityLimiter(PARALLEL)

    async def one(data: bytes, seed: int) -> None:
        async with limiter:
            await play(server.rfb_port, data, random.Random(seed))

    async def watch() -> None:
        nonlocal largest
        while True:
            for session in list(server.sessions):
                largest = max(largest, len(session.conn._buffer))
            await trio.sleep(0.002)

    with trio.fail_after(30 + SESSIONS / 10):
        async with trio.open_nursery() as clients:
            clients.start_soon(watch)
            async with trio.open_nursery() as players:
                for data in streams:
                    players.start_soon(one, data, rng.randrange(1 << 32))
            clients.cancel_scope.cancel()
    assert largest <= BUFFER_BOUND

    # A well-behaved viewer gets the whole desktop, exactly.
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=[Encoding.RAW]) as viewer:
        shot = await viewer.screenshot()
        assert viewer.size == (W, H)
        assert np.array_equal(shot[..., :3], source.pixels[..., :3])

    with trio.fail_after(5):
        while server.sessions:
            await trio.sleep(0.01)

    assert not stalls, f"the event loop stalled: {stalls}"
    closed = [r for r in caplog.records if "connection closed" in r.getMessage()]
    assert len(closed) >= SESSIONS  # every fuzzed connection was seen through
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _clean_viewer_gets_the_desktop(server: Server, source: ArraySource) -> None:
    async with open_test_client("127.0.0.1", server.rfb_port, encodings=[Encoding.RAW]) as viewer:
        shot = await viewer.screenshot()
        assert np.array_equal(shot[..., :3], source.pixels[..., :3])


@pytest.mark.parametrize(
    "rects",
    [
        [(True, 0, 0, 0, 0)],  # an empty rect
        [(False, 0, 0, 64, 64), (True, 0, 0, 64, 64)],  # a clean area, dirt elsewhere
    ],
    ids=["empty", "clean-area"],
)
async def test_update_requests_for_nothing_do_not_stall_the_server(
    server: Server,
    source: ArraySource,
    stalls: list[float],
    rects: list[tuple[bool, int, int, int, int]],
) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server.rfb_port) as stream:
        await stream.send_all(h.handshake(h.version_string(8), "none") + h.set_encodings([0]))
        for rect in rects:
            await stream.send_all(h.update_request(*rect))
            with trio.move_on_after(0.3):
                while await stream.receive_some(65536):
                    pass
        with trio.fail_after(5):
            await _clean_viewer_gets_the_desktop(server, source)
    assert not stalls, f"the event loop stalled: {stalls}"

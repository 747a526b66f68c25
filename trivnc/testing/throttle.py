"""A TCP proxy that behaves like a slow link, for tests and benchmarks.

Server-to-client bytes pass at most `rate` bytes per second through a small
link buffer, the way a real bottleneck link queues them: the proxy stops
reading from the server while the buffer is full, so the server's socket
fills and its writes block, exactly as over a slow network. Each direction
can also be delayed by a fixed latency. Client-to-server bytes pass
unthrottled (with the latency).

Embedded in a trio program::

    async with throttling_proxy("127.0.0.1", server_port, rate=2_000_000) as proxy:
        connect to ("127.0.0.1", proxy.port)

From a shell (for benchmarks against other servers)::

    python -m trivnc.testing.throttle --target 127.0.0.1:5900 --rate 2000000
"""

from __future__ import annotations

import argparse
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import trio

#: Bytes moved per step; small enough that pacing is smooth at low rates.
CHUNK = 16384


class ThrottlingProxy:
    """Listens on a loopback port and forwards each connection to the target.

    rate: server-to-client bytes per second (None: unlimited).
    latency: seconds added to each direction.
    link_buffer: bytes the "link" holds before the proxy stops reading from
    the server (a router's queue); the server sees back-pressure beyond it.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rate: float | None = None,
        latency: float = 0.0,
        link_buffer: int = 65536,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self.target = (target_host, target_port)
        self.rate = rate
        self.latency = latency
        self.link_buffer = link_buffer
        self.listen = (listen_host, listen_port)
        self.port = 0
        #: Server-to-client bytes delivered, over all connections.
        self.delivered = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            # Either side closing ends the connection.
            nursery.start_soon(self._pipe, server, client, self.rate, nursery.cancel_scope)
            nursery.start_soon(self._pipe, client, server, None, nursery.cancel_scope)

    async def _pipe(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        rate: float | None,
        done: trio.CancelScope,
    ) -> None:
        # A reader puts (due time, bytes) into a bounded queue, the link; the
        # writer sends each piece at its due time. The queue's byte bound is
        # the link buffer: the reader waits while it is full.
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        room = trio.Semaphore(max(1, self.link_buffer // CHUNK))
        free_at = trio.current_time()

        async def reader() -> None:
            nonlocal free_at
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                while True:
                    await room.acquire()
                    data = await src.receive_some(CHUNK)
                    if not data:
                        break
                    now = trio.current_time()
                    if rate is not None:
                        # Serialisation: the link sends one piece after another.
                        free_at = max(free_at, now) + len(data) / rate
                        due = free_at + self.latency
                    else:
                        due = now + self.latency
                    await send.send((due, data))
            await send.aclose()

        async def writer() -> None:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await dst.send_all(data)
                    if rate is not None:
                        self.delivered += len(data)
                    room.release()

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            inner.start_soon(writer)
        done.cancel()


@asynccontextmanager
async def throttling_proxy(
    target_host: str,
    target_port: int,
    *,
    rate: float | None = None,
    latency: float = 0.0,
    link_buffer: int = 65536,
) -> AsyncIterator[ThrottlingProxy]:
    """Run a ThrottlingProxy for the duration of the block."""
    proxy = ThrottlingProxy(
        target_host, target_port, rate=rate, latency=latency, link_buffer=link_buffer
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    parser.add_argument("--rate", type=float, help="server-to-client bytes per second")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each way")
    parser.add_argument("--link-buffer", type=int, default=65536, help="bytes")
    args = parser.parse_args(argv)
    listen_host, listen_port = _address(args.listen)
    proxy = ThrottlingProxy(
        *_address(args.target),
        rate=args.rate,
        latency=args.latency,
        link_buffer=args.link_buffer,
        listen_host=listen_host,
        listen_port=listen_port,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            print(f"listening on {listen_host}:{port}", flush=True)

    with suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()

"""The client side of RFB over WebSocket for tests and benchmarks: a
trio_websocket connection as the byte stream that `wrap_stream` and the
benchmark viewers read and write (message boundaries carry no meaning)."""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection


class WebSocketByteStream(trio.abc.Stream):
    """Binary WebSocket messages as one byte stream. A closed WebSocket reads
    as end of stream and fails writes with BrokenResourceError, as a socket
    would; a text message is a broken peer (RFB travels in binary messages)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.buffer = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.ws.send_message(bytes(data))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("WebSocket closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.buffer:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return b""
            if not isinstance(message, bytes):
                raise trio.BrokenResourceError("a text message: RFB travels in binary messages")
            self.buffer = message
        n = len(self.buffer) if max_bytes is None else max_bytes
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def aclose(self) -> None:
        await self.ws.aclose()

# RFB over WebSocket (protocol.md B.7.6): every RFB byte travels in binary
# messages whose boundaries mean nothing. This adapter makes a Quart websocket
# look like a trio Stream, so a ClientSession serves a browser exactly as it
# serves a TCP viewer.
from __future__ import annotations

from contextlib import suppress
from typing import Any

import trio


class WebSocketStream(trio.abc.Stream):
    """A trio Stream over an accepted Quart websocket."""

    def __init__(self, websocket: Any, *, max_message: int = 1 << 24) -> None:
        self._ws = websocket
        self._pending = bytearray()
        self._closed = False
        self._max_message = max_message

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("websocket closed")
        try:
            await self._ws.send(bytes(data))
        except Exception as exc:  # the ASGI layer raises its own types on a closed socket
            raise trio.BrokenResourceError(f"websocket send failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("websocket closed")
        while not self._pending:
            try:
                message = await self._ws.receive()
            except trio.Cancelled:
                raise
            except Exception:
                return b""  # the peer went away: end of stream
            if isinstance(message, str):
                # Text frames carry nothing in RFB-over-WebSocket (the legacy
                # base64 subprotocol is refused at the handshake).
                continue
            if len(message) > self._max_message:
                raise trio.BrokenResourceError("websocket message too large")
            self._pending += message
        n = len(self._pending) if max_bytes is None else min(max_bytes, len(self._pending))
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with suppress(Exception):  # already closed by the peer or the server
            await self._ws.close(1000)
        await trio.lowlevel.checkpoint()

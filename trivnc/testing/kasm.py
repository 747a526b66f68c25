"""A test client that behaves like KasmVNC's web client (kasmtech/noVNC), from
the protocol facts in protocol.md B.7: RFB over a WebSocket that offers the
"binary" subprotocol, HTTP Basic authentication and RFB security None, then,
right after ServerInit, SetPixelFormat (R,G,B,X bytes), VideoEncodersRequest
(184), SetEncodings with KasmVNC's pseudo-encodings, and a non-incremental
request for the whole screen. It speaks the Kasm dialect (11-byte pointer
events with scroll deltas, messages 178-185 and 252), decodes Tight with
JPEG, WebP and QOI rects (trivnc.testing.decode), and, like the web client,
answers a RequestFrameStats (179) with FrameStats once it has processed the
next FramebufferUpdate.

    async with open_kasm_client(url, "user", "password", ssl_context=ctx) as c:
        shot = await c.screenshot()
        stats = await c.request_stats()
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

from trio_websocket import open_websocket_url

from ..rfb.constants import Encoding, PseudoEncoding
from ..rfb.pixelformat import RGBX
from .aclient import DEFAULT_TIMEOUT, VncClient, wrap_stream
from .client import Event, FramebufferUpdate, KasmRequestFrameStats, KasmStats
from .websocket import WebSocketByteStream

__all__ = [
    "KASM_ENCODINGS",
    "KASM_PIXEL_FORMAT",
    "STREAMING_MODE_JPEG_WEBP",
    "KasmClient",
    "kasm_encodings",
    "open_kasm_client",
]

#: What KasmVNC's web client asks for after ServerInit: 32 bpp, depth 24,
#: little endian, shifts R 0, G 8, B 16 (memory bytes R, G, B, X).
KASM_PIXEL_FORMAT: Final = RGBX
#: The still-image streaming mode, the one the web client always offers.
STREAMING_MODE_JPEG_WEBP: Final = PseudoEncoding.KASM_STREAMING_MODE_JPEG_WEBP


def kasm_encodings(
    *,
    quality: int = 6,
    compress: int = 2,
    webp: bool = True,
    qoi: bool = False,
    frame_rate: int | None = 60,
    dynamic_quality: tuple[int, int] | None = (4, 9),
    treat_lossless: int | None = 7,
    jpeg_video_quality: int | None = 5,
    webp_video_quality: int | None = 5,
    video_area: int | None = 65,
    video_time: int | None = 5,
    video_out_time: int | None = 3,
    video_scaling: int | None = 2,
    prefer_bandwidth: bool = False,
) -> list[int]:
    """A SetEncodings list in the web client's order (protocol.md B.7.1):
    real encodings, standard pseudo-encodings, WebP/QOI, the Kasm quality and
    video knobs, the streaming mode, PreferBandwidth last."""
    out: list[int] = [Encoding.COPY_RECT, Encoding.TIGHT, Encoding.TIGHT_PNG]
    out += [Encoding.HEXTILE, Encoding.RRE, Encoding.RAW]
    out += [-32 + quality, -256 + compress]
    out += [
        PseudoEncoding.DESKTOP_SIZE,
        PseudoEncoding.LAST_RECT,
        PseudoEncoding.QEMU_EXTENDED_KEY_EVENT,
        PseudoEncoding.EXTENDED_DESKTOP_SIZE,
        PseudoEncoding.FENCE,
        PseudoEncoding.DESKTOP_NAME,
        PseudoEncoding.KASM_DISCONNECT_NOTIFY,
    ]
    if webp:
        out.append(PseudoEncoding.KASM_WEBP)
    if qoi:
        out.append(PseudoEncoding.KASM_QOI)
    if jpeg_video_quality is not None:
        out.append(-1023 + jpeg_video_quality)
    if webp_video_quality is not None:
        out.append(-1013 + webp_video_quality)
    if treat_lossless is not None:
        out.append(-1003 + treat_lossless)
    if dynamic_quality is not None:
        out += [-991 + dynamic_quality[0], -981 + dynamic_quality[1]]
    if video_area is not None:
        out.append(-971 + video_area - 1)
    if video_time is not None:
        out.append(-870 + video_time)
    if video_out_time is not None:
        out.append(-1986 + video_out_time - 1)
    if video_scaling is not None:
        out.append(-1996 + video_scaling)
    if frame_rate is not None:
        out.append(-2048 + frame_rate - 10)
    out.append(STREAMING_MODE_JPEG_WEBP)
    if prefer_bandwidth:
        out.append(PseudoEncoding.KASM_PREFER_BANDWIDTH)
    return out


#: The default list (WebP on, QOI off, as the web client's defaults).
KASM_ENCODINGS: Final[tuple[int, ...]] = tuple(kasm_encodings())


class KasmClient(VncClient):
    """VncClient in the kasm dialect that also does what the web client does
    on its own: a FrameStats (179) reply after the update that follows the
    server's RequestFrameStats."""

    #: The value the web client sends in FrameStats' first field (its fps).
    reported_fps = 60
    #: FrameStats replies sent so far.
    frame_stats_sent = 0
    _track_frame = False

    #: Updates KasmVNC's web client would have decoded and never shown: it
    #: draws an update only when it counted more than one rect in it, LastRect
    #: included (kasmtech/noVNC core/rfb.js, _framebufferUpdate -> flip).
    unshown_updates = 0

    def _publish(self, event: Event) -> None:
        if isinstance(event, FramebufferUpdate):
            drawn = len(event.pixel_rects) + (1 if event.last_rect else 0)
            if event.pixel_rects and drawn <= 1:
                self.unshown_updates += 1
        if isinstance(event, KasmRequestFrameStats):
            self._track_frame = True
        elif isinstance(event, FramebufferUpdate) and self._track_frame:
            self._track_frame = False
            self.frame_stats_sent += 1
            self._queue(self.conn.kasm_frame_stats(self.reported_fps, 0))
        super()._publish(event)

    async def scroll(self, x: int, y: int, dx: int, dy: int, buttons: int = 0) -> None:
        """A pointer event carrying scroll deltas (KasmVNC's 11-byte form)."""
        await self.pointer(x, y, buttons, scroll_x=dx, scroll_y=dy)

    async def request_stats(self, timeout: float = DEFAULT_TIMEOUT) -> list[float]:  # noqa: ASYNC109
        """RequestStats (178) and the server's bottleneck scores in reply:
        [cpu_recent, cpu_total, net_recent, net_total]."""
        await self.send(self.conn.kasm_request_stats())
        reply = await self.wait_for(KasmStats, timeout)
        text = reply.text.strip()
        if not (text.startswith("[") and text.endswith("]")):
            raise ValueError(f"stats are not a list: {text!r}")
        return [float(v) for v in text[1:-1].split(",")]

    async def keep_alive(self) -> None:
        await self.send(self.conn.kasm_keep_alive())

    async def clipboard(self, items: Sequence[tuple[str, bytes]]) -> None:
        """BinaryClipboard (180) with any (mime type, data) items."""
        await self.send(self.conn.kasm_binary_clipboard(items))

    async def set_max_video_resolution(self, width: int, height: int) -> None:
        await self.send(self.conn.kasm_set_max_video_resolution(width, height))


def basic_authorization(username: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


@asynccontextmanager
async def open_kasm_client(
    url: str,
    username: str,
    password: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    encodings: Sequence[int] = KASM_ENCODINGS,
    video_encoders: Sequence[int] = (STREAMING_MODE_JPEG_WEBP,),
    subprotocols: Sequence[str] = ("binary",),
    shared: bool = True,
    request_screen: bool = True,
    handshake_timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[KasmClient]:
    """Connect to `url` (wss://host:port/websockify) as the web client does
    and yield the client, its first full-screen request sent (unless
    `request_screen` is false)."""
    headers = [(b"Authorization", basic_authorization(username, password))]
    async with (
        open_websocket_url(
            url,
            ssl_context=ssl_context,
            subprotocols=list(subprotocols),
            extra_headers=headers,
            message_queue_size=256,
        ) as ws,
        wrap_stream(
            WebSocketByteStream(ws),
            encodings=encodings,
            pixel_format=KASM_PIXEL_FORMAT,
            shared=shared,
            dialect="kasm",
            kasm_video_encoders=video_encoders,
            handshake_timeout=handshake_timeout,
            client_class=KasmClient,
        ) as client,
    ):
        assert isinstance(client, KasmClient)
        if request_screen:
            await client.send(client.conn.framebuffer_update_request(False))
        yield client

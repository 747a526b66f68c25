# One client connection: a trio nursery with a receive task, a send task and a
# measurement task (the design card's shape). The receive task turns bytes into
# protocol events and acts on them without ever blocking on the send side; the
# send task is the only writer of the stream; the measurement task times fence
# round trips. Update logic follows RFC 6143 section 7.5.3 and rfbproto
# "FramebufferUpdateRequest", "EnableContinuousUpdates", "ExtendedDesktopSize".
from __future__ import annotations

import errno
import itertools
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from ..framebuffer.damage import TILE, TileMask, full_mask, mask_to_rects
from ..framebuffer.service import MAX_HINTS, Frame
from ..geometry import Rect
from ..rfb import events as ev
from ..rfb import writers
from ..rfb.connection import NEED_DATA, Dialect, ServerConnection, State
from ..rfb.constants import (
    ClipboardFlags,
    DesktopSizeReason,
    DesktopSizeStatus,
    FenceFlags,
    PseudoEncoding,
)
from ..rfb.errors import ProtocolError
from ..sources.base import CursorImage, Pixels
from . import copyrect, kasm
from .adapt import DynamicQuality, VideoDetector
from .congestion import Congestion, InFlight
from .encoding import EncodeStats, SessionEncoders, encode_rects
from .measure import BottleneckTracker

if TYPE_CHECKING:
    from .server import ServerContext

log = logging.getLogger("trivnc.session")

_session_ids = itertools.count(1)
RECEIVE_SIZE = 65536
#: Fence payloads the measurement task sends start with this tag.
_FENCE_TAG = b"trivnc-rtt"
#: Writes go out in pieces of at most this size; each must be accepted
#: within the send timeout.
SEND_PIECE = 65536
#: What a queued ExtendedDesktopSize reply counts for in pending output.
_EDS_REPLY_SIZE = 64


class SendTimeout(Exception):
    """The client accepted no data for the configured send timeout."""


@dataclass
class SessionStats:
    """What the measurement task and the send task observe of one client."""

    connected_at: float = field(default_factory=time.time)
    bytes_sent: int = 0
    bytes_received: int = 0
    #: Updates sent, and frames coalesced into them (published while this
    #: client was still busy with an earlier one): frames produced for it
    #: are updates_sent + frames_coalesced.
    updates_sent: int = 0
    frames_coalesced: int = 0
    rects_sent: int = 0
    last_update_version: int = 0
    rtt: float | None = None  # seconds, the latest fence round trip
    min_rtt: float | None = None
    #: (send time, bytes_sent at that time, tracked frame version) of fences
    #: in flight, by id.
    fences: dict[int, tuple[float, int, int | None]] = field(default_factory=dict)
    #: (time acknowledged, bytes acknowledged) history, for bandwidth.
    acked: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))

    def bandwidth(self) -> float | None:
        """Bytes per second the client actually absorbed, from fence acks."""
        if len(self.acked) < 2:
            return None
        (t0, b0), (t1, b1) = self.acked[0], self.acked[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None


class ClientSession:
    """The server side of one viewer."""

    def __init__(
        self,
        context: ServerContext,
        stream: trio.abc.Stream,
        conn: ServerConnection,
        peer: str,
        *,
        can_write: bool = True,
        transport: str = "tcp",
    ) -> None:
        self.id = next(_session_ids)
        self.context = context
        self.transport = transport
        host = peer.rsplit(":", 1)[0].strip("[]")
        #: KasmVNC's connection id shape: "ip_seconds.micros::websocket".
        self.connection_id = f"{host}_{time.time():.6f}::{transport}"
        config = context.config
        self.bottleneck = BottleneckTracker(config.max_frame_rate)
        #: Frames per second this client gets at most (the server's cap, or
        #: less if a KasmVNC client asks for less).
        self.frame_rate = config.max_frame_rate
        self.congestion = Congestion(1.0 / config.max_frame_rate)
        self.quality = DynamicQuality(config.quality_min, 9)
        self.video = VideoDetector(config.video_settings())
        #: When the update now due first had to wait for the congestion
        #: window (None: not waiting).
        self._window_wait_since: float | None = None
        self._next_update_at = 0.0
        #: trio time at which the send task must look again though nothing
        #: pokes it (a per-client frame-rate cap is holding an update back).
        self._wake_at: float | None = None
        self._dynamic = False
        #: Armed by the frame-stats API: time the processing of the first
        #: update of this frame version or a later one.
        self.track_frame: int | None = None
        #: Frame version -> seconds from sending its update to the client's
        #: fence reply (the client processed it).
        self.client_times: dict[int, float] = {}
        self.client_time_event = trio.Event()
        #: KasmVNC dialect state (trivnc.server.kasm), and the largest size
        #: its client wants video-mode images at (message 252), if it said.
        self.kasm = kasm.KasmState()
        self.max_video_resolution: tuple[int, int] | None = None
        #: (encode start, encode end) of the update being sent, perf_counter.
        self._encode_span = (0.0, 0.0)
        self._scaling_time = 0.0
        self.stream = stream
        self.conn = conn
        self.peer = peer
        self.can_write = can_write
        #: Read permission; losing it (the API demoted the user) ends the session.
        self.can_read = True
        self.username: str | None = None
        self.stats = SessionStats()
        self.encoders = SessionEncoders()
        self.cancel_scope = trio.CancelScope()
        self.close_reason = "closed"
        # Update state, owned by the receive task (written) and send task (read).
        self._request_pending = False
        self._requested = Rect(0, 0, 0, 0)
        self._full_area: Rect | None = None
        self._sent_version = 0
        #: Tiles changed since the last update that this client has not had
        #: (changes outside the area it asked for wait here).
        self._dirty: TileMask | None = None
        #: Damage rects that cover every changed pixel in the dirty tiles
        #: (None: unknown, send whole tiles); updates are cut to them.
        self._hints: list[Rect] | None = None
        #: The size the client was told (it clips what we send) and the last
        #: size we acted on (differs when the client cannot be told).
        self._client_size: tuple[int, int] | None = None
        self._known_size: tuple[int, int] | None = None
        self._eds_due = False
        #: ExtendedDesktopSize replies owed: (reason, status, the size they
        #: must carry, or None for "whatever the size is now").
        self._eds_replies: list[
            tuple[DesktopSizeReason, DesktopSizeStatus, tuple[int, int] | None]
        ] = []
        self._pseudo_due: list[bytes] = []
        #: Messages for the send task: (kind, bytes); a message of a kind
        #: replaces a queued one of the same kind.
        self._control: list[tuple[str | None, bytes]] = []
        #: Protocol replies (fence replies, EndOfContinuousUpdates, caps) taken
        #: from the connection by the receive task.
        self._replies = bytearray()
        #: Set (and replaced) each time the send task finishes a write.
        self._drained = trio.Event()
        self._over_limit_since: float | None = None
        #: When the write in progress started (None: no write in progress).
        self._send_started: float | None = None
        #: The user whose per-user connection slot this session holds.
        self.user_slot: str | None = None
        self._poke = trio.Event()
        self._fence_ids = itertools.count(1)
        self._unsubscribe: Callable[[], None] | None = None
        self._failed_in_handshake = False
        #: Input this viewer holds, released when it leaves (no stuck keys).
        self._keys_down: set[int] = set()
        self._pointer = (0, 0, 0)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves, errs, or the server stops. Every
        way a connection can end is caught here or in the task that saw it,
        so nothing a client does reaches the server's nursery."""
        try:
            with self.cancel_scope:
                with _ends_connection(self):
                    await self._handshake()
                if self.cancel_scope.cancel_called:
                    return
                self._unsubscribe = self.context.service.subscribe(self.poke)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, self._receive_task)
                    nursery.start_soon(self._guarded, self._send_task)
                    nursery.start_soon(self._guarded, self._measure_task)
        finally:
            self._note_stalled_send()
            if self._unsubscribe is not None:
                self._unsubscribe()
            self.context.sessions.discard(self)
            kasm.user_left(self)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._release_input()
            await self._flush_quietly()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()
            log.info("%s: connection closed (%s)", self.peer, self.close_reason)

    def _note_stalled_send(self) -> None:
        """A session ended from outside while a write had been stuck for the
        send timeout (the kernel dropped the peer under a write that could not
        be cancelled, and the web server cancelled the session): say so."""
        timeout = self.context.config.send_timeout
        started = self._send_started
        stalled = started is not None and trio.current_time() - started >= timeout
        if self.close_reason == "closed" and stalled:
            reason = f"the client accepted no data for {timeout:g} s"
            log.warning("%s: disconnected: %s", self.peer, reason)
            self.close_reason = f"send timed out: {reason}"

    async def _guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        with _ends_connection(self):
            await task()

    async def _release_input(self) -> None:
        """Release the keys and buttons this viewer left pressed."""
        source = self.context.source
        for keysym in sorted(self._keys_down):
            await source.key_event(keysym, False)
        self._keys_down.clear()
        x, y, buttons = self._pointer
        if buttons:
            await source.pointer_event(x, y, 0)
            self._pointer = (x, y, 0)

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self.cancel_scope.cancel()

    def poke(self) -> None:
        """Wake the send task: a frame was published or a request arrived."""
        self._poke.set()

    async def _flush_quietly(self) -> None:
        """Send what the protocol still owes (a failure reason), if it can go
        out within a second."""
        if not self._failed_in_handshake:
            return
        data = self.conn.data_to_send()
        if data:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await self.stream.send_all(data)

    # -- handshake --------------------------------------------------------------------

    async def _handshake(self) -> None:
        with trio.fail_after(self.context.config.handshake_timeout):
            await self.stream.send_all(self.conn.data_to_send())
            while True:
                event = self.conn.next_event()
                out = self.conn.data_to_send()
                if out:
                    await self.stream.send_all(out)
                if event is NEED_DATA:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise trio.BrokenResourceError("client closed during the handshake")
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, ev.AuthenticationSucceeded):
                    if event.username is not None:
                        self.username = event.username
                elif isinstance(event, ev.CredentialsReceived):
                    await self.context.check_credentials(self, event)
                elif isinstance(event, ev.StartTLS):
                    self.stream = await self.context.start_tls(self.stream)
                    self.conn.tls_established()
                elif isinstance(event, ev.ClientInit):
                    frame = await self.context.service.wait_ready()
                    if not event.shared:
                        self.context.disconnect_others(self)
                    self.conn.send_server_init(frame.width, frame.height, self.context.source.name)
                    self._client_size = self._known_size = frame.size
                    self._sent_version = self.stats.last_update_version = frame.version
                    self._dirty = full_mask(*frame.size)
                    self._hints = None
                    await self.stream.send_all(self.conn.data_to_send())
                    self.context.sessions.add(self)
                    kasm.user_joined(self, event.shared)
                    log.info("%s: connected (%s)", self.peer, self.username or "no user")
                    return

    # -- receive ----------------------------------------------------------------------

    async def _receive_task(self) -> None:
        while True:
            # Bytes that came with the handshake's last read are parsed first.
            while (event := self.conn.next_event()) is not NEED_DATA:
                assert isinstance(event, ev.Event)
                await self._handle(event)
            if self.conn.has_data_to_send():
                # Protocol replies (fence, EndOfContinuousUpdates, caps) go out
                # through the send task, the stream's only writer.
                self._replies += self.conn.data_to_send()
                self.poke()
            if self.pending_output() > self.context.config.output_buffer_limit:
                await self._wait_drained()
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                self.close("client disconnected")
                return
            self.stats.bytes_received += len(data)
            self.conn.receive_data(data)

    def pending_output(self) -> int:
        """Bytes queued for this client besides the update being written."""
        return (
            len(self._replies)
            + sum(len(data) for _, data in self._control)
            + sum(len(rect) for rect in self._pseudo_due)
            + _EDS_REPLY_SIZE * len(self._eds_replies)
        )

    async def _wait_drained(self) -> None:
        """Stop reading from a client that does not read: what it sends may
        need replies, and those would pile up here. The measurement task ends
        the session if this lasts (see _check_output_limit)."""
        limit = self.context.config.output_buffer_limit
        while self.pending_output() > limit:
            self.poke()
            await self._drained.wait()

    def _check_output_limit(self) -> None:
        config = self.context.config
        pending = self.pending_output()
        if pending <= config.output_buffer_limit:
            self._over_limit_since = None
            return
        now = trio.current_time()
        if self._over_limit_since is None:
            self._over_limit_since = now
        elif now - self._over_limit_since >= config.send_timeout:
            reason = (
                f"{pending} bytes of output pending (limit {config.output_buffer_limit}) "
                f"for {config.send_timeout:g} s: the client is not reading"
            )
            log.warning("%s: disconnected: %s", self.peer, reason)
            self.close(reason)

    async def _handle(self, event: ev.Event) -> None:
        source = self.context.source
        match event:
            case ev.FramebufferUpdateRequest(incremental=incremental, rect=rect):
                self._request_pending = True
                self._requested = self._requested.union(rect)
                if not incremental:
                    self._full_area = (
                        rect if self._full_area is None else self._full_area.union(rect)
                    )
                    if self.conn.capabilities.extended_desktop_size:
                        self._eds_due = True
                self.poke()
            case ev.SetEncodings():
                self._on_set_encodings()
            case ev.SetPixelFormat():
                self.encoders.pixel_format_changed()
                self._full_area = Rect(0, 0, *self._client_size) if self._client_size else None
            case (
                ev.KeyEvent(keysym=keysym, down=down) | ev.QEMUKeyEvent(keysym=keysym, down=down)
            ) if self.can_write:
                if down:
                    self._keys_down.add(keysym)
                else:
                    self._keys_down.discard(keysym)
                await source.key_event(keysym, down)
            case ev.PointerEvent(x=x, y=y, buttons=buttons, scroll_x=sx, scroll_y=sy) if (
                self.can_write
            ):
                self._pointer = (x, y, buttons)
                await source.pointer_event(x, y, buttons)
                if sx or sy:
                    await source.scroll_event(x, y, sx, sy)
            case ev.ClientCutText(text=text) if self.can_write:
                await self.context.client_clipboard(self, text)
            case ev.ClipboardProvide(text=text) if self.can_write and text is not None:
                await self.context.client_clipboard(self, text)
            case ev.ClipboardRequest(formats=formats) if formats & ClipboardFlags.TEXT:
                text = self.context.clipboard
                if text is not None:
                    payload = writers.clipboard_text_payload(text)
                    self._send_control(
                        writers.clipboard_provide({ClipboardFlags.TEXT: payload}), "provide"
                    )
            case ev.EnableContinuousUpdates():
                self.poke()
            case ev.ClientFence(flags=flags, payload=payload) if not flags & FenceFlags.REQUEST:
                self._on_fence_reply(payload)
            case ev.SetDesktopSize(width=width, height=height) if self.can_write:
                await self._on_set_desktop_size(width, height)
            case ev.SetDesktopSize():
                self._eds_replies.append(
                    (DesktopSizeReason.THIS_CLIENT, DesktopSizeStatus.PROHIBITED, None)
                )
                self.poke()
            case _ if isinstance(event, kasm.EVENTS):
                await kasm.handle(self, event)
            case _:
                pass  # input from read-only users and messages with nothing to do

    def _on_set_encodings(self) -> None:
        caps = self.conn.capabilities
        self.encoders.configure(caps)
        self._adapt_to_client()
        due = []
        if PseudoEncoding.QEMU_EXTENDED_KEY_EVENT in caps.pseudo:
            due.append(writers.empty_pseudo_rect(PseudoEncoding.QEMU_EXTENDED_KEY_EVENT))
        if (
            PseudoEncoding.EXTENDED_MOUSE_BUTTONS in caps.pseudo
            and not self.conn.extended_mouse_buttons
        ):
            due.append(writers.empty_pseudo_rect(PseudoEncoding.EXTENDED_MOUSE_BUTTONS))
        # Once each, however often the client repeats SetEncodings.
        self._pseudo_due += [rect for rect in due if rect not in self._pseudo_due]
        if self.context.cursor is not None:
            self.desktop_cursor(self.context.cursor)
        self.poke()

    def _adapt_to_client(self) -> None:
        """Take the client's quality, frame rate and video knobs (KasmVNC's
        web client sends them as pseudo-encodings) into the adaptive code."""
        caps = self.conn.capabilities
        kasm = caps.kasm
        config = self.context.config
        # Dynamic quality moves the JPEG level between the configured minimum
        # and the client's own level; a KasmVNC client gives both ends.
        self._dynamic = caps.quality_level is not None or kasm.dynamic_quality_max is not None
        high = kasm.dynamic_quality_max
        if high is None:
            high = caps.quality_level if caps.quality_level is not None else 9
        low = kasm.dynamic_quality_min
        if low is None:
            low = min(config.quality_min, high)
        self.quality.configure(low, high)
        rate = config.max_frame_rate
        if kasm.frame_rate is not None:
            rate = min(rate, kasm.frame_rate)
        self.frame_rate = rate
        self.bottleneck.set_frame_rate(rate)
        self.congestion.interval = 1.0 / rate
        video = config.video_settings()
        changes: dict[str, Any] = {}
        if kasm.video_area is not None:
            changes["area"] = kasm.video_area
        if kasm.video_time is not None:
            changes["enter_seconds"] = float(kasm.video_time)
        if kasm.video_out_time is not None:
            changes["leave_seconds"] = float(kasm.video_out_time)
        if kasm.jpeg_video_quality is not None:
            changes["quality"] = kasm.jpeg_video_quality
        self.video.settings = replace(video, **changes)

    def _quality_level(self) -> int | None:
        """The JPEG level for the next update (None: the client's own)."""
        if not self._dynamic:
            return None
        level = self.quality.level
        video_quality = self.video.settings.quality
        if self.video.active and video_quality >= 0:
            level = min(level, video_quality)
        return level

    def _video_scale(self, frame: Frame) -> float:
        """What video-mode images are scaled by: to fit the largest video
        size (the server's, or less if the client sent 252), for KasmVNC's
        web client, which stretches each image back over its rect."""
        if not self.video.active or self.conn.dialect is not Dialect.KASM:
            return 1.0
        max_w, max_h = self.video.settings.max_width, self.video.settings.max_height
        if self.max_video_resolution is not None:
            max_w = min(max_w, self.max_video_resolution[0])
            max_h = min(max_h, self.max_video_resolution[1])
        scale = min(1.0, max_w / frame.width, max_h / frame.height)
        # Steps of 1/16: a size that wobbles would rebuild the encoder.
        return max(1, int(scale * 16)) / 16 if scale < 1.0 else 1.0

    async def _on_set_desktop_size(self, width: int, height: int) -> None:
        ok = 0 < width <= 16384 and 0 < height <= 16384
        done = ok and await self.context.source.set_size(width, height)
        status = (
            DesktopSizeStatus.OK
            if done
            else (DesktopSizeStatus.PROHIBITED if ok else DesktopSizeStatus.INVALID_LAYOUT)
        )
        # A successful reply carries the new size, so it waits for the first
        # frame of that size.
        self._eds_replies.append(
            (DesktopSizeReason.THIS_CLIENT, status, (width, height) if done else None)
        )
        if done:
            self.context.notify_resize_by(self, (width, height))
        self.poke()

    def _send_control(self, data: bytes, kind: str | None = None) -> None:
        """Queue a message for the send task (the stream's only writer). One
        of a `kind` replaces a queued one of that kind, so a client that does
        not read holds the newest clipboard and one bell, not every one."""
        if kind is not None:
            self._control = [(k, d) for k, d in self._control if k != kind]
        self._control.append((kind, data))
        self.poke()

    def desktop_clipboard(self, text: str) -> None:
        """The desktop's clipboard changed: tell this viewer the way it
        understands (Kasm binary clipboard, an Extended Clipboard notify that
        it answers with a request, or old-style Latin-1 cut text)."""
        caps = self.conn.capabilities
        if self.conn.dialect is Dialect.KASM:
            self._send_control(kasm.desktop_clipboard(text), "clipboard")
        elif caps.extended_clipboard:
            self._send_control(writers.clipboard_notify(ClipboardFlags.TEXT), "clipboard")
        else:
            self._send_control(writers.server_cut_text(text), "clipboard")

    def desktop_bell(self) -> None:
        self._send_control(writers.bell(), "bell")

    def desktop_cursor(self, cursor: CursorImage) -> None:
        """Queue the pointer shape for the next update, in the best form the
        client announced: alpha cursor, else the classic cursor with a mask."""
        caps = self.conn.capabilities
        if caps.alpha_cursor:
            rect = writers.alpha_cursor_rect(cursor.hotspot, cursor.rgba)
        elif caps.cursor:
            rect = writers.cursor_rect(
                self.conn.pixel_format, cursor.hotspot, _unpremultiply(cursor.rgba)
            )
        else:
            return
        # Only the newest shape matters.
        self._pseudo_due = [p for p in self._pseudo_due if not _is_cursor_rect(p)]
        self._pseudo_due.append(rect)
        self.poke()

    def resized_by_other(self, size: tuple[int, int]) -> None:
        # Only the newest size another client set matters.
        self._eds_replies = [r for r in self._eds_replies if r[0] != DesktopSizeReason.OTHER_CLIENT]
        self._eds_replies.append((DesktopSizeReason.OTHER_CLIENT, DesktopSizeStatus.OK, size))
        self.poke()

    def _ready_replies(self, frame: Frame) -> list[tuple[DesktopSizeReason, DesktopSizeStatus]]:
        """Take the replies whose size the current frame has; the rest wait."""
        ready: list[tuple[DesktopSizeReason, DesktopSizeStatus]] = []
        waiting: list[tuple[DesktopSizeReason, DesktopSizeStatus, tuple[int, int] | None]] = []
        for reason, status, size in self._eds_replies:
            if size is None or size == frame.size:
                ready.append((reason, status))
            else:
                waiting.append((reason, status, size))
        self._eds_replies = waiting
        return ready

    # -- send -------------------------------------------------------------------------

    def _due(self, frame: Frame) -> bool:
        if self._control or self._replies or self.conn.has_data_to_send():
            return True
        if any(size is None or size == frame.size for _, _, size in self._eds_replies):
            return True
        if not (self._request_pending or self.conn.continuous_updates is not None):
            return False
        if self._pseudo_due or self._eds_due or self._full_area is not None:
            return True
        if frame.size != self._known_size:
            return True
        if frame.version > self._sent_version:
            return True
        return self._request_pending and self._dirty is not None and bool(self._dirty.any())

    async def _send_task(self) -> None:
        service = self.context.service
        while True:
            frame = service.latest
            assert frame is not None
            sent = self._due(frame) and await self._send_pending(frame)
            # Not held while waiting: the source recycles frames nobody holds.
            del frame
            if not sent:
                # Nothing due, or nothing could go (the requested area has no
                # changes yet, while others do; the link is still busy with
                # earlier updates): wait for a new frame, a message or a fence
                # reply, rather than ask again without yielding.
                wake = self._wake_at if self._wake_at is not None else math.inf
                with trio.move_on_at(wake):
                    await self._poke.wait()
                self._poke = trio.Event()

    async def _send_pending(self, frame: Frame) -> bool:
        """Write what is due; False if there was nothing to write."""
        out: list[bytes] = [bytes(self._replies), self.conn.data_to_send()]
        self._replies.clear()
        out += [data for _, data in self._control]
        self._control = []
        sending_update = self._request_pending or self.conn.continuous_updates is not None
        if sending_update or self._eds_replies:
            out += self._size_update(frame, self._ready_replies(frame))
        if sending_update and not self._may_send_update(frame):
            sending_update = False
        update = await self._framebuffer_update(frame) if sending_update else []
        out += kasm.frame_stats_request(self, frame.version) if update else []
        out += update
        if not any(out):
            return False
        fence_id = None
        if update and self.conn.capabilities.fence:
            # Right behind the update: its reply says the client has
            # processed the update (congestion control, client_time).
            fence_id = next(self._fence_ids)
            out.append(self._fence_request(fence_id))
        size = sum(len(chunk) for chunk in out)
        end_bytes = self.stats.bytes_sent + size
        started = time.perf_counter()
        await self._write(out)
        written = time.perf_counter()
        self._drained.set()
        self._drained = trio.Event()
        if update:
            self._update_written(frame, fence_id, size, end_bytes, started, written)
        return True

    def _may_send_update(self, frame: Frame) -> bool:
        """Whether an update may go now: the client's frame-rate cap and the
        congestion window allow it. Notes when an update waits for either."""
        self._wake_at = None
        now = time.perf_counter()
        if now < self._next_update_at:
            self._wake_at = trio.current_time() + (self._next_update_at - now)
            return False
        if self.conn.capabilities.fence and not self.congestion.can_send(self.stats.bytes_sent):
            if self._window_wait_since is None and frame.version > self._sent_version:
                self._window_wait_since = now
            return False
        return True

    def _update_written(
        self,
        frame: Frame,
        fence_id: int | None,
        size: int,
        end_bytes: int,
        started: float,
        written: float,
    ) -> None:
        """Book an update the socket took: bottleneck counts, the congestion
        window, frame pacing and the frame's timing spans."""
        waited = started - self._window_wait_since if self._window_wait_since is not None else 0.0
        self._window_wait_since = None
        encode_start, encode_end = self._encode_span
        handle = self.bottleneck.frame(encode_end - encode_start)
        tracked = self.track_frame
        version = None
        if tracked is not None and frame.version >= tracked and fence_id is not None:
            self.track_frame = None
            version = frame.version
        if fence_id is not None:
            self.congestion.sent(
                InFlight(fence_id, frame.version, size, end_bytes, started, waited, handle, version)
            )
        else:
            # No fences: the time the write blocked is how long the link took.
            delay = waited + written - started
            self.bottleneck.network(handle, delay)
            self.quality.delivered(delay, 1.0 / self.frame_rate)
        if self.frame_rate < self.context.service.max_frame_rate:
            self._next_update_at = encode_start + 1.0 / self.frame_rate
        self.context.service.record_update_sent(
            frame.version, encode_start, encode_end, written, self._scaling_time
        )

    def _size_update(
        self, frame: Frame, replies: list[tuple[DesktopSizeReason, DesktopSizeStatus]]
    ) -> list[bytes]:
        """An update with only size pseudo-rects, when one is due: desktop
        size changes and ExtendedDesktopSize replies carry no pixel data."""
        caps = self.conn.capabilities
        rects: list[bytes] = []
        size_changed = frame.size != self._client_size
        if caps.extended_desktop_size:
            screens = [ev.Screen(0, 0, 0, frame.width, frame.height)]
            for reason, status in replies:
                rects.append(
                    writers.extended_desktop_size_rect(
                        frame.width, frame.height, screens, reason, status
                    )
                )
            if (size_changed or self._eds_due) and not rects:
                rects.append(writers.extended_desktop_size_rect(frame.width, frame.height, screens))
        elif size_changed and caps.desktop_size:
            rects.append(writers.desktop_size_rect(frame.width, frame.height))
        self._eds_due = False
        if frame.size != self._known_size:
            self._known_size = frame.size
            if caps.extended_desktop_size or caps.desktop_size:
                self._client_size = frame.size
                self._full_area = Rect(0, 0, *frame.size)
            else:
                log.info(
                    "%s: desktop resized; this client cannot follow, so it sees a clipped part",
                    self.peer,
                )
        if not rects:
            return []
        return [writers.framebuffer_update_header(len(rects)), *rects]

    def _take_dirty(self, frame: Frame, area: Rect) -> list[Rect]:
        """Fold the damage since the last update into this client's dirty
        tiles, and take out the rects that lie in `area`, cut to the source's
        damage rects where those are known (a video at an odd position is
        sent as itself, not as the 64-pixel tiles around it)."""
        service = self.context.service
        new = service.damage_since(self._sent_version)
        hints = service.hints_since(self._sent_version) if new is not None else None
        self._sent_version = frame.version
        if new is None:
            self._dirty = full_mask(*frame.size)
            self._hints = None
        elif self._dirty is None or self._dirty.shape != new.shape:
            self._dirty = new.copy()
            self._hints = hints
        else:
            self._dirty |= new
            if self._hints is not None and hints is not None:
                self._hints += hints
                if len(self._hints) > MAX_HINTS:
                    self._hints = None
            else:
                self._hints = None
        if area.is_empty() or not self._dirty.any():
            return []
        rects = []
        for r in mask_to_rects(self._dirty, frame.width, frame.height):
            piece = _cut(r.intersect(area), self._hints)
            if not piece.is_empty():
                rects.append(piece)
        # Clear the tiles wholly inside the area; a tile that sticks out stays
        # dirty, so its outside part is sent when it is asked for.
        ty0, tx0 = -(-area.y // TILE), -(-area.x // TILE)
        ty1 = area.bottom // TILE if area.bottom < frame.height else self._dirty.shape[0]
        tx1 = area.right // TILE if area.right < frame.width else self._dirty.shape[1]
        self._dirty[ty0:ty1, tx0:tx1] = False
        if not self._dirty.any():
            self._hints = []  # all sent: exact again from the next change on
        elif self._hints is not None:
            # Rects that reach outside the cleared tiles still cover changes
            # there; keeping more than needed only sends more.
            cleared = Rect(tx0 * TILE, ty0 * TILE, (tx1 - tx0) * TILE, (ty1 - ty0) * TILE)
            self._hints = [h for h in self._hints if not cleared.contains(h)]
        return rects

    async def _framebuffer_update(self, frame: Frame) -> list[bytes]:
        client_w, client_h = self._client_size or frame.size
        screen = Rect(0, 0, min(client_w, frame.width), min(client_h, frame.height))
        continuous = self.conn.continuous_updates
        area = (continuous if continuous is not None else self._requested).intersect(screen)
        stale = copyrect.stale_tiles(
            frame, self.conn.capabilities, self._sent_version, self._dirty, self._full_area
        )
        rects = self._take_dirty(frame, area)
        # Scrolled parts the client can copy from its own pixels: sent first.
        copies, rects = copyrect.plan(frame, stale, area, screen, rects)
        if self._full_area is not None:
            full = self._full_area.intersect(screen)
            rects = [r for r in rects if not full.contains(r)]
            if not full.is_empty():
                rects.insert(0, full)
        self._full_area = None
        pseudo = self._pseudo_due
        if not rects and not pseudo and not copies:
            return []  # nothing in the area yet: the request stays pending
        self._pseudo_due = []
        # With other viewers about, encode Tight so that they can share it.
        self.encoders.set_shared_mode(len(self.context.sessions) > 1)
        video = self.video.frame(frame.timing.changed_percent)
        self.encoders.set_adaptive(self._quality_level(), video, self._video_scale(frame))
        started = time.perf_counter()
        stats = EncodeStats.empty()
        encoded = await encode_rects(
            self.encoders,
            self.context.cache,
            self.context.limiter,
            frame.version,
            frame.pixels,
            rects,
            self.conn.pixel_format,
            stats,
        )
        encoded = [*copies, *encoded]
        encoded_at = time.perf_counter()
        self._scaling_time = stats.scaling
        self._encode_span = (started, encoded_at)
        for name, cpu in stats.cpu.items():
            self.context.service.record_encoding(
                frame.version, name, cpu, stats.count[name], stats.area[name]
            )
        self._request_pending = False
        self._requested = Rect(0, 0, 0, 0)
        ext_mouse = writers.empty_pseudo_rect(PseudoEncoding.EXTENDED_MOUSE_BUTTONS)
        if ext_mouse in pseudo:
            self.conn.extended_mouse_buttons = True
        count = len(encoded) + len(pseudo)
        # KasmVNC's web client shows an update only once it has counted more
        # than one rect in it, LastRect included (its _framebufferUpdate
        # calls display.flip only then): like KasmVNC, end every update to
        # it with LastRect, or a one-rect update would never be drawn.
        last_rect = self.conn.capabilities.last_rect and (
            count > writers.MAX_RECTS or self.conn.dialect is Dialect.KASM
        )
        out = [writers.framebuffer_update_header(None if last_rect else count)]
        out += pseudo
        for e in encoded:
            out.append(writers.rect_header(e.rect, e.encoding))
            out += e.payload
        if last_rect:
            out.append(writers.last_rect())
        self.stats.updates_sent += 1
        self.stats.frames_coalesced += max(0, frame.version - self.stats.last_update_version - 1)
        self.stats.rects_sent += len(encoded)
        self.stats.last_update_version = frame.version
        return out

    async def _write(self, chunks: list[bytes]) -> None:
        """Send chunks, joining small ones so that a many-rect update is a few
        large writes and a JPEG is never copied."""
        batch: list[bytes] = []
        size = 0
        for chunk in chunks:
            if not chunk:
                continue
            if len(chunk) >= 65536 or isinstance(chunk, kasm.Unbatched):
                if batch:
                    await self._send(b"".join(batch))
                    batch, size = [], 0
                await self._send(chunk)
            else:
                batch.append(chunk)
                size += len(chunk)
                if size >= 65536:
                    await self._send(b"".join(batch))
                    batch, size = [], 0
            self.stats.bytes_sent += len(chunk)
        if batch:
            await self._send(b"".join(batch))

    async def _send(self, data: bytes) -> None:
        """Write `data` in pieces of at most SEND_PIECE bytes, each of which the
        client must accept within the send timeout (a client that stopped
        reading blocks only this task, and not for ever)."""
        timeout = self.context.config.send_timeout
        view = memoryview(data)
        for start in range(0, len(view), SEND_PIECE):
            self._send_started = trio.current_time()
            with trio.move_on_after(timeout) as scope:
                await self.stream.send_all(view[start : start + SEND_PIECE])
            self._send_started = None
            # cancel_called, not cancelled_caught: a write that cannot be
            # cancelled (hypercorn shields its socket writes) returns after
            # the deadline without raising.
            if scope.cancel_called:
                raise SendTimeout(f"the client accepted no data for {timeout:g} s")

    # -- measurement ---------------------------------------------------------------

    async def _measure_task(self) -> None:
        """Fence round trips, once a second, for RTT and delivered bandwidth.
        A fence with BlockBefore is answered only after the client processed
        everything sent before it, so the ack also tells what it absorbed."""
        while True:
            await trio.sleep(self.context.config.measure_interval)
            self._check_output_limit()
            if not self.conn.capabilities.fence or len(self.stats.fences) > 8:
                continue
            if self.congestion.in_flight:
                continue  # the updates' own fences are measuring
            self._send_fence()

    @staticmethod
    def _fence_request(fence_id: int) -> bytes:
        """A fence request with BlockBefore: the client answers it once it
        has processed everything sent before it."""
        payload = _FENCE_TAG + struct.pack(">I", fence_id)
        return writers.server_fence(FenceFlags.REQUEST | FenceFlags.BLOCK_BEFORE, payload)

    def _send_fence(self) -> None:
        """A round-trip probe while no update is in flight."""
        fence_id = next(self._fence_ids)
        self.stats.fences[fence_id] = (time.perf_counter(), self.stats.bytes_sent, None)
        self._send_control(self._fence_request(fence_id))

    def _on_fence_reply(self, payload: bytes) -> None:
        if not payload.startswith(_FENCE_TAG) or len(payload) != len(_FENCE_TAG) + 4:
            return
        (fence_id,) = struct.unpack(">I", payload[len(_FENCE_TAG) :])
        now = time.perf_counter()
        sent = self.stats.fences.pop(fence_id, None)
        if sent is not None:
            self._note_rtt(now - sent[0], now, sent[1])
            self.congestion.rtt_sample(now - sent[0])
            return
        delivery = self.congestion.acknowledged(fence_id)
        if delivery is None:
            return
        update = delivery.update
        self._note_rtt(delivery.rtt, now, update.end_bytes)
        if update.record is not None:
            self.bottleneck.network(update.record, delivery.delay)
        self.quality.delivered(delivery.delay, 1.0 / self.frame_rate)
        if update.tracked_version is not None:
            self.record_client_time(update.tracked_version, delivery.rtt)
        self.poke()  # the congestion window may have opened

    def _note_rtt(self, rtt: float, now: float, acked_bytes: int) -> None:
        self.stats.rtt = rtt
        self.stats.min_rtt = rtt if self.stats.min_rtt is None else min(self.stats.min_rtt, rtt)
        self.stats.acked.append((now, acked_bytes))

    def record_client_time(self, version: int, seconds: float) -> None:
        """The client finished processing the update of frame `version`
        `seconds` after it was sent (frame stats' client_time)."""
        self.client_times[version] = seconds
        while len(self.client_times) > 64:
            del self.client_times[next(iter(self.client_times))]
        self.client_time_event.set()
        self.client_time_event = trio.Event()

    def request_full_frame(self) -> None:
        """The API's send_full_frame: the whole screen at the next update."""
        if self._client_size is not None:
            self._full_area = Rect(0, 0, *self._client_size)
            self.poke()


_CURSOR_ENCODINGS = {
    struct.pack(">i", PseudoEncoding.CURSOR),
    struct.pack(">i", PseudoEncoding.CURSOR_WITH_ALPHA),
}


def _cut(piece: Rect, hints: list[Rect] | None) -> Rect:
    """The part of `piece` that the damage rects touch (their bounding box
    within it); all of it when they are unknown."""
    if hints is None or piece.is_empty():
        return piece
    box = Rect(0, 0, 0, 0)
    for h in hints:
        box = box.union(h.intersect(piece))
    return box


def _is_cursor_rect(rect: bytes) -> bool:
    return rect[8:12] in _CURSOR_ENCODINGS


def _unpremultiply(rgba: Pixels) -> Pixels:
    """Premultiplied RGBA -> straight BGRA (what the classic Cursor
    pseudo-encoding's pixels and mask are built from)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    safe = np.maximum(alpha, 1)
    rgb = np.minimum(rgba[..., :3].astype(np.uint16) * 255 // safe, 255).astype(np.uint8)
    out = np.empty_like(rgba)
    out[..., 0] = rgb[..., 2]
    out[..., 1] = rgb[..., 1]
    out[..., 2] = rgb[..., 0]
    out[..., 3] = rgba[..., 3]
    return out


@contextmanager
def _ends_connection(session: ClientSession) -> Iterator[None]:
    """Turn the ways a connection ends into a logged reason and a cancel of
    the session (never an exception into the server's nursery)."""
    in_handshake = session.conn.state is not State.NORMAL
    try:
        yield
    except ProtocolError as exc:
        session._failed_in_handshake = in_handshake
        log.warning("%s: protocol error: %s", session.peer, exc.reason)
        session.close(f"protocol error: {exc.reason}")
    except SendTimeout as exc:
        log.warning("%s: disconnected: %s", session.peer, exc)
        session.close(f"send timed out: {exc}")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        if _timed_out(exc):
            # TCP_USER_TIMEOUT: the kernel gave up on a peer that accepted nothing.
            reason = f"the client accepted no data for {session.context.config.send_timeout:g} s"
            log.warning("%s: disconnected: %s", session.peer, reason)
            session.close(f"send timed out: {reason}")
        else:
            session.close(f"connection lost: {exc or type(exc).__name__}")
    except trio.TooSlowError:
        log.info("%s: handshake timed out", session.peer)
        session.close("handshake timed out")


def _timed_out(exc: BaseException | None) -> bool:
    """Whether the kernel ended the connection with ETIMEDOUT."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False

# What a session does for KasmVNC's web client (protocol.md B.7): its own
# messages (178-191, 252), frame stats through 179, user joined/left notices,
# and the choice of WebP for clients that announce it. The session calls in
# here from a few hooks (`_handle`, `_send_pending`, the handshake's end and
# `run`'s end); the state this keeps per session lives in `session.kasm`.
#
# Which connection speaks the Kasm dialect is decided by the sans-io core
# (trivnc.rfb.connection, "Dialect detection"); everything here checks
# `session.conn.dialect`, since a WebSocket connection starts undecided.
#
# The client's Kasm pseudo-encodings (frame rate, dynamic quality, video
# knobs, ...) are read by ClientCapabilities into `session.conn.capabilities
# .kasm` (KasmSettings), in KasmVNC's order, earlier entries winning; that is
# the one place the encoder scheduler reads them from. Message 252 is kept as
# `session.max_video_resolution`; the session's video mode scales images to
# fit it (ClientSession._video_scale).
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..rfb import events as ev
from ..rfb import writers
from ..rfb.constants import Dialect

if TYPE_CHECKING:
    from .session import ClientSession

log = logging.getLogger("trivnc.kasm")

#: WebP costs 7-10 times JPEG's CPU: use it in place of JPEG only while the
#: session's CPU bottleneck score (10 = no bottleneck) is at least this.
WEBP_MIN_CPU_SCORE = 9.0
#: The name KasmVNC gives a user it does not know (VNCServerST::notifyUserAction).
UNKNOWN_USER = "username_unavailable"
#: Video encoders trivnc can stream, as KasmVNC lists its available ones in
#: the 184 reply: (streaming-mode pseudo-encoding, qmin, qmax, presets). None:
#: KasmVNC never lists the still-image mode (-1025) there (its web client
#: always offers it, and would show a listed one twice), and trivnc has no
#: video encoder, so the reply is empty, as KasmVNC's is without one.
VIDEO_ENCODERS: tuple[tuple[int, int, int, tuple[int, ...]], ...] = ()


class Unbatched(bytes):
    """Bytes the send task must write as a WebSocket message of their own.
    KasmVNC's web client stops reading its receive queue after the 184 reply
    (its handler returns nothing), so whatever came in the same message would
    wait for the next one."""

    __slots__ = ()


@dataclass
class KasmState:
    """Per-session bookkeeping of the Kasm dialect."""

    #: (frame version, when its update went out) of the update a 179 asked
    #: the client to time.
    frame_stats: tuple[int, float] | None = None
    #: The session was announced to the others (253), so it is announced
    #: leaving (254).
    announced: bool = False


def use_webp(announced: bool, cpu_score: float) -> bool:
    """WebP in place of JPEG for photo areas: only if the client announced
    WebP (-1024) and the CPU is not a bottleneck."""
    return announced and cpu_score >= WEBP_MIN_CPU_SCORE


def stats_text(scores: list[float]) -> str:
    """Bottleneck scores as KasmVNC writes them (VNCSConnectionST::sendStats)."""
    return "[ " + ", ".join(f"{s:.1f}" for s in scores) + " ]"


def video_encoders_reply(requested: tuple[int, ...]) -> bytes:
    """184: the video encoders trivnc has among the streaming modes the
    client asked for (SMsgWriter::writeVideoEncoders)."""
    chosen = [e for e in VIDEO_ENCODERS if e[0] in requested]
    return Unbatched(writers.kasm_video_encoders(chosen))


def is_kasm(session: ClientSession) -> bool:
    return session.conn.dialect is Dialect.KASM


#: Events `handle` takes.
EVENTS = (ev.DialectSelected, *ev.KASM_EVENTS)


async def handle(session: ClientSession, event: ev.Event) -> None:
    """One Kasm event (see EVENTS) for `session`."""
    match event:
        case ev.DialectSelected(dialect=dialect):
            log.info("%s: speaks the %s dialect", session.peer, dialect.value)
        case ev.KasmRequestStats():
            text = stats_text(session.bottleneck.scores())
            session._send_control(writers.kasm_stats(text), "kasm-stats")
        case ev.KasmFrameStats():
            _client_processed(session)
        case ev.KasmBinaryClipboard(items=items):
            await _client_clipboard(session, items)
        case ev.KasmVideoEncodersRequest(encodings=encodings):
            session._send_control(video_encoders_reply(encodings), "kasm-video-encoders")
        case ev.KasmKeepAlive():
            pass  # it kept the connection busy; nothing to answer
        case ev.KasmSetMaxVideoResolution(width=width, height=height):
            session.max_video_resolution = (width, height)
        case ev.KasmUnsupported(message_type=message_type):
            log.debug("%s: Kasm message %d ignored", session.peer, message_type)
        case _:
            pass


async def _client_clipboard(session: ClientSession, items: tuple[tuple[str, bytes], ...]) -> None:
    """180 from the client: its text goes to the desktop (the size limit is
    the server's, as for every viewer); other formats (image/png, text/html)
    are not taken."""
    if not session.can_write:
        return
    for mime, data in items:
        if mime.split(";", 1)[0].strip() == "text/plain":
            await session.context.client_clipboard(session, data.decode("utf-8", "replace"))
            return
    if items:
        kinds = ", ".join(sorted({mime for mime, _ in items}))
        log.info("%s: clipboard of %s not taken (text only)", session.peer, kinds)


def desktop_clipboard(text: str) -> bytes:
    """180 to the client: the desktop's clipboard as text/plain."""
    return writers.kasm_binary_clipboard([(0, "text/plain", text.encode())])


def frame_stats_request(session: ClientSession, version: int) -> list[bytes]:
    """Called by the send task with each update it is about to write (before
    it): the 179 to put in front of it when frame tracking is armed, for a
    Kasm client (others get a fence after the update). Also settles WebP
    for the next update from the CPU score."""
    caps = session.conn.capabilities
    if caps.webp:
        session.encoders.set_webp_affordable(use_webp(True, session.bottleneck.scores()[0]))
    tracked = session.track_frame
    if not is_kasm(session) or tracked is None or version < tracked:
        return []
    session.track_frame = None
    session.kasm.frame_stats = (version, time.perf_counter())
    return [writers.kasm_request_frame_stats()]


def _client_processed(session: ClientSession) -> None:
    """179 from the client: it processed the update that followed our 179.
    KasmVNC's client puts its frame rate in the message, so the time is ours:
    from writing the update to this reply."""
    pending = session.kasm.frame_stats
    if pending is None:
        return
    session.kasm.frame_stats = None
    version, sent = pending
    session.record_client_time(version, time.perf_counter() - sent)


def _name(session: ClientSession) -> str:
    return session.username or UNKNOWN_USER


def user_joined(session: ClientSession, shared: bool) -> None:
    """A viewer finished its handshake: as KasmVNC does for a shared
    ClientInit, tell the other viewers (253), here those speaking the Kasm
    dialect (the message means something else in standard RFB)."""
    if not shared:
        return
    session.kasm.announced = True
    for other in list(session.context.sessions):
        if other is not session and is_kasm(other):
            other._send_control(writers.kasm_user_added(_name(session)))


def user_left(session: ClientSession) -> None:
    """A viewer that was announced left: tell the other Kasm viewers (254)."""
    if not session.kasm.announced:
        return
    session.kasm.announced = False
    for other in list(session.context.sessions):
        if other is not session and is_kasm(other):
            other._send_control(writers.kasm_user_removed(_name(session)))

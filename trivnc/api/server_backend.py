# trivnc's implementation of the developer API's backend: the running server's
# users, sessions, frames and measurements, as the blueprint asks for them.
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np
import trio
from imagecodecs import JPEG8

from ..rfb.constants import JPEG_QUALITY_TABLE, Subsampling
from ..server.ratelimit import LoginRateLimiter
from ..server.users import User, UserChange, UserStore, UserStoreError
from .backend import ApiError, ApiSession, ApiUser, ApiUserChange

if TYPE_CHECKING:
    from ..server.server import ServerContext
    from ..server.session import ClientSession

log = logging.getLogger("trivnc.api")

#: How long get_frame_stats waits for a frame, then for clients' replies.
FRAME_WAIT = 10.0
CLIENT_WAIT = 2.0
_SUBSAMPLING = {Subsampling.S444: "444", Subsampling.S422: "422", Subsampling.S420: "420"}


class ServerBackend:
    """ApiBackend over a running server (ServerContext) and its users file."""

    def __init__(
        self, context: ServerContext, users: UserStore, limiter: LoginRateLimiter | None = None
    ) -> None:
        self.context = context
        self.users = users
        # Not `limiter or ...`: an empty limiter is falsy (it has __len__), and
        # the web port must share the RFB port's limiter, not get its own.
        self.limiter = limiter if limiter is not None else LoginRateLimiter()
        self._frame_stats_busy = False
        self._last_screenshot: tuple[int, int, int, int] | None = None

    # -- auth ---------------------------------------------------------------------------

    async def authenticate(self, username: str, password: str, peer: str) -> ApiUser | None:
        # Attempts from one address take turns (see LoginRateLimiter.attempt),
        # and the limit is checked again once it is this one's turn.
        async with self.limiter.attempt(peer):
            if self.limiter.blocked(peer) > 0:
                return None
            # On the trio thread: the change callbacks touch open sessions.
            self.users.reload_if_changed()
            # SHA-256-crypt takes milliseconds: not on the event loop.
            user = await trio.to_thread.run_sync(self.users.verify, username, password)
            if user is None:
                self.limiter.failure(peer)
                return None
            self.limiter.success(peer)
            return _api_user(user)

    def login_blocked(self, peer: str) -> float:
        return self.limiter.blocked(peer)

    # -- stats --------------------------------------------------------------------------

    def bottleneck_stats(self) -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {}
        for session in self._sessions():
            user = session.username or ""
            out.setdefault(user, {})[session.connection_id] = session.bottleneck.scores()
        return out

    async def frame_stats(self, client: str, requester: str) -> dict[str, Any]:
        if self._frame_stats_busy:
            raise ApiError(400, "another get_frame_stats request is in progress")
        self._frame_stats_busy = True
        try:
            return await self._frame_stats(client, requester)
        finally:
            self._frame_stats_busy = False

    async def _frame_stats(self, client: str, requester: str) -> dict[str, Any]:
        service = self.context.service
        selected = self._select(client, requester)
        start = service.latest.version if service.latest else 0
        for session in selected:
            session.track_frame = start + 1
        # The next frame that some session encodes; on a still screen, a full
        # frame is measured instead of answering 503 as KasmVNC does.
        with trio.move_on_after(FRAME_WAIT / 2):
            await _wait_for(lambda: _encoded_after(self.context, start))
        if not _encoded_after(self.context, start):
            service.request_full_frame()
            with trio.move_on_after(FRAME_WAIT / 2):
                await _wait_for(lambda: _encoded_after(self.context, start))
        timing = _encoded_after(self.context, start)
        if timing is None:
            raise ApiError(503, "no frame was encoded in time")
        version = timing.version
        with trio.move_on_after(CLIENT_WAIT):
            for session in selected:
                while not any(v >= version for v in session.client_times):
                    await session.client_time_event.wait()
        result: dict[str, Any] = timing.as_dict()
        client_side: list[dict[str, Any]] = []
        for session in selected:
            times = [t for v, t in session.client_times.items() if v >= version]
            rtt = session.stats.min_rtt
            client_side.append(
                {
                    "client": session.connection_id,
                    "client_time": round(times[0] * 1000, 3) if times else 0,
                    "ping": round(rtt * 1000, 3) if rtt is not None else 4294967295,
                    "processes": [],
                }
            )
            session.track_frame = None
        result["client_side"] = client_side
        return result

    def _select(self, client: str, requester: str) -> list[ClientSession]:
        sessions = self._sessions()
        if client == "none":
            return []
        if client == "all":
            return sessions
        if client == "auto":
            mine = [s for s in sessions if s.username == requester]
            return mine[:1]
        return [s for s in sessions if client in s.connection_id]

    async def screenshot(
        self, width: int | None, height: int | None, quality: int, deduplicate: bool
    ) -> bytes | None:
        frame = await self.context.service.wait_ready()
        fw, fh = frame.size
        w, h = _fit(fw, fh, width, height)
        key = (frame.version, w, h, quality)
        if deduplicate and self._last_screenshot == key:
            return None
        self._last_screenshot = key
        jpeg_quality, subsampling = JPEG_QUALITY_TABLE[quality]

        def encode() -> bytes:
            pixels = frame.pixels if (w, h) == (fw, fh) else _resize(frame.pixels, w, h)
            data = imagecodecs.jpeg8_encode(
                np.ascontiguousarray(pixels),
                level=jpeg_quality,
                subsampling=_SUBSAMPLING.get(subsampling, "420"),
                colorspace=JPEG8.CS.EXT_BGRX,
                outcolorspace=JPEG8.CS.YCbCr,
            )
            return bytes(data)

        return await trio.to_thread.run_sync(encode, limiter=self.context.limiter)

    def send_full_frame(self) -> None:
        for session in self._sessions():
            if session.can_read:
                session.request_full_frame()

    # -- users --------------------------------------------------------------------------

    def get_users(self) -> list[ApiUser]:
        """The flags as stored (KasmVNC's get_users lists the file's letters)."""
        self.users.reload_if_changed()
        return [
            ApiUser(u.name, u.permissions.read, u.permissions.write, u.permissions.owner)
            for u in self.users.users()
        ]

    def create_user(
        self, name: str, password: str, *, read: bool, write: bool, owner: bool, replace: bool
    ) -> None:
        with _as_api_error():
            self.users.create(name, password, read=read, write=write, owner=owner, replace=replace)

    def update_user(
        self,
        name: str,
        *,
        password: str | None,
        read: bool | None,
        write: bool | None,
        owner: bool | None,
    ) -> None:
        with _as_api_error():
            self.users.update(name, password=password, read=read, write=write, owner=owner)

    def remove_user(self, name: str) -> None:
        with _as_api_error():
            self.users.remove(name)

    def apply_user_changes(self, changes: Sequence[ApiUserChange]) -> None:
        """A bulk POST as one write of the users file: all or nothing."""
        with _as_api_error():
            self.users.apply(
                [
                    UserChange(c.action, c.name, c.password, c.read, c.write, c.owner)
                    for c in changes
                ]
            )

    def get_sessions(self) -> list[ApiSession]:
        return [
            ApiSession(s.username or "", s.connection_id, s.stats.connected_at)
            for s in self._sessions()
        ]

    def _sessions(self) -> list[ClientSession]:
        return sorted(self.context.sessions, key=lambda s: s.id)


@contextmanager
def _as_api_error() -> Iterator[None]:
    """User store refusals (bad name or password, unknown or existing user)
    become 400s with the store's message."""
    try:
        yield
    except UserStoreError as exc:
        raise ApiError(400, str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def _api_user(user: User) -> ApiUser:
    """What the user may do (write implies read, as in KasmVNC)."""
    p = user.permissions
    return ApiUser(user.name, p.can_view, p.can_input, p.can_manage)


def _encoded_after(context: ServerContext, version: int) -> Any:
    """The newest frame after `version` that some session has sent."""
    for timing in reversed(list(context.service.timings)):
        if timing.version > version and timing.clients:
            return timing
    return None


async def _wait_for(predicate: Callable[[], object]) -> None:
    # Sessions record what they sent as they send it; a short poll under the
    # caller's deadline is simpler than a notification for each of them.
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


def _fit(fw: int, fh: int, width: int | None, height: int | None) -> tuple[int, int]:
    """The screenshot size: the requested width (never wider than the screen)
    with the height that keeps the aspect ratio; or the requested height when
    only that is given."""
    if width is None and height is None:
        return fw, fh
    if width is not None:
        w = max(1, min(width, fw))
        return w, max(1, round(fh * w / fw))
    assert height is not None
    h = max(1, min(height, fh))
    return max(1, round(fw * h / fh)), h


def _resize(pixels: Any, w: int, h: int) -> Any:
    """Box-filtered downscale (each output pixel averages its source area)."""
    fh, fw = pixels.shape[:2]
    ys = (np.arange(h + 1) * fh) // h
    xs = (np.arange(w + 1) * fw) // w
    rows = np.add.reduceat(pixels.astype(np.uint32), ys[:-1], axis=0)
    sums = np.add.reduceat(rows, xs[:-1], axis=1)
    counts = np.outer(np.diff(ys), np.diff(xs))[..., None]
    return (sums // counts).astype(np.uint8)

# What the developer API needs from a running server. The Quart blueprint is
# written against this protocol only, so an embedding application can mount it
# on its own Quart-Trio app with any implementation (trivnc's is in
# trivnc/api/server_backend.py).
from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable


class ApiError(Exception):
    """A request the API refuses: HTTP `status` with a short `reason`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ApiUser:
    name: str
    read: bool
    write: bool
    owner: bool


@dataclass(frozen=True)
class ApiSession:
    username: str
    connection_id: str  # "ip_seconds.micros::websocket" or "::tcp"
    connected_since: float  # time.time()


class ApiBackend(Protocol):
    """The server as the developer API sees it. Methods raise ApiError for
    requests they refuse (unknown user, bad value); anything else is a bug."""

    # -- auth (also used for the page and the WebSocket) --------------------------------

    def authenticate(
        self, username: str, password: str, peer: str
    ) -> ApiUser | Awaitable[ApiUser | None] | None:
        """The user if the credentials are right; None otherwise (the caller
        answers 401). Implementations rate-limit failures per `peer`, do the
        same work for an unknown name as for a wrong password, and should be
        `async def` and hash in a worker thread (a plain method that returns
        the answer works too, but blocks the event loop while it hashes)."""
        ...

    def login_blocked(self, peer: str) -> float:
        """Seconds `peer` must wait after too many failed logins (0 = may try)."""
        ...

    # -- stats ------------------------------------------------------------------------

    def bottleneck_stats(self) -> dict[str, dict[str, list[float]]]:
        """{user: {connection_id: [cpu, cpu_avg, net, net_avg]}}, each 0-10."""
        ...

    async def frame_stats(self, client: str, requester: str) -> dict[str, Any]:
        """The timing of the next frame (KasmVNC's get_frame_stats shape).
        `client` is auto, all, none or a connection id substring; `requester`
        is the calling user (for auto). Answers within a bounded time."""
        ...

    async def screenshot(
        self, width: int | None, height: int | None, quality: int, deduplicate: bool
    ) -> bytes | None:
        """A JPEG of the screen (None when deduplicating and nothing changed)."""
        ...

    def send_full_frame(self) -> None:
        """Every viewer with read permission gets the whole screen."""
        ...

    # -- users ------------------------------------------------------------------------

    def get_users(self) -> list[ApiUser]: ...

    def create_user(
        self, name: str, password: str, *, read: bool, write: bool, owner: bool, replace: bool
    ) -> None: ...

    def update_user(
        self,
        name: str,
        *,
        password: str | None,
        read: bool | None,
        write: bool | None,
        owner: bool | None,
    ) -> None: ...

    def remove_user(self, name: str) -> None: ...

    def get_sessions(self) -> list[ApiSession]: ...


@dataclass(frozen=True)
class ApiUserChange:
    """One entry of a bulk POST to create_user, update_user or remove_user.
    `create` inserts or replaces; `update` sets all three flags and the
    password if given; `remove` needs only the name."""

    action: Literal["create", "update", "remove"]
    name: str
    password: str | None = None
    read: bool = False
    write: bool = False
    owner: bool = False


@runtime_checkable
class BulkUserBackend(Protocol):
    """Optional: a backend that applies a bulk user change as one
    transaction. The blueprint uses it when the backend has it, so that an
    entry the backend refuses (a short password, say) leaves every user as
    it was; without it the entries are applied one by one."""

    def apply_user_changes(self, changes: Sequence[ApiUserChange]) -> None:
        """Apply all of `changes` or, raising ApiError, none."""
        ...

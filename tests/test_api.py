# The developer API blueprint over real TLS and real HTTP: hypercorn serves a
# QuartTrio app with the blueprint on 127.0.0.1:0 with a trustme certificate,
# and httpx calls it. The server side is an in-memory ApiBackend that keeps
# users and permissions the way the protocol describes and records each call,
# so every test can check both the answer and what reached the server.
from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import imagecodecs
import numpy as np
import pytest
import trio
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from trivnc.api.backend import ApiBackend, ApiError, ApiSession, ApiUser
from trivnc.api.blueprint import (
    BLUEPRINT_NAME,
    MAX_BODY_BYTES,
    MAX_BULK_ENTRIES,
    api_blueprint,
    openapi_document,
    parse_basic_credentials,
)

OWNER = ("boss", "boss-password")
READER = ("watcher", "watcher-password")
WRITER = ("typist", "typist-password")
BLOCK_AFTER = 3
BLOCK_SECONDS = 30.5
BOTTLENECK = {"boss": {"127.0.0.1_1627638421.160028::websocket": [8.2, 9.6, 10.0, 9.4]}}
FRAME_STATS: dict[str, Any] = {
    "frame": {"resx": 64, "resy": 48, "changed": 100, "server_time": 3},
    "server_side": [{"process_name": "Analysis", "time": 1}],
    "client_side": [],
}
SESSIONS = [ApiSession("typist", "127.0.0.1_1700000000.000001::websocket", 1700000000.25)]


def _tiny_jpeg() -> bytes:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)
    return bytes(imagecodecs.jpeg8_encode(pixels, level=86))


JPEG = _tiny_jpeg()


@dataclass
class FakeBackend:
    """An ApiBackend kept in memory: users with passwords and permissions,
    failed logins counted per peer, and every call recorded."""

    passwords: dict[str, str] = field(default_factory=dict)
    users: dict[str, ApiUser] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    screenshot_result: bytes | None = JPEG

    def add(self, name: str, password: str, *, read: bool, write: bool, owner: bool) -> None:
        self.passwords[name] = password
        self.users[name] = ApiUser(name, read, write, owner)

    def calls_to(self, method: str) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == method]

    # -- the protocol --

    def authenticate(self, username: str, password: str, peer: str) -> ApiUser | None:
        self.calls.append(("authenticate", username, password, peer))
        if self.passwords.get(username) != password:
            self.failures[peer] = self.failures.get(peer, 0) + 1
            return None
        return self.users[username]

    def login_blocked(self, peer: str) -> float:
        self.calls.append(("login_blocked", peer))
        return BLOCK_SECONDS if self.failures.get(peer, 0) >= BLOCK_AFTER else 0.0

    def bottleneck_stats(self) -> dict[str, dict[str, list[float]]]:
        return BOTTLENECK

    async def frame_stats(self, client: str, requester: str) -> dict[str, Any]:
        self.calls.append(("frame_stats", client, requester))
        await trio.lowlevel.checkpoint()
        return FRAME_STATS

    async def screenshot(
        self, width: int | None, height: int | None, quality: int, deduplicate: bool
    ) -> bytes | None:
        self.calls.append(("screenshot", width, height, quality, deduplicate))
        await trio.lowlevel.checkpoint()
        return self.screenshot_result

    def send_full_frame(self) -> None:
        self.calls.append(("send_full_frame",))

    def get_users(self) -> list[ApiUser]:
        return list(self.users.values())

    def create_user(
        self, name: str, password: str, *, read: bool, write: bool, owner: bool, replace: bool
    ) -> None:
        self.calls.append(("create_user", name, password, read, write, owner, replace))
        # KasmVNC's rules for names and passwords (protocol.md B.10).
        if not name or ":" in name or len(name.encode()) >= 128:
            raise ApiError(400, "invalid user name")
        if len(password) < 6:
            raise ApiError(400, "password too short")
        if name in self.users and not replace:
            raise ApiError(400, "user exists")
        self.add(name, password, read=read, write=write, owner=owner)

    def update_user(
        self,
        name: str,
        *,
        password: str | None,
        read: bool | None,
        write: bool | None,
        owner: bool | None,
    ) -> None:
        self.calls.append(("update_user", name, password, read, write, owner))
        old = self.users.get(name)
        if old is None:
            raise ApiError(400, "unknown user")
        if password is not None:
            if len(password) < 6:
                raise ApiError(400, "password too short")
            self.passwords[name] = password
        self.users[name] = ApiUser(
            name,
            old.read if read is None else read,
            old.write if write is None else write,
            old.owner if owner is None else owner,
        )

    def remove_user(self, name: str) -> None:
        self.calls.append(("remove_user", name))
        if name not in self.users:
            raise ApiError(400, "unknown user")
        del self.users[name]
        del self.passwords[name]

    def get_sessions(self) -> list[ApiSession]:
        return SESSIONS


def _fake_backend() -> FakeBackend:
    backend = FakeBackend()
    backend.add(*OWNER, read=True, write=True, owner=True)
    backend.add(*READER, read=True, write=False, owner=False)
    backend.add(*WRITER, read=True, write=True, owner=False)
    return backend


def test_fake_backend_is_an_api_backend() -> None:
    # mypy checks this assignment against the protocol.
    backend: ApiBackend = _fake_backend()
    assert backend.get_users()


@dataclass
class Api:
    client: httpx.AsyncClient
    backend: FakeBackend
    app: QuartTrio
    trust: ssl.SSLContext


@pytest.fixture(scope="session")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def api(
    nursery: trio.Nursery, tmp_path: Path, certificate_authority: trustme.CA
) -> AsyncIterator[Api]:
    backend = _fake_backend()
    app = QuartTrio(__name__)
    app.register_blueprint(api_blueprint(backend))

    cert = certificate_authority.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = str(tmp_path / "cert.pem")
    config.keyfile = str(tmp_path / "key.pem")
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))

    trust = ssl.create_default_context()
    certificate_authority.configure_trust(trust)
    async with httpx.AsyncClient(base_url=binds[0], verify=trust, auth=OWNER) as client:
        yield Api(client, backend, app, trust)
    stop.set()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# Every route with a request that would succeed for an owner.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/get_bottleneck_stats", None),
    ("GET", "/api/get_frame_stats?client=auto", None),
    ("GET", "/api/get_screenshot", None),
    ("GET", "/api/send_full_frame", None),
    ("GET", "/api/create_user?name=fred&password=123456", None),
    ("POST", "/api/create_user", [{"user": "fred", "password": "123456"}]),
    ("GET", "/api/update_user?name=typist&write=false", None),
    ("POST", "/api/update_user", [{"user": "typist", "read": True}]),
    ("GET", "/api/remove_user?name=typist", None),
    ("POST", "/api/remove_user", [{"user": "typist"}]),
    ("GET", "/api/get_users", None),
    ("GET", "/api/get_sessions", None),
    ("GET", "/api/openapi.json", None),
]
ROUTE_IDS = [f"{method} {url}" for method, url, _ in ROUTES]


# -- authentication and permission --------------------------------------------------------


@pytest.mark.parametrize(("method", "url", "body"), ROUTES, ids=ROUTE_IDS)
async def test_every_route_needs_credentials(api: Api, method: str, url: str, body: Any) -> None:
    response = await api.client.request(method, url, json=body, auth=None)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="trivnc"')
    assert not api.backend.calls_to("authenticate")
    assert api.backend.users["typist"].write  # nothing changed


@pytest.mark.parametrize(("method", "url", "body"), ROUTES, ids=ROUTE_IDS)
async def test_every_route_refuses_non_owners(api: Api, method: str, url: str, body: Any) -> None:
    for who in (READER, WRITER):
        response = await api.client.request(method, url, json=body, auth=who)
        # 403, not KasmVNC's 401: the credentials are right, the permission is missing.
        assert response.status_code == 403
        assert response.text == "owner permission required"
        assert "WWW-Authenticate" not in response.headers
    assert set(api.backend.users) == {"boss", "watcher", "typist"}
    assert api.backend.users["typist"].write
    assert not api.backend.calls_to("send_full_frame")
    assert not api.backend.calls_to("screenshot")


@pytest.mark.parametrize(("method", "url", "body"), ROUTES, ids=ROUTE_IDS)
async def test_every_route_answers_an_owner(api: Api, method: str, url: str, body: Any) -> None:
    response = await api.client.request(method, url, json=body)
    assert response.status_code == 200, response.text
    # Screenshots and user lists must not be kept by any cache.
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_wrong_password_is_401_and_counted_for_the_socket_peer(api: Api) -> None:
    response = await api.client.get(
        "/api/get_users",
        auth=("boss", "guess"),
        headers={"X-Forwarded-For": "203.0.113.9"},
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
    # The peer is the socket's address, never the header the client wrote.
    assert api.backend.calls_to("authenticate") == [("boss", "guess", "127.0.0.1")]
    assert api.backend.calls_to("login_blocked") == [("127.0.0.1",)]


async def test_unknown_user_is_401(api: Api) -> None:
    response = await api.client.get("/api/get_users", auth=("nobody", "boss-password"))
    assert response.status_code == 401


async def test_blocked_peer_gets_429_even_with_the_right_password(api: Api) -> None:
    for _ in range(BLOCK_AFTER):
        response = await api.client.get("/api/get_users", auth=("boss", "wrong"))
        assert response.status_code == 401
    tries = len(api.backend.calls_to("authenticate"))

    for auth in (OWNER, ("boss", "wrong"), None):
        response = await api.client.get("/api/get_users", auth=auth)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "31"  # whole seconds, rounded up
    # Blocked requests never reach the password check, so a blocked client
    # cannot learn which password is right.
    assert len(api.backend.calls_to("authenticate")) == tries


@pytest.mark.parametrize(
    "header",
    [
        b"Basic !!!notbase64",
        b"Basic " + base64.b64encode(b"\xff\xfeboss:boss-password"),  # not UTF-8
        b"Basic " + base64.b64encode(b"boss"),  # no colon
        b"Basic " + base64.b64encode(b":boss-password"),  # no user name
        b"Basic " + b"QUFB" * 2000,  # overlong
        b"Basic \xe9\xe9\xe9\xe9",  # not ASCII
        b"Bearer abcdef",
        b"Basic",
        b"",
    ],
    ids=[
        "bad-base64",
        "not-utf8",
        "no-colon",
        "empty-user",
        "overlong",
        "latin1",
        "bearer",
        "no-token",
        "empty",
    ],
)
async def test_malformed_credentials_are_401(api: Api, header: bytes) -> None:
    response = await api.client.get("/api/get_users", headers={b"Authorization": header}, auth=None)
    assert response.status_code == 401
    assert not api.backend.calls_to("authenticate")


def test_parse_basic_credentials() -> None:
    assert parse_basic_credentials(_basic("boss", "pa:ss word")) == ("boss", "pa:ss word")
    assert parse_basic_credentials(_basic("jörg", "пароль")) == ("jörg", "пароль")
    assert parse_basic_credentials("basic " + _basic("a", "")[6:]) == ("a", "")
    assert parse_basic_credentials(None) is None
    assert parse_basic_credentials("Basic " + "=" * 8) is None


async def test_utf8_credentials_log_in(api: Api) -> None:
    api.backend.add("jörg", "пароль-123", read=True, write=True, owner=True)
    response = await api.client.get(
        "/api/get_users", headers={"Authorization": _basic("jörg", "пароль-123")}, auth=None
    )
    assert response.status_code == 200


# -- stats and the screen -----------------------------------------------------------------


async def test_bottleneck_stats(api: Api) -> None:
    response = await api.client.get("/api/get_bottleneck_stats")
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == BOTTLENECK


async def test_frame_stats_passes_client_and_requester(api: Api) -> None:
    for client in ("auto", "all", "none", "127.0.0.1_1627638421"):
        response = await api.client.get("/api/get_frame_stats", params={"client": client})
        assert response.status_code == 200
        assert response.json() == FRAME_STATS
    assert api.backend.calls_to("frame_stats") == [
        ("auto", "boss"),
        ("all", "boss"),
        ("none", "boss"),
        ("127.0.0.1_1627638421", "boss"),
    ]


@pytest.mark.parametrize(
    "query", ["", "?client=", "?other=auto", "?client=auto&client=all", "?client=" + "x" * 257]
)
async def test_frame_stats_bad_client_is_400(api: Api, query: str) -> None:
    response = await api.client.get("/api/get_frame_stats" + query)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "client" in response.text
    assert not api.backend.calls_to("frame_stats")


async def test_screenshot_defaults(api: Api) -> None:
    response = await api.client.get("/api/get_screenshot")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.content == JPEG
    assert imagecodecs.jpeg8_decode(response.content).shape == (48, 64, 3)
    assert api.backend.calls_to("screenshot") == [(None, None, 7, False)]


async def test_screenshot_parameters(api: Api) -> None:
    response = await api.client.get(
        "/api/get_screenshot",
        params={"width": "640", "height": "16384", "quality": "0", "deduplicate": "false"},
    )
    assert response.status_code == 200
    response = await api.client.get(
        "/api/get_screenshot", params={"width": "1", "quality": "9", "deduplicate": "true"}
    )
    assert response.status_code == 200
    assert api.backend.calls_to("screenshot") == [(640, 16384, 0, False), (1, None, 9, True)]


async def test_screenshot_unchanged_is_204(api: Api) -> None:
    api.backend.screenshot_result = None
    response = await api.client.get("/api/get_screenshot", params={"deduplicate": "true"})
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.parametrize(
    "query",
    [
        "width=abc",
        "width=0",
        "width=-1",
        "width=16385",
        "width=1.5",
        "width=",
        "width=%EF%BC%91%EF%BC%92",  # full-width digits: int() would take them
        "width=1e3",
        "height=99999",
        "height=+5",
        "quality=10",
        "quality=-1",
        "quality=a",
        "quality=",
        "quality=07",
        "deduplicate=yes",
        "deduplicate=t",  # KasmVNC reads any prefix of "true" as true
        "deduplicate=TRUE",
        "deduplicate=",
        "quality=1&quality=2",
    ],
)
async def test_screenshot_bad_parameters_are_400(api: Api, query: str) -> None:
    response = await api.client.get("/api/get_screenshot?" + query)
    assert response.status_code == 400
    assert not api.backend.calls_to("screenshot")


async def test_send_full_frame(api: Api) -> None:
    response = await api.client.get("/api/send_full_frame")
    assert (response.status_code, response.text) == (200, "OK")
    assert api.backend.calls_to("send_full_frame") == [()]


async def test_get_users_and_sessions(api: Api) -> None:
    users = (await api.client.get("/api/get_users")).json()
    assert users == [
        {"user": "boss", "read": True, "write": True, "owner": True},
        {"user": "watcher", "read": True, "write": False, "owner": False},
        {"user": "typist", "read": True, "write": True, "owner": False},
    ]
    sessions = (await api.client.get("/api/get_sessions")).json()
    assert sessions == {
        "users": [
            {
                "username": "typist",
                "connected_since": 1700000000.25,
                "connection": "127.0.0.1_1700000000.000001::websocket",
            }
        ]
    }


# -- users: single (GET) ------------------------------------------------------------------


async def test_create_user_get(api: Api) -> None:
    response = await api.client.get(
        "/api/create_user", params={"name": "fred", "password": "123456", "write": "true"}
    )
    assert (response.status_code, response.text) == (200, "OK")
    assert api.backend.users["fred"] == ApiUser("fred", read=False, write=True, owner=False)
    assert api.backend.calls_to("create_user") == [("fred", "123456", False, True, False, False)]
    # A new owner can use the API at once.
    await api.client.get("/api/create_user?name=ann&password=ann-pw&owner=true&read=true")
    response = await api.client.get("/api/get_users", auth=("ann", "ann-pw"))
    assert response.status_code == 200


async def test_create_existing_user_get_is_400(api: Api) -> None:
    response = await api.client.get("/api/create_user?name=typist&password=new-password")
    assert response.status_code == 400
    assert response.text == "user exists"
    assert api.backend.passwords["typist"] == WRITER[1]


@pytest.mark.parametrize(
    "query",
    [
        "password=123456",
        "name=fred",
        "name=&password=123456",
        "name=fred&password=",
        "name=fred&password=123456&read=yes",
        "name=fred&password=123456&owner=1",
        "name=fred&name=joe&password=123456",
        "name=fr:ed&password=123456",  # the backend's rule
        "name=fred&password=123",  # the backend's rule
    ],
)
async def test_create_user_get_bad_input_is_400(api: Api, query: str) -> None:
    response = await api.client.get("/api/create_user?" + query)
    assert response.status_code == 400
    assert set(api.backend.users) == {"boss", "watcher", "typist"}


async def test_non_utf8_query_is_never_500(api: Api) -> None:
    response = await api.client.get("/api/create_user?name=%FF%FE&password=%C3%28abcdef")
    assert response.status_code in (200, 400)
    response = await api.client.get("/api/get_frame_stats?client=%FF")
    assert response.status_code == 200


async def test_update_user_get_changes_only_what_is_given(api: Api) -> None:
    response = await api.client.get("/api/update_user?name=typist&write=false")
    assert response.status_code == 200
    assert api.backend.users["typist"] == ApiUser("typist", read=True, write=False, owner=False)
    assert api.backend.passwords["typist"] == WRITER[1]

    response = await api.client.get(
        "/api/update_user", params={"name": "typist", "password": "fresh-pw", "owner": "true"}
    )
    assert response.status_code == 200
    assert api.backend.users["typist"] == ApiUser("typist", read=True, write=False, owner=True)
    assert (await api.client.get("/api/get_users", auth=("typist", "fresh-pw"))).status_code == 200
    assert api.backend.calls_to("update_user") == [
        ("typist", None, None, False, None),
        ("typist", "fresh-pw", None, None, True),
    ]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("name=ghost&read=true", "unknown user"),
        ("read=true", "name is required"),
        ("name=typist&read=maybe", "read must be true or false"),
        ("name=typist&password=abc", "password too short"),
    ],
)
async def test_update_user_get_bad_input_is_400(api: Api, query: str, reason: str) -> None:
    response = await api.client.get("/api/update_user?" + query)
    assert (response.status_code, response.text) == (400, reason)
    assert api.backend.users["typist"] == ApiUser("typist", read=True, write=True, owner=False)


async def test_remove_user_get(api: Api) -> None:
    response = await api.client.get("/api/remove_user?name=typist")
    assert response.status_code == 200
    assert "typist" not in api.backend.users
    assert (await api.client.get("/api/remove_user?name=typist")).status_code == 400
    assert (await api.client.get("/api/remove_user")).status_code == 400


# -- users: bulk (POST) -------------------------------------------------------------------


async def test_create_user_post_inserts_or_replaces(api: Api) -> None:
    body = [
        {"user": "fred", "password": "fred-pw", "read": True, "write": True, "owner": False},
        {"user": "typist", "password": "replaced-pw", "read": True},
    ]
    response = await api.client.post("/api/create_user", json=body)
    assert (response.status_code, response.text) == (200, "OK")
    assert api.backend.users["fred"] == ApiUser("fred", read=True, write=True, owner=False)
    # Replaced as a whole: flags not listed are false.
    assert api.backend.users["typist"] == ApiUser("typist", read=True, write=False, owner=False)
    assert api.backend.passwords["typist"] == "replaced-pw"
    assert all(call[-1] is True for call in api.backend.calls_to("create_user"))


async def test_update_user_post_overwrites_flags(api: Api) -> None:
    body = [
        {"user": "typist", "read": True},
        {"user": "watcher", "write": True, "read": True, "owner": True, "password": "new-pw-1"},
    ]
    response = await api.client.post("/api/update_user", json=body)
    assert response.status_code == 200
    assert api.backend.users["typist"] == ApiUser("typist", read=True, write=False, owner=False)
    assert api.backend.users["watcher"] == ApiUser("watcher", read=True, write=True, owner=True)
    assert api.backend.passwords == {
        "boss": OWNER[1],
        "watcher": "new-pw-1",
        "typist": WRITER[1],
    }


async def test_remove_user_post(api: Api) -> None:
    response = await api.client.post(
        "/api/remove_user", json=[{"user": "typist"}, {"user": "watcher"}]
    )
    assert response.status_code == 200
    assert set(api.backend.users) == {"boss"}


BAD_BULK: list[tuple[str, Any, str]] = [
    ("create_user", {"user": "fred", "password": "fred-pw"}, "body must be a JSON list"),
    ("create_user", [{"user": "fred"}], "entry 0: password is required"),
    ("create_user", [{"user": "", "password": "fred-pw"}], "entry 0: user must be"),
    ("create_user", [{"user": 7, "password": "fred-pw"}], "entry 0: user must be"),
    ("create_user", [{"user": "a", "password": 123456}], "entry 0: password must be a string"),
    ("create_user", [{"user": "a", "password": "abcdef", "read": "true"}], "entry 0: read must"),
    ("create_user", [{"user": "a", "password": "abcdef", "write": 1}], "entry 0: write must"),
    ("create_user", [{"user": "a", "password": "abcdef", "wirte": True}], "unknown key 'wirte'"),
    ("create_user", ["fred"], "entry 0 is not an object"),
    ("update_user", [{"user": "typist"}, {"user": "typist"}], "entry 1: user 'typist' listed"),
    ("update_user", [{"user": "typist"}, {"user": "ghost"}], "unknown user 'ghost'"),
    ("update_user", [{"user": "typist", "password": None}], "entry 0: password must be"),
    ("remove_user", [{"user": "typist"}, {"user": "ghost"}], "unknown user 'ghost'"),
    ("remove_user", [{"user": "typist", "password": "x"}], "unknown key 'password'"),
    ("remove_user", [{"user": "typist"}] * 2, "listed twice"),
    ("create_user", [{}] * (MAX_BULK_ENTRIES + 1), "at most 1000 entries"),
]


@pytest.mark.parametrize(("route", "body", "reason"), BAD_BULK)
async def test_bad_bulk_changes_nothing(api: Api, route: str, body: Any, reason: str) -> None:
    before = dict(api.backend.users)
    # The first entry is valid where possible: nothing may be applied before
    # the bad one is found.
    response = await api.client.post(f"/api/{route}", json=body)
    assert response.status_code == 400
    assert reason in response.text
    assert api.backend.users == before
    assert not api.backend.calls_to(route)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'[{"user": "fred",',
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser's recursion limit
        b'[{"user": "fred", "password": "abcdef", "read": ' + b"1" * 5000 + b"}]",
        b'[{"user": "fr\xffed", "password": "abcdef"}]',  # not UTF-8
        b"NaN",
    ],
    ids=["empty", "text", "truncated", "deep", "huge-int", "not-utf8", "nan"],
)
async def test_malformed_json_is_400(api: Api, raw: bytes) -> None:
    for route in ("create_user", "update_user", "remove_user"):
        response = await api.client.post(
            f"/api/{route}", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
    assert set(api.backend.users) == {"boss", "watcher", "typist"}


async def _raw_post(api: Api, path: str, headers: bytes, body: list[bytes]) -> tuple[int, bytes]:
    """POST with hand-written framing over TLS, then read the answer. For the
    cases where the server answers before the body is complete, which httpx
    (it sends the whole body first) reports as a broken connection."""
    url = api.client.base_url
    assert url.port is not None
    stream = await trio.open_ssl_over_tcp_stream(url.host, url.port, ssl_context=api.trust)
    try:
        with trio.fail_after(10):
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\n"
                f"Authorization: {_basic(*OWNER)}\r\n".encode()
                + headers
                + b"\r\n"
            )
            for part in body:
                await stream.send_all(part)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                answer += chunk
    finally:
        await trio.aclose_forcefully(stream)
    status_line = answer.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), answer


async def test_oversize_body_is_413_before_it_is_read(api: Api) -> None:
    # The declared length alone is enough; none of the body is sent.
    status, _ = await _raw_post(
        api, "/api/create_user", f"Content-Length: {MAX_BODY_BYTES + 1}\r\n".encode(), []
    )
    assert status == 413
    assert not api.backend.calls_to("create_user")


async def test_oversize_chunked_body_is_413(api: Api) -> None:
    # No Content-Length: the limit has to hold while the body is read.
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    status, _ = await _raw_post(
        api,
        "/api/create_user",
        b"Transfer-Encoding: chunked\r\n",
        [b"1\r\n[\r\n"] + [chunk] * (MAX_BODY_BYTES // 0x10000 + 1),
    )
    assert status == 413
    assert not api.backend.calls_to("create_user")


async def test_slow_body_is_408(api: Api) -> None:
    api.app.config["BODY_TIMEOUT"] = 0.2
    status, _ = await _raw_post(api, "/api/create_user", b"Content-Length: 10\r\n", [b"["])
    assert status == 408


async def test_body_at_the_limit_is_read(api: Api) -> None:
    entries = [{"user": f"user{i}", "password": "secret-pw"} for i in range(MAX_BULK_ENTRIES)]
    body = json.dumps(entries).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))
    response = await api.client.post("/api/create_user", content=body)
    assert response.status_code == 200
    assert len(api.backend.users) == 3 + MAX_BULK_ENTRIES


# -- the OpenAPI document -----------------------------------------------------------------


def _served_routes(app: QuartTrio) -> set[tuple[str, str]]:
    return {
        (rule.rule, method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith(BLUEPRINT_NAME + ".")
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


async def test_openapi_document_matches_the_routes(api: Api) -> None:
    response = await api.client.get("/api/openapi.json")
    served = response.json()
    assert served == openapi_document()
    assert served["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in served["paths"].items() for method in item}
    assert documented == _served_routes(api.app)


def test_openapi_document_is_complete() -> None:
    document = openapi_document()
    for ref in _refs(document):
        kind, name = ref.removeprefix("#/components/").split("/")
        assert name in document["components"][kind], ref
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert operation["summary"], where
            assert {"200", "401", "403", "429"} <= set(operation["responses"]), where
            if method == "post":
                assert {"400", "413"} <= set(operation["responses"]), where
                assert operation["requestBody"]["required"], where
            for parameter in operation.get("parameters", []):
                assert parameter["in"] == "query", where
                assert parameter["description"] and parameter["schema"], where
    # Every query parameter the tests above use is documented.
    params = {
        (path, parameter["name"])
        for path, item in document["paths"].items()
        for parameter in item.get("get", {}).get("parameters", [])
    }
    for name in ("width", "height", "quality", "deduplicate"):
        assert ("/api/get_screenshot", name) in params
    for route in ("create_user", "update_user"):
        for name in ("name", "password", "read", "write", "owner"):
            assert (f"/api/{route}", name) in params
    assert ("/api/remove_user", "name") in params
    assert ("/api/get_frame_stats", "client") in params

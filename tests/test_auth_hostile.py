"""Hostile logins and hostile input against a real server started in-process.

One server per test: the RFB port (VeNCrypt X509Plain with the users file,
and classic VNC authentication with a VNC password) and the HTTPS port (the
page, RFB over WebSocket at /websockify and the developer API, all behind
HTTP Basic), with a trustme certificate. Every entry gets wrong, empty,
overlong and non-UTF-8 credentials; failures are rate-limited per address
across entries; unknown names and wrong passwords do the same hashing
(counted, not timed); read-only users cannot reach the desktop with any
input message in either dialect; rights taken away through the API or the
users file are gone from open connections at once.

docs/security.md lists what each test proves.
"""

from __future__ import annotations

import base64
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
import trio.testing
import trustme
from tls_files import issue
from trio_websocket import (
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

import trivnc
from trivnc.api.backend import ApiUser
from trivnc.rfb.connection import Dialect, SecurityConfig, ServerConnection
from trivnc.rfb.constants import (
    ClientMessage,
    ClipboardFlags,
    Encoding,
    PseudoEncoding,
    SecurityType,
    VeNCryptSubtype,
)
from trivnc.rfb.errors import RemoteProtocolError
from trivnc.server import Server
from trivnc.server import users as users_mod
from trivnc.server.users import UserStore, sha256_crypt
from trivnc.sources.array import (
    ArraySource,
    ClipboardInput,
    InputEvent,
    KeyInput,
    PointerInput,
    ResizeRequest,
    ScrollInput,
)
from trivnc.testing.aclient import (
    ConnectionClosedError,
    HandshakeError,
    VncClient,
    open_test_client,
    wrap_stream,
)
from trivnc.testing.images import desktop_like
from trivnc.testing.websocket import WebSocketByteStream

USERS = {
    "boss": ("boss-secret", "rwo"),
    "typist": ("typist-secret", "rw"),
    "watcher": ("watcher-secret", "r"),
}
VNC_PASSWORD = "vnc-pass"
W, H = 160, 100
#: The server's default: LoginRateLimiter(max_failures=5).
MAX_FAILURES = 5
ENCODINGS = [
    Encoding.RAW,
    PseudoEncoding.DESKTOP_SIZE,
    PseudoEncoding.EXTENDED_DESKTOP_SIZE,
    PseudoEncoding.EXTENDED_CLIPBOARD,
    PseudoEncoding.QEMU_EXTENDED_KEY_EVENT,
]


@dataclass
class Setup:
    server: Server
    source: ArraySource
    users: Path
    ca: trustme.CA
    #: Every input event that reached the desktop, in order.
    inputs: list[InputEvent] = field(default_factory=list)

    @property
    def store(self) -> UserStore:
        store = self.server.context.users
        assert store is not None
        return store

    def client_ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def digests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(salt length, rounds) of every SHA-256-crypt computed, in any thread:
    the expensive part of a login, counted instead of timed."""
    calls: list[tuple[int, int]] = []
    real = users_mod._digest

    def counting(password: bytes, salt: bytes, rounds: int) -> bytes:
        calls.append((len(salt), rounds))
        return real(password, salt, rounds)

    monkeypatch.setattr(users_mod, "_digest", counting)
    return calls


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    tls = issue(tmp_path)
    users = tmp_path / "users"
    store = UserStore(users)
    for name, (password, perms) in USERS.items():
        store.create(name, password, read="r" in perms, write="w" in perms, owner="o" in perms)
    inputs: list[InputEvent] = []

    async def record(event: InputEvent) -> None:
        inputs.append(event)

    source = ArraySource.from_array(desktop_like(W, H, seed=9), resizable=True, on_input=record)
    config = trivnc.Config(
        source=source,
        rfb_port=0,
        web_port=0,
        users_file=users,
        cert=tls.cert,
        key=tls.key,
        vnc_password=VNC_PASSWORD,
        handshake_timeout=5,
    )
    server = await nursery.start(trivnc.serve, config)
    yield Setup(server, source, users, tls.ca, inputs)


# -- the five ways in -------------------------------------------------------------------

OK, DENIED, BLOCKED, FORBIDDEN = "ok", "denied", "blocked", "forbidden"
E = TypeVar("E", bound=BaseException)
HTTP_OUTCOMES = {200: OK, 302: OK, 101: OK, 401: DENIED, 429: BLOCKED, 403: FORBIDDEN}


def basic_header(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


def http_client(setup: Setup) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{setup.server.web_port}",
        verify=setup.client_ssl(),
        timeout=20,
    )


async def http_attempt(setup: Setup, path: str, header: bytes) -> str:
    async with http_client(setup) as http:
        response = await http.get(path, headers=[(b"Authorization", header)])
    assert response.status_code in HTTP_OUTCOMES, (response.status_code, response.text)
    return HTTP_OUTCOMES[response.status_code]


@asynccontextmanager
async def open_ws(setup: Setup, header: bytes) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket on /websockify. Not trio_websocket's open_websocket_url:
    it leaves the socket open when the server rejects the upgrade or closes
    first, so the TLS stream is made and closed here."""
    tcp = await trio.open_tcp_stream("127.0.0.1", setup.server.web_port)
    tls = trio.SSLStream(tcp, setup.client_ssl(), server_hostname="127.0.0.1")
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                ws = await wrap_client_stream(
                    nursery,
                    tls,
                    "127.0.0.1",
                    "/websockify",
                    subprotocols=["binary"],
                    extra_headers=[(b"Authorization", header)],
                    message_queue_size=64,
                )
            try:
                yield ws
            finally:
                await ws.aclose()
    finally:
        await trio.aclose_forcefully(tls)


async def websocket_attempt(setup: Setup, header: bytes) -> str:
    rejected: list[ConnectionRejected] = []
    try:
        async with open_ws(setup, header):
            pass
    except* ConnectionRejected as group:
        rejected += _leaves(group, ConnectionRejected)
    if not rejected:
        return OK
    status = rejected[0].status_code
    assert status in HTTP_OUTCOMES, (status, rejected[0].body)
    return HTTP_OUTCOMES[status]


def _leaves(group: BaseExceptionGroup[Any], kind: type[E]) -> list[E]:
    out: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc, kind)
        elif isinstance(exc, kind):
            out.append(exc)
    return out


class Reader:
    """Exactly-n reads from a stream, never reading past what was asked
    (the bytes after VeNCrypt's subtype belong to the TLS handshake)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self.stream.receive_some(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    async def u32(self) -> int:
        value: int = struct.unpack(">I", await self.exactly(4))[0]
        return value


@dataclass
class VeNCryptResult:
    status: int  # SecurityResult: 0 OK
    reason: str
    stream: trio.abc.Stream


async def vencrypt_raw(
    setup: Setup,
    user: bytes,
    password: bytes,
    *,
    subtype: int = VeNCryptSubtype.X509_PLAIN,
    declared: tuple[int, int] | None = None,
) -> VeNCryptResult:
    """VeNCrypt by hand, so that credentials can be any bytes and declared
    lengths can lie. Returns the SecurityResult and the open stream."""
    tcp = await trio.open_tcp_stream("127.0.0.1", setup.server.rfb_port)
    reader = Reader(tcp)
    with trio.fail_after(10):
        assert await reader.exactly(12) == b"RFB 003.008\n"
        await tcp.send_all(b"RFB 003.008\n")
        count = (await reader.exactly(1))[0]
        if count == 0:
            refusal = await reader.exactly(await reader.u32())
            return VeNCryptResult(1, refusal.decode(), tcp)
        types = await reader.exactly(count)
        assert SecurityType.VENCRYPT in types
        await tcp.send_all(bytes([SecurityType.VENCRYPT]))
        assert await reader.exactly(2) == b"\x00\x02"
        await tcp.send_all(b"\x00\x02")
        assert await reader.exactly(1) == b"\x00"
        n = (await reader.exactly(1))[0]
        offered = struct.unpack(f">{n}I", await reader.exactly(4 * n))
        assert offered == (VeNCryptSubtype.X509_PLAIN,)  # TLS only, never Plain
        await tcp.send_all(struct.pack(">I", subtype))
        stream: trio.abc.Stream = tcp
        if subtype in offered:
            assert await reader.exactly(1) == b"\x01"
            stream = trio.SSLStream(tcp, setup.client_ssl(), server_hostname="127.0.0.1")
            await stream.do_handshake()
            reader = Reader(stream)
            ulen, plen = declared or (len(user), len(password))
            await stream.send_all(struct.pack(">II", ulen, plen) + user + password)
        try:
            status = await reader.u32()
            reason = "" if status == 0 else (await reader.exactly(await reader.u32())).decode()
        except (EOFError, trio.BrokenResourceError) as exc:
            # Closed on us (a reset while unread bytes were in flight): refused.
            return VeNCryptResult(-1, f"connection closed: {exc}", stream)
        return VeNCryptResult(status, reason, stream)


async def vencrypt_attempt(setup: Setup, user: bytes, password: bytes) -> str:
    result = await vencrypt_raw(setup, user, password)
    await trio.aclose_forcefully(result.stream)
    if result.status == 0:
        return OK
    return BLOCKED if "too many failed logins" in result.reason else DENIED


async def vncauth_attempt(setup: Setup, password: bytes) -> str:
    try:
        async with open_test_client(
            "127.0.0.1",
            setup.server.rfb_port,
            vnc_password=password,
            security_types=[SecurityType.VNC_AUTH],
            encodings=None,
        ):
            return OK
    except HandshakeError as exc:
        return BLOCKED if "too many failed logins" in exc.reason else DENIED


ENTRIES = ["vencrypt", "vncauth", "page", "websocket", "api"]
#: The user each entry lets in (the API needs owner permission).
GOOD_USER = {"vencrypt": "typist", "page": "typist", "websocket": "typist", "api": "boss"}


async def attempt(
    setup: Setup, entry: str, user: bytes, password: bytes, header: bytes | None = None
) -> str:
    """Log in through `entry`; `header` replaces the Authorization header
    built from user and password (HTTP entries only)."""
    header = header if header is not None else basic_header(user, password)
    if entry == "vencrypt":
        return await vencrypt_attempt(setup, user, password)
    if entry == "vncauth":
        return await vncauth_attempt(setup, password)
    if entry == "page":
        return await http_attempt(setup, "/", header)
    if entry == "api":
        return await http_attempt(setup, "/api/get_users", header)
    assert entry == "websocket"
    return await websocket_attempt(setup, header)


async def good_attempt(setup: Setup, entry: str) -> str:
    if entry == "vncauth":
        return await attempt(setup, entry, b"", VNC_PASSWORD.encode())
    name = GOOD_USER[entry]
    return await attempt(setup, entry, name.encode(), USERS[name][0].encode())


# -- wrong, empty, overlong and non-UTF-8 credentials ------------------------------------

BAD_CREDENTIALS: list[tuple[str, bytes, bytes]] = [
    ("wrong-password", b"typist", b"not-the-password"),
    ("unknown-user", b"mallory", b"typist-secret"),
    ("empty-both", b"", b""),
    ("empty-password", b"typist", b""),
    ("empty-user", b"", b"typist-secret"),
    ("other-users-password", b"typist", b"boss-secret"),
    ("case-changed-user", b"TYPIST", b"typist-secret"),
    ("trailing-nul", b"typist", b"typist-secret\x00"),
    ("nul-in-user", b"typist\x00", b"typist-secret"),
    ("overlong-password", b"typist", b"typist-secret" + b"x" * 2900),
    ("overlong-user", b"t" * 3000, b"typist-secret"),
    ("huge-password", b"typist", b"typist-secret" + b"x" * 5000),
    ("non-utf8-user", b"typ\xffist", b"typist-secret"),
    ("non-utf8-password", b"typist", b"typist-secret\xc3("),
    ("surrogate-password", b"typist", "typist-secret\udc80".encode("utf-8", "surrogatepass")),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    ("user", "password"),
    [pytest.param(u, p, id=name) for name, u, p in BAD_CREDENTIALS],
)
async def test_bad_credentials_are_refused(
    setup: Setup, entry: str, user: bytes, password: bytes
) -> None:
    # One wrong try, then the right credentials still work (one failure does
    # not block), so the refusal was about the credentials.
    assert await attempt(setup, entry, user, password) == DENIED
    assert await good_attempt(setup, entry) == OK


MALFORMED_HEADERS: list[tuple[str, bytes]] = [
    ("non-ascii-token", b"Basic \xff\xfe\xfd"),
    ("latin1-token", "Basic caf\xe9".encode("latin-1")),
    ("bad-base64", b"Basic !!!!"),
    ("unpadded-base64", b"Basic dHlwaXN0OnR5cGlzdC1zZWNyZXQ"),
    ("no-colon", b"Basic " + base64.b64encode(b"typist")),
    ("other-scheme", b"Bearer " + base64.b64encode(b"typist:typist-secret")),
    ("scheme-only", b"Basic"),
    ("empty", b""),
    ("overlong-header", b"Basic " + base64.b64encode(b"typist:" + b"x" * 8000)),
    ("non-utf8-inside", b"Basic " + base64.b64encode(b"typist:\xff\xfe")),
]


@pytest.mark.parametrize("entry", ["page", "websocket", "api"])
@pytest.mark.parametrize("header", [pytest.param(h, id=name) for name, h in MALFORMED_HEADERS])
async def test_malformed_basic_headers_are_401_never_500(
    setup: Setup, entry: str, header: bytes
) -> None:
    assert await attempt(setup, entry, b"", b"", header=header) == DENIED
    assert await good_attempt(setup, entry) == OK


async def test_vencrypt_refuses_plain_without_tls_and_lying_lengths(setup: Setup) -> None:
    # Plain and TLSPlain are not offered: choosing them ends the connection
    # before any credential could be sent in the clear.
    for subtype in (VeNCryptSubtype.PLAIN, VeNCryptSubtype.TLS_PLAIN):
        result = await vencrypt_raw(setup, b"typist", b"typist-secret", subtype=subtype)
        assert result.status != 0 and "not offered" in result.reason
        await trio.aclose_forcefully(result.stream)
    # Declared lengths beyond the limit are refused at once, without waiting
    # for (or allocating) the bytes they announce.
    with trio.fail_after(3):
        result = await vencrypt_raw(setup, b"", b"", declared=(1 << 31, 1 << 31))
    assert result.status != 0 and "too long" in result.reason
    await trio.aclose_forcefully(result.stream)


async def test_users_without_read_permission_get_nothing(setup: Setup) -> None:
    setup.store.create("apionly", "apionly-secret", read=False, write=False, owner=True)
    creds = (b"apionly", b"apionly-secret")
    assert await attempt(setup, "api", *creds) == OK
    assert await attempt(setup, "page", *creds) == FORBIDDEN
    assert await attempt(setup, "websocket", *creds) == FORBIDDEN
    result = await vencrypt_raw(setup, *creds)
    assert result.status != 0 and "may not view" in result.reason
    await trio.aclose_forcefully(result.stream)
    # And a reader is no owner.
    assert await attempt(setup, "api", b"watcher", b"watcher-secret") == FORBIDDEN


# -- rate limiting -------------------------------------------------------------------------


async def fail_through(setup: Setup, entry: str, times: int = MAX_FAILURES) -> None:
    for _ in range(times):
        assert await attempt(setup, entry, b"typist", b"wrong-password") == DENIED
    if entry == "vncauth" and times >= MAX_FAILURES:
        # A VNC-auth failure is counted when its connection has closed, just
        # after the client read the reason.
        with trio.fail_after(5):
            while not setup.server.context.login_limiter.blocked("127.0.0.1"):
                await trio.sleep(0.01)


@pytest.mark.parametrize("entry", ENTRIES)
async def test_failed_logins_block_the_address(
    setup: Setup, entry: str, digests: list[tuple[int, int]]
) -> None:
    await fail_through(setup, entry)
    digests.clear()
    # Now even the right credentials are refused, without checking them.
    assert await good_attempt(setup, entry) == BLOCKED
    assert digests == []
    assert setup.server.context.login_limiter.blocked("127.0.0.1") > 0


@pytest.mark.parametrize(
    ("first", "then"),
    [("api", "vencrypt"), ("vencrypt", "websocket"), ("vncauth", "api"), ("page", "vncauth")],
)
async def test_the_limit_is_shared_by_every_entry(setup: Setup, first: str, then: str) -> None:
    await fail_through(setup, first)
    assert await good_attempt(setup, then) == BLOCKED


async def test_a_success_forgets_earlier_failures(setup: Setup) -> None:
    await fail_through(setup, "api", MAX_FAILURES - 1)
    assert await good_attempt(setup, "vencrypt") == OK
    await fail_through(setup, "page", MAX_FAILURES - 1)
    assert await good_attempt(setup, "api") == OK


@pytest.mark.parametrize("entry", ["vencrypt", "api", "websocket", "page"])
async def test_simultaneous_guesses_cannot_outrun_the_limit(
    setup: Setup, entry: str, digests: list[tuple[int, int]]
) -> None:
    digests.clear()
    outcomes: list[str] = []

    async def guess(i: int) -> None:
        outcomes.append(await attempt(setup, entry, b"typist", f"guess-{i}".encode()))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(guess, i)
    # Only MAX_FAILURES passwords were checked; the others waited their
    # turn and found the address blocked (the web port then answers 401 or
    # 429, VeNCrypt names the limit). None got in, and now nobody does.
    assert len(digests) == MAX_FAILURES, outcomes
    assert set(outcomes) <= {DENIED, BLOCKED} and len(outcomes) == 20
    if entry == "vencrypt":
        assert outcomes.count(BLOCKED) == 20 - MAX_FAILURES
    assert await good_attempt(setup, entry) == BLOCKED


# -- unknown users cost what wrong passwords cost --------------------------------------------


@pytest.mark.parametrize("entry", ["vencrypt", "page", "websocket", "api"])
async def test_unknown_user_does_the_same_hashing_as_a_wrong_password(
    setup: Setup, entry: str, digests: list[tuple[int, int]]
) -> None:
    digests.clear()
    assert await attempt(setup, entry, b"typist", b"wrong-password") == DENIED
    wrong_password = list(digests)
    digests.clear()
    assert await attempt(setup, entry, b"no-such-user", b"wrong-password") == DENIED
    unknown_user = list(digests)
    digests.clear()
    assert await attempt(setup, entry, b"typist", b"typist-secret" + b"y" * 2000) == DENIED
    overlong = list(digests)
    # One SHA-256-crypt with the same salt length and rounds either way.
    assert wrong_password == unknown_user == [(16, 5000)]
    # Too long for anyone: refused before hashing, whoever the user is.
    assert overlong == []


def test_the_dummy_hash_follows_the_stored_hashes(
    tmp_path: Path, digests: list[tuple[int, int]]
) -> None:
    # A file written by KasmVNC (fixed 4-character salt) or with more rounds:
    # an unknown name must cost what a known one costs, not trivnc's default.
    path = tmp_path / "users"
    path.write_text(
        "".join(
            f"{name}:{sha256_crypt(name + '-secret', '$5$rounds=7000$kasm')}:rw\n"
            for name in ("alice", "bob", "carol")
        )
    )
    store = UserStore(path)
    for add in (False, True):
        digests.clear()
        assert store.verify("alice", "wrong-password") is None
        assert store.verify("mallory", "wrong-password") is None
        assert digests == [(4, 7000), (4, 7000)], digests
        if add:
            break
        # Still so after a change through the store.
        store.update("bob", write=False)


# -- read-only users and input, in both dialects ---------------------------------------------


def key_event(keysym: int, down: bool) -> bytes:
    return struct.pack(">BBxxI", ClientMessage.KEY_EVENT, down, keysym)


def qemu_key_event(keysym: int, keycode: int, down: bool) -> bytes:
    return struct.pack(">BBHII", ClientMessage.QEMU, 0, down, keysym, keycode)


def pointer_event(x: int, y: int, buttons: int) -> bytes:
    return struct.pack(">BBHH", ClientMessage.POINTER_EVENT, buttons, x, y)


def kasm_pointer_event(x: int, y: int, buttons: int, sx: int, sy: int) -> bytes:
    # KasmVNC's 11-byte PointerEvent: U16 mask, position, S16 scroll deltas.
    return struct.pack(">BHHHhh", ClientMessage.POINTER_EVENT, buttons, x, y, sx, sy)


def cut_text(text: bytes) -> bytes:
    return struct.pack(">BxxxI", ClientMessage.CLIENT_CUT_TEXT, len(text)) + text


def clipboard_provide(text: str) -> bytes:
    data = text.encode() + b"\0"
    payload = struct.pack(">I", ClipboardFlags.PROVIDE | ClipboardFlags.TEXT)
    payload += zlib.compress(struct.pack(">I", len(data)) + data)
    return struct.pack(">Bxxxi", ClientMessage.CLIENT_CUT_TEXT, -len(payload)) + payload


def kasm_binary_clipboard(mime: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">BBB", ClientMessage.KASM_BINARY_CLIPBOARD, 1, len(mime))
        + mime
        + struct.pack(">I", len(data))
        + data
    )


def set_desktop_size(w: int, h: int) -> bytes:
    return struct.pack(">BxHHBx", ClientMessage.SET_DESKTOP_SIZE, w, h, 1) + struct.pack(
        ">IHHHHI", 0, 0, 0, w, h, 0
    )


def kasm_direct_mouse() -> bytes:
    return bytes([ClientMessage.KASM_DIRECT_MOUSE]) + bytes(range(1, 10))


#: Every input-bearing message, by dialect: what a viewer could try.
STANDARD_INPUT = [
    key_event(ord("k"), True),
    key_event(ord("k"), False),
    qemu_key_event(ord("q"), 0x10, True),
    qemu_key_event(ord("q"), 0x10, False),
    pointer_event(10, 20, 1),
    pointer_event(11, 21, 0),
    pointer_event(12, 22, 1 << 3),  # wheel up
    cut_text(b"old-style cut text"),
    clipboard_provide("extended clipboard text"),
    set_desktop_size(W // 2, H // 2),
]
KASM_INPUT = [
    key_event(ord("k"), True),
    key_event(ord("k"), False),
    qemu_key_event(ord("q"), 0x10, True),
    qemu_key_event(ord("q"), 0x10, False),
    kasm_pointer_event(10, 20, 1, 0, 0),
    kasm_pointer_event(11, 21, 0, 3, -2),  # scroll in the pointer message
    cut_text(b"old-style cut text"),  # KasmVNC ignores it for everyone
    clipboard_provide("extended clipboard text"),
    kasm_binary_clipboard(b"text/plain", b"binary clipboard text"),
    kasm_binary_clipboard(b"image/png", b"\x89PNG not really"),
    set_desktop_size(W // 2, H // 2),
    kasm_direct_mouse(),
]


def user_client(setup: Setup, name: str) -> AbstractAsyncContextManager[VncClient]:
    return open_test_client(
        "127.0.0.1",
        setup.server.rfb_port,
        username=name,
        password=USERS[name][0],
        ssl_context=setup.client_ssl(),
        security_types=[SecurityType.VENCRYPT],
        encodings=ENCODINGS,
    )


@asynccontextmanager
async def websocket_client(setup: Setup, name: str) -> AsyncIterator[VncClient]:
    header = basic_header(name.encode(), USERS[name][0].encode())
    async with (
        open_ws(setup, header) as ws,
        wrap_stream(WebSocketByteStream(ws), encodings=ENCODINGS) as client,
    ):
        yield client


@asynccontextmanager
async def kasm_client(
    setup: Setup, nursery: trio.Nursery, user: ApiUser
) -> AsyncIterator[VncClient]:
    """A KasmVNC-dialect session of the running server, as the web port
    starts one after HTTP Basic (security None, the user's rights carried
    by `user`), over an in-memory stream: no trivnc transport selects the
    Kasm dialect on its own."""
    client_end, server_end = trio.testing.memory_stream_pair()
    context = setup.server.context
    conn = ServerConnection(
        SecurityConfig(allow_none=True),
        dialect=Dialect.KASM,
        clipboard_max_size=context.config.clipboard_max_size,
    )
    nursery.start_soon(
        partial(
            context.run_session,
            server_end,
            conn,
            "127.0.0.1:kasm",
            user=user,
            transport="websocket",
        )
    )
    async with wrap_stream(client_end, encodings=ENCODINGS, dialect="kasm") as client:
        yield client


def api_user(setup: Setup, name: str) -> ApiUser:
    user = setup.store.get(name)
    assert user is not None
    p = user.permissions
    return ApiUser(name, p.can_view, p.can_input, p.can_manage)


TRANSPORTS = ["vencrypt", "websocket", "kasm"]


def connect(
    setup: Setup, nursery: trio.Nursery, transport: str, name: str
) -> AbstractAsyncContextManager[VncClient]:
    if transport == "vencrypt":
        return user_client(setup, name)
    if transport == "websocket":
        return websocket_client(setup, name)
    return kasm_client(setup, nursery, api_user(setup, name))


async def round_trip(client: VncClient) -> None:
    """Returns once the server has handled everything sent before: it reads
    a connection's messages in order, and answers this request after them."""
    await client.request_update(incremental=False, rect=None)
    await client.next_update(timeout=10)


async def send_all_input(client: VncClient, transport: str) -> None:
    for message in KASM_INPUT if transport == "kasm" else STANDARD_INPUT:
        await client.send(message)
    await round_trip(client)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_read_only_users_cannot_send_any_input(
    setup: Setup, nursery: trio.Nursery, transport: str
) -> None:
    async with connect(setup, nursery, transport, "watcher") as client:
        await round_trip(client)
        await send_all_input(client, transport)
        assert setup.inputs == []
        assert setup.source.size == (W, H)
    await trio.sleep(0.1)  # leaving releases nothing either: nothing was held
    assert setup.inputs == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_writers_input_arrives(setup: Setup, nursery: trio.Nursery, transport: str) -> None:
    # The control for the test above: the same messages from a user with
    # write permission reach the desktop, so "nothing arrived" means refused.
    async with connect(setup, nursery, transport, "typist") as client:
        await round_trip(client)
        await send_all_input(client, transport)
        kinds = {type(event) for event in setup.inputs}
        assert {KeyInput, PointerInput, ClipboardInput, ResizeRequest} <= kinds
        keys = [e.keysym for e in setup.inputs if isinstance(e, KeyInput)]
        assert keys == [ord("k"), ord("k"), ord("q"), ord("q")]
        clips = [e.text for e in setup.inputs if isinstance(e, ClipboardInput)]
        if transport == "kasm":
            assert ScrollInput in kinds
            assert clips == ["extended clipboard text", "binary clipboard text"]
        else:
            assert clips == ["old-style cut text", "extended clipboard text"]
        assert setup.source.size == (W // 2, H // 2)


# -- rights taken away from open connections --------------------------------------------------


async def demote_through_api(setup: Setup, how: str) -> None:
    header = basic_header(b"boss", b"boss-secret")
    async with http_client(setup) as http:
        http.headers["Authorization"] = header.decode()
        if how == "api-get":
            r = await http.get("/api/update_user", params={"name": "typist", "write": "false"})
        elif how == "api-post":
            r = await http.post("/api/update_user", json=[{"user": "typist", "read": True}])
        elif how == "api-remove":
            r = await http.get("/api/remove_user", params={"name": "typist"})
        elif how == "api-remove-post":
            r = await http.post("/api/remove_user", json=[{"user": "typist"}])
        elif how == "api-no-read":
            r = await http.get(
                "/api/update_user", params={"name": "typist", "read": "false", "write": "false"}
            )
        else:
            raise AssertionError(how)
    assert r.status_code == 200, r.text


async def demote_through_file(setup: Setup, how: str) -> None:
    """As `trivnc passwd` does: another UserStore on the same file. The
    server notices within its poll interval."""
    other = UserStore(setup.users)
    if how == "file-update":
        other.update("typist", write=False)
    elif how == "file-remove":
        other.remove("typist")
    elif how == "store-update":  # the server's own store, as an embedding app would
        setup.store.update("typist", write=False)
    else:
        raise AssertionError(how)
    with trio.fail_after(5):
        while True:
            current = setup.store.get("typist")
            if current is None or not current.permissions.write:
                return
            await trio.sleep(0.05)


CHANGES: dict[str, tuple[Callable[[Setup, str], Awaitable[None]], bool]] = {
    # name: (how, whether the connection must close)
    "api-get": (demote_through_api, False),
    "api-post": (demote_through_api, False),
    "api-remove": (demote_through_api, True),
    "api-remove-post": (demote_through_api, True),
    "api-no-read": (demote_through_api, True),
    "store-update": (demote_through_file, False),
    "file-update": (demote_through_file, False),
    "file-remove": (demote_through_file, True),
}


async def wait_closed(client: VncClient) -> None:
    with trio.fail_after(5):
        while True:
            try:
                await client.request_update(incremental=False)
                await client.next_update(timeout=0.5)
            except trio.TooSlowError:
                continue
            except (ConnectionClosedError, trio.BrokenResourceError, trio.ClosedResourceError):
                return


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("change", list(CHANGES))
async def test_rights_taken_away_apply_to_open_connections(
    setup: Setup, nursery: trio.Nursery, transport: str, change: str
) -> None:
    how, closes = CHANGES[change]
    async with connect(setup, nursery, transport, "typist") as client:
        await round_trip(client)
        await client.send(key_event(ord("a"), True) + key_event(ord("a"), False))
        await round_trip(client)
        assert setup.inputs == [KeyInput(ord("a"), True), KeyInput(ord("a"), False)]
        setup.inputs.clear()
        await how(setup, change)
        if closes:
            await wait_closed(client)
        else:
            await send_all_input(client, transport)
    assert setup.inputs == []


async def test_a_change_during_the_handshake_is_not_missed(setup: Setup) -> None:
    # VeNCrypt accepted the password; before ClientInit the API demotes the
    # user. The session must start read-only.
    result = await vencrypt_raw(setup, b"typist", b"typist-secret")
    assert result.status == 0
    await demote_through_api(setup, "api-get")
    stream, reader = result.stream, Reader(result.stream)
    try:
        with trio.fail_after(10):
            await stream.send_all(b"\x01")  # ClientInit, shared
            await reader.exactly(20)  # ServerInit up to the name length
            await reader.exactly(await reader.u32())
            # Input, then a request: the update's header proves the key was read.
            await stream.send_all(
                key_event(ord("z"), True)
                + key_event(ord("z"), False)
                + struct.pack(">BBHHHH", ClientMessage.FRAMEBUFFER_UPDATE_REQUEST, 0, 0, 0, 1, 1)
            )
            assert (await reader.exactly(1))[0] == 0  # FramebufferUpdate
    finally:
        await trio.aclose_forcefully(stream)
    assert setup.inputs == []


@pytest.mark.parametrize("removed", [False, True], ids=["demoted", "removed"])
async def test_a_stale_web_login_is_checked_again(
    setup: Setup, nursery: trio.Nursery, removed: bool
) -> None:
    # HTTP Basic succeeded with write permission; the user lost it before
    # the WebSocket session started: the session uses the rights of now.
    stale = api_user(setup, "typist")
    assert stale.write
    if removed:
        setup.store.remove("typist")
        with pytest.raises(RemoteProtocolError, match="server closed the connection"):
            async with kasm_client(setup, nursery, stale) as client:
                await round_trip(client)
    else:
        setup.store.update("typist", write=False)
        async with kasm_client(setup, nursery, stale) as client:
            await send_all_input(client, "kasm")
    assert setup.inputs == []

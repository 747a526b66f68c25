"""The users file survives `kill -9` at any moment of a change through the
developer API.

A real trivnc process (`python -m trivnc.cli`, web port only, on loopback)
serves a users file of a few hundred users; a driver thread changes users
through the API one request at a time (single and bulk creates, updates,
password changes, removals) while the test kills the process with SIGKILL
at a random moment, again and again. After every kill the file must parse
and hold exactly the users of the last acknowledged change or of the one in
flight (never a mix, never empty, never torn), with the passwords of that
version; temporary files a killed write leaves must stay private and must
not stop the next start, which every iteration performs.

Also here: bulk POSTs are all or nothing, including what only the users
file can refuse (a too-short password in the middle of a list).
"""

from __future__ import annotations

import base64
import os
import random
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from tls_files import issue

import trivnc
from trivnc.server.users import UserStore, sha256_crypt, verify_sha256_crypt
from trivnc.sources.array import ArraySource

OWNER, OWNER_PASSWORD = "boss", "boss-secret"
FILLER_PASSWORD = "filler-secret"
FILLER_HASH = sha256_crypt(FILLER_PASSWORD, "fillersalt012345")
FILLERS = 300
KILLS = 25
#: The whole kill loop gives up (and fails) after this many seconds.
BUDGET = 60.0

#: name -> (password, flags "rwo"-subset as the file stores them).
Model = dict[str, tuple[str, str]]


def flags(read: bool = False, write: bool = False, owner: bool = False) -> str:
    return ("r" if read else "") + ("w" if write else "") + ("o" if owner else "")


def render(model: Model) -> str:
    lines = []
    for name, (password, perms) in model.items():
        hashed = FILLER_HASH if password == FILLER_PASSWORD else sha256_crypt(password, "x" * 16)
        lines.append(f"{name}:{hashed}:{perms}\n")
    return "".join(lines)


@dataclass
class Driver:
    """Sends one API change at a time and keeps the model of the file: the
    version after the last acknowledged change, and the one in flight."""

    base_url: str
    trust: ssl.SSLContext
    model: Model
    rng: random.Random
    acknowledged: int = 0
    pending: Model | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None
    counter: int = 0

    def run(self) -> None:
        auth = base64.b64encode(f"{OWNER}:{OWNER_PASSWORD}".encode()).decode()
        try:
            with httpx.Client(
                base_url=self.base_url,
                verify=self.trust,
                headers={"Authorization": f"Basic {auth}"},
                timeout=10,
            ) as http:
                while not self.stop.is_set():
                    send, after = self.next_change()
                    self.pending = after
                    try:
                        response = send(http)
                    except httpx.TransportError:
                        return  # killed: the change may or may not be on disk
                    assert response.status_code == 200, response.text
                    self.model, self.pending = after, None
                    self.acknowledged += 1
        except BaseException as exc:  # reported by the test thread
            self.failure = exc

    def mine(self) -> list[str]:
        return [n for n in self.model if n.startswith("u")]

    def next_change(self) -> tuple[Callable[[httpx.Client], httpx.Response], Model]:
        """A random change and the model after it."""
        rng, after = self.rng, dict(self.model)
        self.counter += 1
        fresh = f"u{self.counter}"
        password = f"pw-{self.counter}-{rng.randrange(10**6)}"
        mine = self.mine()
        kind = rng.choice(["create", "update", "password", "remove", "bulk"]) if mine else "create"
        if kind == "create":
            r, w = rng.random() < 0.7, rng.random() < 0.5
            after[fresh] = (password, flags(r, w))
            params = {"name": fresh, "password": password, "read": str(r).lower()}
            params["write"] = str(w).lower()
            return (lambda http: http.get("/api/create_user", params=params)), after
        name = rng.choice(mine)
        if kind == "update":
            w = "w" not in after[name][1]
            after[name] = (after[name][0], flags("r" in after[name][1], w))
            params = {"name": name, "write": str(w).lower()}
            return (lambda http: http.get("/api/update_user", params=params)), after
        if kind == "password":
            after[name] = (password, after[name][1])
            params = {"name": name, "password": password}
            return (lambda http: http.get("/api/update_user", params=params)), after
        if kind == "remove":
            del after[name]
            return (lambda http: http.get("/api/remove_user", params={"name": name})), after
        # Bulk: flags of every user of ours at once, and two new users.
        body: list[dict[str, Any]] = []
        for other in mine:
            r, w = rng.random() < 0.5, rng.random() < 0.5
            after[other] = (after[other][0], flags(r, w))
            body.append({"user": other, "read": r, "write": w})
        middle = dict(after)
        new_users = {f"{fresh}b{i}": f"{password}-{i}" for i in range(2)}
        created = [{"user": n, "password": pw, "read": True} for n, pw in new_users.items()]
        for new_name, new_password in new_users.items():
            after[new_name] = (new_password, "r")

        def send(http: httpx.Client) -> httpx.Response:
            # Two requests, two writes: in flight is first the version after
            # the bulk update, then the one after the bulk create.
            self.pending = middle
            first = http.post("/api/update_user", json=body)
            assert first.status_code == 200, first.text
            self.model, self.pending = middle, after
            self.acknowledged += 1
            return http.post("/api/create_user", json=created)

        return send, after


def start_server(tmp_path: Path, users: Path, log: Any) -> tuple[subprocess.Popen[bytes], int]:
    """trivnc on a free loopback port; returns the process and the port it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trivnc.cli",
            "--users",
            str(users),
            "--rfb-port",
            "off",
            "--web-port",
            "0",
            "--listen",
            "127.0.0.1",
            "--geometry",
            "320x200",
            "--cert",
            str(tmp_path / "cert.pem"),
            "--key",
            str(tmp_path / "key.pem"),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        bufsize=0,  # unbuffered: select() must see every line still unread
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    line = b""
    while b"browsers open" not in line:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        if not ready:
            kill(proc)
            raise AssertionError("the server did not report its port")
        line = proc.stdout.readline()
        if not line:
            kill(proc)
            raise AssertionError("the server exited at start (see server.log)")
    port = int(line.rstrip().rstrip(b"/").rsplit(b":", 1)[1])
    return proc, port


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to this process only (we started it), then reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def on_disk(path: Path) -> Model:
    """The users file as (flags) per name, checked to be one whole version."""
    assert path.stat().st_size > 0, "the users file is empty"
    assert path.stat().st_mode & 0o777 == 0o600
    store = UserStore(path)  # raises on a torn or malformed file
    return {u.name: (u.password_hash, str(u.permissions)) for u in store.users()}


def matches(found: Model, model: Model) -> bool:
    """Same users with the same flags, and each password is that version's
    (checked by hashing, so a stale hash from another version fails)."""
    if set(found) != set(model):
        return False
    for name, (hashed, perms) in found.items():
        password, want = model[name]
        if perms != want:
            return False
        if password == FILLER_PASSWORD:
            if hashed != FILLER_HASH:
                return False
        elif not verify_sha256_crypt(password, hashed):
            return False
    return True


def test_users_file_survives_sigkill_during_api_changes(tmp_path: Path) -> None:
    trust = issue(tmp_path).client_context()
    users = tmp_path / "users"
    model: Model = {OWNER: (OWNER_PASSWORD, "rwo")}
    model.update({f"filler{i}": (FILLER_PASSWORD, "r") for i in range(FILLERS)})
    users.write_text(render(model))
    users.chmod(0o600)
    rng = random.Random(20240611)
    started = time.monotonic()
    changes = mid_write = 0
    with open(tmp_path / "server.log", "ab") as log:
        for kills in range(KILLS):
            assert time.monotonic() - started < BUDGET, f"only {kills} kills in {BUDGET} s"
            temps_before = set(tmp_path.glob(".users.*.tmp"))
            proc, port = start_server(tmp_path, users, log)
            # Names are never reused across runs: u<kill><change>.
            driver = Driver(f"https://127.0.0.1:{port}", trust, model, rng, counter=kills * 10_000)
            thread = threading.Thread(target=driver.run, daemon=True)
            try:
                thread.start()
                time.sleep(rng.uniform(0.02, 0.4))
            finally:
                kill(proc)
                driver.stop.set()
                thread.join(15)
            assert not thread.is_alive()
            if driver.failure is not None:
                raise driver.failure
            changes += driver.acknowledged
            found = on_disk(users)
            if matches(found, driver.model):
                model = driver.model
            else:
                assert driver.pending is not None and matches(found, driver.pending), (
                    f"kill {kills}: the file is neither the last acknowledged version "
                    "nor the one in flight"
                )
                model = driver.pending
            new_temps = set(tmp_path.glob(".users.*.tmp")) - temps_before
            mid_write += bool(new_temps)
            for temp in new_temps:
                # What a killed write leaves holds password hashes: private.
                assert temp.stat().st_mode & 0o777 == 0o600
    # The next start works with whatever was left behind, and serves the
    # last version: log in as a user of ours through the API's page.
    with open(tmp_path / "server.log", "ab") as log:
        proc, port = start_server(tmp_path, users, log)
    try:
        mine = [n for n in model if n.startswith("u")] or [OWNER]
        name = mine[-1]
        password, perms = model[name]
        with httpx.Client(verify=trust, timeout=10) as http:
            r = http.get(f"https://127.0.0.1:{port}/api/get_users", auth=(OWNER, OWNER_PASSWORD))
            assert r.status_code == 200
            listed = {u["user"]: flags(u["read"], u["write"], u["owner"]) for u in r.json()}
            assert listed == {n: p for n, (_, p) in model.items()}
            r = http.get(f"https://127.0.0.1:{port}/", auth=(name, password))
            if "r" in perms or "w" in perms:
                assert r.status_code in (200, 302)
            else:
                assert r.status_code == 403
    finally:
        kill(proc)
    print(f"{KILLS} kills, {changes} acknowledged changes, {mid_write} kills inside a write")
    assert changes > KILLS  # the kills landed among real work


# -- bulk changes are all or nothing -------------------------------------------------------


@dataclass
class Running:
    client: httpx.AsyncClient
    users: Path


@pytest.fixture
async def running(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Running]:
    tls = issue(tmp_path)
    users = tmp_path / "users"
    store = UserStore(users)
    store.create(OWNER, OWNER_PASSWORD, read=True, write=True, owner=True)
    store.create("typist", "typist-secret", read=True, write=True, owner=False)
    config = trivnc.Config(
        source=ArraySource(64, 48),
        rfb_port=None,
        web_port=0,
        users_file=users,
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
    )
    server = await nursery.start(trivnc.serve, config)
    trust = tls.client_context()
    async with httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{server.web_port}",
        verify=trust,
        auth=(OWNER, OWNER_PASSWORD),
        timeout=20,
    ) as client:
        yield Running(client, users)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (
            "create_user",
            [
                {"user": "fred", "password": "fred-secret", "read": True},
                {"user": "ginger", "password": "short"},  # too short: the store refuses
            ],
        ),
        (
            "create_user",
            [
                {"user": "typist", "password": "replaced-secret"},
                {"user": "bad\nname", "password": "ginger-secret"},
            ],
        ),
        (
            "update_user",
            [
                {"user": "typist", "read": True},  # would demote typist
                {"user": OWNER, "password": "tiny", "owner": True, "read": True, "write": True},
            ],
        ),
    ],
    ids=["short-password", "bad-name", "update-short-password"],
)
async def test_bulk_changes_are_all_or_nothing(running: Running, route: str, body: Any) -> None:
    before = running.users.read_bytes()
    response = await running.client.post(f"/api/{route}", json=body)
    assert response.status_code == 400, response.text
    assert running.users.read_bytes() == before
    listed = (await running.client.get("/api/get_users")).json()
    assert {u["user"]: (u["read"], u["write"]) for u in listed} == {
        OWNER: (True, True),
        "typist": (True, True),
    }
    # And a good bulk change goes through as one.
    ok = await running.client.post(
        "/api/create_user",
        json=[{"user": "fred", "password": "fred-secret", "read": True}],
    )
    assert ok.status_code == 200
    assert "fred:" in running.users.read_text()

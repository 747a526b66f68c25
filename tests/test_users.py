"""The users file (KasmVNC's kasmpasswd format), SHA-256-crypt, the login rate
limiter, the self-signed certificate and `trivnc passwd`."""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import random
import signal
import ssl
import stat
import subprocess
import sys
import textwrap
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trivnc import passwd, tlsconfig
from trivnc.server import users as users_mod
from trivnc.server.ratelimit import LoginRateLimiter, peer_key
from trivnc.server.users import (
    InvalidUserError,
    MalformedUsersFileError,
    Permissions,
    UnknownUserError,
    User,
    UserChange,
    UserExistsError,
    UserStore,
    create_initial,
    sha256_crypt,
    verify_sha256_crypt,
)

# -- SHA-256-crypt ---------------------------------------------------------------------

# The SHA-256 test vectors of the specification ("Unix crypt using SHA-256 and
# SHA-512", Ulrich Drepper): (setting, password, expected).
SPEC_VECTORS = [
    (
        "$5$saltstring",
        "Hello world!",
        "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",
    ),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "$5$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1",
    ),
    (
        "$5$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/",
    ),
    (
        "$5$rounds=123456$asaltof16chars..",
        "a short string",
        "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD",
    ),
    # Below the minimum: the specification clamps to 1000 (libxcrypt refuses it).
    (
        "$5$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
    ),
]


def stdlib_crypt() -> Callable[[str, str], str | None] | None:
    """The crypt module's crypt (Python 3.11 and 3.12 on glibc), else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    return crypt.crypt


@pytest.mark.parametrize(("setting", "password", "expected"), SPEC_VECTORS)
def test_sha256_crypt_specification_vectors(setting: str, password: str, expected: str) -> None:
    assert sha256_crypt(password, setting) == expected
    assert verify_sha256_crypt(password, expected)
    assert not verify_sha256_crypt(password + "x", expected)


def test_sha256_crypt_bare_salt_and_rounds_argument() -> None:
    assert sha256_crypt("Hello world!", "saltstring") == SPEC_VECTORS[0][2]
    assert sha256_crypt("Hello world!", "saltstringsaltstring", rounds=10000) == SPEC_VECTORS[1][2]


def test_sha256_crypt_matches_stdlib_crypt() -> None:
    crypt = stdlib_crypt()
    if crypt is None:
        pytest.skip("no crypt module (Python 3.13+)")
    rng = random.Random(5)
    alphabet = users_mod._CRYPT_ALPHABET
    for length in [*range(0, 70), 100, 200, 500]:
        # libxcrypt refuses passwords over 512 bytes: keep long ones ASCII.
        top = 0x250 if length <= 200 else 0x7F
        password = "".join(chr(rng.randrange(32, top)) for _ in range(length))
        salt = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 17)))
        rounds = rng.choice([5000, 1000, 1234])
        setting = f"$5$rounds={rounds}${salt}" if rounds != 5000 else f"$5${salt}"
        assert sha256_crypt(password, salt, rounds) == crypt(password, setting), (length, salt)
    for setting, password, expected in SPEC_VECTORS[:-1]:  # libxcrypt refuses rounds=10
        assert crypt(password, setting) == expected


def test_verify_rejects_malformed_hashes() -> None:
    good = sha256_crypt("secret", "abc")
    for bad in [
        "",
        "secret",
        "$6$abc$" + good[7:],
        good[:-1],
        good + "x",
        "$5$rounds=x$a$" + good[-43:],
    ]:
        assert not verify_sha256_crypt("secret", bad)


# -- the users file ------------------------------------------------------------------

KASM_FIXED = sha256_crypt("kasmpassword", "kasm")  # what kasmvncpasswd wrote: "$5$kasm$..."


def test_kasmvnc_written_file_verifies(tmp_path: Path) -> None:
    assert KASM_FIXED.startswith("$5$kasm$")
    path = tmp_path / "kasmpasswd"
    path.write_text(f"alice:{KASM_FIXED}:rwo\nbob:{KASM_FIXED}:\n\n  \ncarol:{KASM_FIXED}:w\n")
    store = UserStore(path)
    assert [u.name for u in store.users()] == ["alice", "bob", "carol"]
    alice = store.verify("alice", "kasmpassword")
    assert alice is not None and alice.permissions == Permissions(True, True, True)
    assert store.verify("alice", "wrong-password") is None
    assert store.verify("nobody", "kasmpassword") is None
    assert store.verify("alice", "bad\udcffbytes") is None  # never raises
    assert store.verify("alice", "x" * 100_000) is None  # bounded cost
    bob = store.get("bob")
    assert bob is not None and not bob.permissions.can_view
    carol = store.get("carol")
    # Write implies read (KasmVNC): carol may watch although the file says only "w".
    assert carol is not None and carol.permissions.can_view and carol.permissions.can_input
    assert not carol.permissions.can_manage


def test_permissions() -> None:
    assert Permissions.parse("") == Permissions()
    assert Permissions.parse("ow") == Permissions(read=False, write=True, owner=True)
    assert str(Permissions.parse("owr")) == "rwo"  # KasmVNC's order
    owner_only = Permissions(owner=True)
    assert owner_only.can_manage and not owner_only.can_view and not owner_only.can_input
    with pytest.raises(ValueError, match="'x'"):
        Permissions.parse("rx")


def test_round_trip_and_random_salts(tmp_path: Path) -> None:
    path = tmp_path / "users"
    store = UserStore(path)
    assert len(store) == 0 and not path.exists()
    store.create("alice", "password1", read=True, write=True, owner=False)
    store.create("bob", "password1", read=True, write=False, owner=True)
    store.create("ünïcode name", "pässwörd", read=True, write=False, owner=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text("utf-8").splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob", "ünïcode name"]
    assert [line.split(":")[2] for line in lines] == ["rw", "ro", "r"]
    hashes = [line.split(":")[1] for line in lines]
    salts = [h.split("$")[2] for h in hashes]
    assert all(len(s) == 16 for s in salts) and len(set(salts)) == 3
    assert hashes[0] != hashes[1]  # same password, different salt

    again = UserStore(path)
    assert again.users() == store.users()
    assert again.verify("alice", "password1") is not None
    assert again.verify("ünïcode name", "pässwörd") is not None

    again.update("alice", write=False, owner=True)
    alice = again.get("alice")
    assert alice is not None and str(alice.permissions) == "ro"
    assert again.verify("alice", "password1") is not None  # password kept
    again.update("alice", password="newpassword")
    assert again.verify("alice", "password1") is None
    assert again.verify("alice", "newpassword") is not None
    again.remove("bob")
    assert [u.name for u in UserStore(path).users()] == ["alice", "ünïcode name"]


def test_change_errors(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users")
    store.create("alice", "password1", read=True, write=False, owner=False)
    with pytest.raises(UserExistsError):
        store.create("alice", "password2", read=True, write=False, owner=False)
    # The API layer maps ValueError and KeyError to 400: every refusal is one.
    assert issubclass(UserExistsError, ValueError) and issubclass(InvalidUserError, ValueError)
    assert issubclass(UnknownUserError, KeyError)
    store.create("alice", "password2", read=False, write=True, owner=False, replace=True)
    assert store.verify("alice", "password2") is not None
    with pytest.raises(UnknownUserError, match="bob"):
        store.update("bob", read=True)
    with pytest.raises(UnknownUserError):
        store.remove("bob")
    bad_names = ["", "a:b", "a\nb", "x" * 128, "é" * 64, " padded"]
    for name in bad_names:
        with pytest.raises(InvalidUserError):
            store.create(name, "password1", read=True, write=False, owner=False)
    store.create("x" * 127, "password1", read=True, write=False, owner=False)  # 127 bytes fit
    for password in ["", "12345", "abc\ndef", "x" * 2000]:
        with pytest.raises(InvalidUserError):
            store.create("carol", password, read=True, write=False, owner=False)
    store.create("carol", "123456", read=True, write=False, owner=False)  # 6 is enough


@pytest.mark.parametrize(
    ("content", "lineno", "message"),
    [
        ("alice:{h}:r\nbob:{h}\n", 2, "expected name:hash:permissions"),
        ("alice:{h}:r\n\nbob:{h}:r:x\n", 3, "expected name:hash:permissions"),
        ("alice:plaintext:r\n", 1, "not a SHA-256-crypt"),
        ("alice:{h}:rz\n", 1, "unknown permission"),
        ("alice:{h}:r\nalice:{h}:w\n", 2, "appears twice"),
        (":{h}:r\n", 1, "empty"),
    ],
)
def test_malformed_lines(tmp_path: Path, content: str, lineno: int, message: str) -> None:
    path = tmp_path / "users"
    path.write_text(content.format(h=KASM_FIXED))
    with pytest.raises(MalformedUsersFileError, match=message) as info:
        UserStore(path)
    assert info.value.lineno == lineno
    assert f"line {lineno}" in str(info.value) and str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(
        f"alice:{KASM_FIXED}:r\n".encode() + b"b\xffb:" + KASM_FIXED.encode() + b":r\n"
    )
    with pytest.raises(MalformedUsersFileError, match="line 2"):
        UserStore(path)


def test_crlf_lines_are_read(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(f"alice:{KASM_FIXED}:rw\r\n".encode())
    alice = UserStore(path).get("alice")
    assert alice is not None and str(alice.permissions) == "rw"


def test_unknown_user_costs_the_same_as_a_wrong_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = UserStore(tmp_path / "users")
    store.create("alice", "password1", read=True, write=False, owner=False)
    counts = {"sha256": 0, "crypt": 0, "compare": 0}

    def sha256(data: bytes = b"") -> Any:
        counts["sha256"] += 1
        return hashlib.sha256(data)

    real_crypt = users_mod.sha256_crypt
    real_compare = hmac.compare_digest

    def counting_crypt(password: str, salt: str, rounds: int = 5000) -> str:
        counts["crypt"] += 1
        return real_crypt(password, salt, rounds)

    def counting_compare(a: bytes, b: bytes) -> bool:
        counts["compare"] += 1
        return real_compare(a, b)

    monkeypatch.setattr(users_mod, "hashlib", types.SimpleNamespace(sha256=sha256))
    monkeypatch.setattr(users_mod, "sha256_crypt", counting_crypt)
    monkeypatch.setattr(users_mod, "hmac", types.SimpleNamespace(compare_digest=counting_compare))

    def cost(name: str, password: str) -> dict[str, int]:
        for k in counts:
            counts[k] = 0
        assert store.verify(name, password) is None
        return dict(counts)

    wrong_password = cost("alice", "password2")
    unknown_user = cost("mallory", "password1")
    assert wrong_password == unknown_user
    assert wrong_password["crypt"] == 1 and wrong_password["compare"] == 1
    assert wrong_password["sha256"] > 5000  # the hashing really happened


def test_crash_mid_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    store = UserStore(path)
    store.create("alice", "password1", read=True, write=False, owner=False)
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    for target in ["replace", "fsync"]:
        with monkeypatch.context() as m:
            m.setattr(os, target, boom)
            with pytest.raises(OSError, match="No space"):
                store.create("bob", "password1", read=True, write=True, owner=False)
        assert path.read_bytes() == before, target
        assert sorted(p.name for p in tmp_path.iterdir()) == ["users"], target
        assert store.get("bob") is None  # memory follows the disk
    store.create("bob", "password1", read=True, write=True, owner=False)
    assert "bob" in UserStore(path)


def test_symlinked_file_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "users").write_text(f"alice:{KASM_FIXED}:r\n")
    link = tmp_path / "users"
    link.symlink_to(real / "users")
    store = UserStore(link)
    store.update("alice", write=True)
    assert link.is_symlink()
    assert (real / "users").read_text().endswith(":rw\n")


# The writer of the kill test: loads users.py on its own (importing the trivnc
# package would load numpy and the server on every start), then flips every
# user's permissions between "r" and "rw" in one bulk change, forever.
KILL_WRITER = textwrap.dedent(
    """
    import sys
    from trivnc.server import users
    store = users.UserStore(sys.argv[2])
    names = [u.name for u in store.users()]
    write = False
    print("ready", flush=True)
    while True:
        write = not write
        store.apply([users.UserChange("update", n, read=True, write=write) for n in names])
    """
)


def test_sigkill_during_writes_leaves_old_or_new_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    n_users = 400
    path.write_text("".join(f"user{i}:{KASM_FIXED}:r\n" for i in range(n_users)))
    rng = random.Random(7)
    seen: set[str] = set()
    kills = 0
    # A kill lands inside a write about a third of the time (it leaves the
    # temporary file behind); go on until some have, and both versions were seen.
    while kills < 10 or seen != {"r", "rw"} or len(list(tmp_path.glob(".users.*.tmp"))) < 2:
        assert kills < 100, "the kills never landed inside a write"
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, users_mod.__file__, str(path)],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        kills += 1
        store = UserStore(path)  # parses: no torn or partial file
        assert [u.name for u in store.users()] == [f"user{i}" for i in range(n_users)]
        flags = {str(u.permissions) for u in store.users()}
        assert len(flags) == 1, flags  # all of one version, never a mix
        assert all(u.password_hash == KASM_FIXED for u in store.users())
        seen |= flags


def test_apply_bulk_semantics(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users")
    store.create("alice", "password1", read=True, write=True, owner=True)
    store.apply(
        [
            UserChange("create", "bob", "password2", read=True),
            UserChange("create", "alice", "password3", read=True),  # create replaces
        ]
    )
    assert store.verify("alice", "password3") is not None
    alice = store.get("alice")
    assert alice is not None and str(alice.permissions) == "r"
    # update overwrites all three flags; missing ones are false.
    store.apply([UserChange("update", "bob", write=True)])
    bob = store.get("bob")
    assert bob is not None and str(bob.permissions) == "w"
    assert store.verify("bob", "password2") is not None
    store.apply([UserChange("update", "bob", "password4", read=True)])
    assert store.verify("bob", "password4") is not None
    # All or nothing: one unknown user fails the whole list.
    before = (tmp_path / "users").read_bytes()
    with pytest.raises(UnknownUserError):
        store.apply([UserChange("remove", "bob"), UserChange("remove", "nobody")])
    with pytest.raises(InvalidUserError):
        store.apply([UserChange("create", "carol", "pw")])
    assert (tmp_path / "users").read_bytes() == before and "bob" in store
    store.apply([UserChange("remove", "bob")])
    assert "bob" not in store


def test_changed_callbacks_and_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users"
    store = UserStore(path)
    seen: list[str] = []
    store.changed.append(seen.append)
    store.create("alice", "password1", read=True, write=True, owner=False)
    store.create("bob", "password1", read=True, write=False, owner=False)
    store.update("alice", write=False)
    store.remove("bob")
    assert seen == ["alice", "bob", "alice", "bob"]
    assert not store.reload_if_changed()  # our own writes are not news

    # Another process (trivnc passwd) changes the file.
    other = UserStore(path)
    other.create("carol", "password1", read=True, write=False, owner=False)
    other.update("alice", owner=True)
    seen.clear()
    assert store.reload_if_changed()
    assert sorted(seen) == ["alice", "carol"]
    alice = store.get("alice")
    assert alice is not None and alice.permissions.owner
    assert not store.reload_if_changed()

    # A change through a stale store keeps the other writer's change.
    other.create("dave", "password1", read=True, write=False, owner=False)
    store.create("erin", "password1", read=True, write=False, owner=False)
    assert {"dave", "erin"} <= {u.name for u in UserStore(path).users()}

    # A malformed edit is logged once and ignored: the users stay as they were,
    # and a change refuses to overwrite the file.
    path.write_text("garbage\n")
    with caplog.at_level(logging.WARNING, logger="trivnc.users"):
        assert not store.reload_if_changed()
        assert not store.reload_if_changed()
    assert [r.message.count("line 1") for r in caplog.records] == [1]
    assert "alice" in store and store.verify("alice", "password1") is not None
    with pytest.raises(MalformedUsersFileError):
        store.create("frank", "password1", read=True, write=False, owner=False)
    assert path.read_text() == "garbage\n"
    # A deleted file means no users.
    path.unlink()
    seen.clear()
    assert store.reload_if_changed()
    assert len(store) == 0 and "alice" in seen


def test_create_initial(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "users"
    store, name, password = create_initial(path)
    assert name == "owner" and len(password) >= 16
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    user = UserStore(path).verify(name, password)
    assert user == store.get(name)
    assert isinstance(user, User) and str(user.permissions) == "rwo"
    with pytest.raises(FileExistsError):
        create_initial(path)
    assert create_initial(tmp_path / "other")[2] != password


# -- rate limiter --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_blocks_after_failures() -> None:
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=3, window=60, lockout=30, clock=clock)
    for _ in range(2):
        limiter.failure("10.0.0.1")
    assert limiter.blocked("10.0.0.1") == 0
    limiter.failure("10.0.0.1")
    assert limiter.blocked("10.0.0.1") == pytest.approx(30)
    assert limiter.blocked("10.0.0.2") == 0
    clock.now += 20
    assert limiter.blocked("10.0.0.1") == pytest.approx(10)
    limiter.failure("10.0.0.1")  # while blocked: does not extend the block
    clock.now += 10
    assert limiter.blocked("10.0.0.1") == 0
    # A fresh start: two more failures do not block again.
    limiter.failure("10.0.0.1")
    limiter.failure("10.0.0.1")
    assert limiter.blocked("10.0.0.1") == 0


def test_rate_limiter_window_and_success() -> None:
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=3, window=10, lockout=30, clock=clock)
    for _ in range(5):  # failures spread wider than the window never block
        limiter.failure("::1")
        clock.now += 6
    assert limiter.blocked("::1") == 0
    limiter.failure("1.2.3.4")
    limiter.failure("1.2.3.4")
    limiter.success("1.2.3.4")
    limiter.failure("1.2.3.4")
    assert limiter.blocked("1.2.3.4") == 0


def test_rate_limiter_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=2, clock=clock, max_tracked=100)
    limiter.failure("10.9.9.9")
    limiter.failure("10.9.9.9")
    for i in range(1000):
        limiter.failure(str(ipaddress.IPv4Address(0x0A000000 + i)))
        assert len(limiter) <= 100
    assert limiter.blocked("10.9.9.9") == 0  # the oldest was forgotten
    assert limiter.blocked("10.0.3.231") == 0  # one failure only: tracked, not blocked


def test_peer_key_groups_ipv6_networks() -> None:
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff") == "2001:db8::/64"
    assert peer_key("2001:db8:0:1::1") != peer_key("2001:db8::1")
    assert peer_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert peer_key("10.0.0.1:5900") == "10.0.0.1"
    assert peer_key("[::1]:443") == "::/64"
    assert peer_key("/run/trivnc.sock") == "/run/trivnc.sock"
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=2, clock=clock)
    limiter.failure("2001:db8::1")
    limiter.failure("2001:db8::2")
    assert limiter.blocked("2001:db8::3") > 0


# -- TLS -----------------------------------------------------------------------------


def test_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    d = tlsconfig.state_dir()
    assert d == tmp_path / "state" / "trivnc" and d.is_dir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tlsconfig.state_dir() == tmp_path / "home" / ".local" / "state" / "trivnc"


def test_self_signed_certificate_generated_and_reused(tmp_path: Path) -> None:
    cert_path, key_path = tlsconfig.ensure_self_signed(tmp_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert cn[0].value == "trivnc"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert set(san.get_values_for_type(x509.IPAddress)) >= {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3600) < lifetime < dt.timedelta(days=3700)

    pem = cert_path.read_bytes(), key_path.read_bytes()
    assert tlsconfig.ensure_self_signed(tmp_path) == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == pem  # reused

    # A key that no longer matches, or a damaged certificate, is replaced.
    other = tmp_path / "other"
    tlsconfig.ensure_self_signed(other)
    key_path.write_bytes((other / "key.pem").read_bytes())
    tlsconfig.ensure_self_signed(tmp_path)
    assert cert_path.read_bytes() != pem[0]
    cert_path.write_text("not a certificate")
    tlsconfig.ensure_self_signed(tmp_path)
    x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem", "other"]


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
async def test_tls_handshake_with_self_signed_certificate(
    tmp_path: Path, server_hostname: str
) -> None:
    cert_path, key_path = tlsconfig.ensure_self_signed(tmp_path)
    server_ctx = tlsconfig.server_ssl_context(cert_path, key_path)
    assert server_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=server_hostname)
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)

    async def serve() -> None:
        await server.do_handshake()
        await server.send_all(b"hello " + await server.receive_some(100))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.do_handshake()
            await client.send_all(b"trivnc")
            assert await client.receive_some(100) == b"hello trivnc"
    assert client.version() in ("TLSv1.2", "TLSv1.3")


async def tls11_handshake(cert: Path, server_ctx: ssl.SSLContext) -> dict[str, str]:
    """A TLS 1.1 client against `server_ctx`: each side's version or error.
    Both sides drop to OpenSSL security level 0, which would refuse TLS 1.1 on
    its own, so that only the server's minimum_version can say no."""
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # naming TLS 1.0/1.1 warns
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    client_raw, server_raw = trio.testing.memory_stream_pair()
    streams = {
        "client": trio.SSLStream(client_raw, client_ctx, server_hostname="localhost"),
        "server": trio.SSLStream(server_raw, server_ctx, server_side=True),
    }
    results: dict[str, str] = {}

    async def handshake(side: str) -> None:
        stream = streams[side]
        try:
            await stream.do_handshake()
            results[side] = str(stream.version())
        except trio.BrokenResourceError as exc:
            results[side] = repr(exc.__cause__)
            await stream.transport_stream.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for side in streams:
                nursery.start_soon(handshake, side)
    return results


async def test_tls_refuses_old_protocols(tmp_path: Path) -> None:
    cert_path, key_path = tlsconfig.ensure_self_signed(tmp_path)
    # Control: with the minimum lowered, this client really does get TLS 1.1 ...
    lowered = tlsconfig.server_ssl_context(cert_path, key_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lowered.minimum_version = ssl.TLSVersion.TLSv1
    assert await tls11_handshake(cert_path, lowered) == {"client": "TLSv1.1", "server": "TLSv1.1"}
    # ... and trivnc's context refuses it.
    results = await tls11_handshake(cert_path, tlsconfig.server_ssl_context(cert_path, key_path))
    assert "UNSUPPORTED_PROTOCOL" in results["server"]
    assert not results["client"].startswith("TLSv")  # the client failed too


# -- trivnc passwd -------------------------------------------------------------------


def run_passwd(*args: str, stdin: str = "") -> tuple[int, str]:
    err = io.StringIO()
    old = sys.stderr
    sys.stderr = err
    try:
        code = passwd.main(list(args), stdin=io.StringIO(stdin))
    finally:
        sys.stderr = old
    return code, err.getvalue()


def test_passwd_create_change_delete(tmp_path: Path) -> None:
    path = tmp_path / "kasmpasswd"
    code, _ = run_passwd("-u", "alice", "-r", "-w", str(path), stdin="secret1\nsecret1\n")
    assert code == 0
    alice = UserStore(path).verify("alice", "secret1")
    assert alice is not None and str(alice.permissions) == "rw"

    # One line is enough when not on a terminal.
    code, _ = run_passwd("-u", "bob", "-o", str(path), stdin="secret2\n")
    assert code == 0
    bob = UserStore(path).verify("bob", "secret2")
    assert bob is not None and str(bob.permissions) == "o"

    # -n: permissions only, password untouched; no flags strip them all.
    code, _ = run_passwd("-u", "alice", "-n", "-o", str(path))
    assert code == 0
    alice = UserStore(path).verify("alice", "secret1")
    assert alice is not None and str(alice.permissions) == "o"
    code, err = run_passwd("-u", "alice", "-n", str(path))
    assert code == 0 and "cannot watch" in err
    alice = UserStore(path).get("alice")
    assert alice is not None and str(alice.permissions) == ""

    # Changing a password without flags also sets the permissions (to none).
    code, _ = run_passwd("-u", "bob", "-r", str(path), stdin="secret3\nsecret3\n")
    assert code == 0
    assert UserStore(path).verify("bob", "secret3") is not None
    assert UserStore(path).verify("bob", "secret2") is None

    code, _ = run_passwd("-u", "alice", "-d", str(path))
    assert code == 0
    assert [u.name for u in UserStore(path).users()] == ["bob"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_passwd_default_user_is_owner(tmp_path: Path) -> None:
    path = tmp_path / "kasmpasswd"
    _store, name, _password = create_initial(path)
    code, _ = run_passwd("-rwo", str(path), stdin="forgotten1\n")
    assert code == 0
    assert UserStore(path).verify(name, "forgotten1") is not None


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["-u", "alice", "-r"], "short\nshort\n", 1, "at least 6 characters"),
        (["-u", "alice", "-r"], "secret1\nsecret2\n", 1, "don't match"),
        (["-u", "alice", "-r"], "", 1, "no password"),
        (["-u", "alice", "-r"], "\n", 1, "not changed"),
        (["-u", "nobody", "-n", "-r"], "", 1, "no user named 'nobody'"),
        (["-u", "nobody", "-d"], "", 1, "no user named 'nobody'"),
        (["-u", "alice", "-d", "-r"], "", 2, "-d cannot be combined"),
        (["-u", "a:b", "-r"], "secret1\n", 1, "':'"),
        (["-u", "alice", "-x"], "", 2, "unrecognized"),
    ],
)
def test_passwd_errors(
    tmp_path: Path, args: list[str], stdin: str, code: int, message: str
) -> None:
    path = tmp_path / "kasmpasswd"
    got, err = run_passwd(*args, str(path), stdin=stdin)
    assert (got, message in err) == (code, True), err
    assert "Traceback" not in err
    assert not path.exists()


def test_passwd_bad_file_dir_and_input(tmp_path: Path) -> None:
    path = tmp_path / "kasmpasswd"
    path.write_text("broken line\n")
    code, err = run_passwd("-u", "alice", "-r", str(path), stdin="secret1\n")
    assert code == 1 and "line 1" in err and "Traceback" not in err
    code, err = run_passwd("-u", "alice", "-r", str(tmp_path / "missing" / "f"), stdin="secret1\n")
    assert code == 1 and "No such file" in err and "Traceback" not in err
    binary = io.TextIOWrapper(io.BytesIO(b"\xff\xfe secret\n"), encoding="utf-8")
    err_out = io.StringIO()
    old, sys.stderr = sys.stderr, err_out
    try:
        code = passwd.main(["-u", "alice", "-r", str(tmp_path / "f")], stdin=binary)
    finally:
        sys.stderr = old
    assert code == 1 and "not valid text" in err_out.getvalue()


def test_passwd_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _ = run_passwd("-u", "alice", "-w", stdin="secret1\n")
    assert code == 0
    assert "alice" in UserStore(tmp_path / ".kasmpasswd")


def test_passwd_prompts_twice_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["short", "secret1", "secret2", "secret1", "secret1"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    path = tmp_path / "kasmpasswd"
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert passwd.main(["-u", "alice", "-r", str(path)], stdin=Tty()) == 0
    assert prompts == ["Password: ", "Password: ", "Verify: ", "Password: ", "Verify: "]
    assert "try again" in err.getvalue()
    assert UserStore(path).verify("alice", "secret1") is not None

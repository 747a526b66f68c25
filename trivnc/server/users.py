# The users file, in KasmVNC's kasmpasswd format: one `name:hash:permissions`
# line per user, the hash SHA-256-crypt ("$5$", Ulrich Drepper, "Unix crypt
# using SHA-256 and SHA-512", 2008), the permissions a subset of "rwo".
#
# Permissions follow KasmVNC's server (reference/protocol.md B.10): `r` may
# watch; `w` may type, point, paste and resize, and implies `r`; `o` may call
# the developer API and manage users, and implies neither. The flags are stored
# exactly as written so a file round-trips; `Permissions.can_view` etc. are the
# effective rights.
#
# KasmVNC's kasmvncpasswd salted every hash with the fixed "kasm"; trivnc reads
# those and writes its own with a random 16-character salt per user.
#
# Every change is written atomically (a temporary file in the same directory,
# fsync, rename, fsync of the directory) under an exclusive flock on the
# directory, so a crash leaves the old or the new file and `trivnc passwd`
# cannot race a running server into losing one of the two changes.
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..files import write_atomically

__all__ = [
    "DEFAULT_OWNER_NAME",
    "MAX_NAME_BYTES",
    "MAX_PASSWORD_BYTES",
    "MIN_PASSWORD_CHARS",
    "InvalidUserError",
    "MalformedUsersFileError",
    "Permissions",
    "UnknownUserError",
    "User",
    "UserChange",
    "UserExistsError",
    "UserStore",
    "UserStoreError",
    "create_initial",
    "default_users_path",
    "sha256_crypt",
    "validate_name",
    "validate_password",
    "verify_sha256_crypt",
]

log = logging.getLogger("trivnc.users")

# -- SHA-256-crypt ---------------------------------------------------------------------

_DEFAULT_ROUNDS = 5000
_MIN_ROUNDS = 1000
_MAX_ROUNDS = 999_999_999
_MAX_SALT = 16
_PREFIX = "$5$"
_ROUNDS_PREFIX = "rounds="
# crypt's own base-64 alphabet: not RFC 4648's, and least significant 6 bits first.
_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The specification's order of digest bytes in the output, three at a time
# (the last group has two bytes, written as 3 characters).
_SHA256_BYTE_ORDER = (
    (0, 10, 20),
    (21, 1, 11),
    (12, 22, 2),
    (3, 13, 23),
    (24, 4, 14),
    (15, 25, 5),
    (6, 16, 26),
    (27, 7, 17),
    (18, 28, 8),
    (9, 19, 29),
)
_HASH_CHARS = 43


def _b64_group(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_CRYPT_ALPHABET[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat_to(block: bytes, length: int) -> bytes:
    return (block * (length // len(block) + 1))[:length]


def _parse_setting(setting: str) -> tuple[int | None, str]:
    """(rounds if the setting names them, salt) of a "$5$[rounds=N$]salt[$...]"."""
    rest = setting[len(_PREFIX) :]
    rounds: int | None = None
    if rest.startswith(_ROUNDS_PREFIX):
        num, sep, rest = rest[len(_ROUNDS_PREFIX) :].partition("$")
        if not sep or not num.isdigit() or not num.isascii():
            raise ValueError("malformed rounds= in SHA-256-crypt setting")
        # The specification clamps out-of-range counts rather than refusing them.
        rounds = min(max(int(num), _MIN_ROUNDS), _MAX_ROUNDS)
    salt = rest.split("$", 1)[0]
    return rounds, salt


def _digest(password: bytes, salt: bytes, rounds: int) -> bytes:
    # The steps are numbered as in the specification's "The algorithm" section.
    plen = len(password)
    b = hashlib.sha256(password + salt + password).digest()  # steps 4-8
    a = hashlib.sha256(password + salt)  # steps 1-3
    a.update(_repeat_to(b, plen))  # steps 9-10
    n = plen
    while n:  # step 11: one block per bit of the length, B for 1, P for 0
        a.update(b if n & 1 else password)
        n >>= 1
    a_digest = a.digest()  # step 12
    p_seq = _repeat_to(hashlib.sha256(password * plen).digest(), plen)  # steps 13-16
    s_seq = _repeat_to(  # steps 17-20
        hashlib.sha256(salt * (16 + a_digest[0])).digest(), len(salt)
    )
    c = a_digest
    sha256 = hashlib.sha256
    for i in range(rounds):  # step 21
        h = sha256(p_seq if i & 1 else c)
        if i % 3:
            h.update(s_seq)
        if i % 7:
            h.update(p_seq)
        h.update(c if i & 1 else p_seq)
        c = h.digest()
    return c


def _check_salt(salt: str) -> None:
    if not salt.isascii() or any(ch in salt for ch in "$:\n\r\0"):
        raise ValueError("SHA-256-crypt salt must be ASCII without '$', ':', or line breaks")


def sha256_crypt(password: str, salt: str, rounds: int = _DEFAULT_ROUNDS) -> str:
    """SHA-256-crypt of `password` (UTF-8): "$5$[rounds=N$]salt$hash".

    `salt` is either a bare salt (at most 16 characters are used) or a whole
    setting or hash string starting with "$5$", whose own rounds= then win over
    `rounds`. The rounds= field appears in the result when the setting named it
    or when `rounds` is not the default 5000, as crypt(3) does."""
    explicit: int | None
    if salt.startswith(_PREFIX):
        explicit, salt = _parse_setting(salt)
    else:
        explicit = None if rounds == _DEFAULT_ROUNDS else min(max(rounds, _MIN_ROUNDS), _MAX_ROUNDS)
    _check_salt(salt)
    salt = salt[:_MAX_SALT]
    digest = _digest(
        # surrogatepass: a password decoded from a header with surrogateescape
        # must give a wrong-password answer, never an exception.
        password.encode("utf-8", "surrogatepass"),
        salt.encode("ascii"),
        _DEFAULT_ROUNDS if explicit is None else explicit,
    )
    encoded = "".join(
        _b64_group(digest[i], digest[j], digest[k], 4) for i, j, k in _SHA256_BYTE_ORDER
    )
    encoded += _b64_group(0, digest[31], digest[30], 3)
    head = _PREFIX if explicit is None else f"{_PREFIX}{_ROUNDS_PREFIX}{explicit}$"
    return f"{head}{salt}${encoded}"


def _is_sha256_crypt_hash(text: str) -> bool:
    if not text.startswith(_PREFIX):
        return False
    setting, sep, encoded = text.rpartition("$")
    if not sep or len(encoded) != _HASH_CHARS or any(ch not in _CRYPT_ALPHABET for ch in encoded):
        return False
    try:
        _rounds, salt = _parse_setting(setting)
        _check_salt(salt)
    except ValueError:
        return False
    return len(salt) <= _MAX_SALT and setting.endswith(salt)


def verify_sha256_crypt(password: str, hashed: str) -> bool:
    """Whether `password` gives `hashed`; False for anything that is not a
    well-formed "$5$" hash. The comparison takes constant time."""
    if not _is_sha256_crypt_hash(hashed):
        return False
    computed = sha256_crypt(password, hashed)
    return hmac.compare_digest(computed.encode("ascii"), hashed.encode("ascii"))


def _random_salt() -> str:
    return "".join(secrets.choice(_CRYPT_ALPHABET) for _ in range(_MAX_SALT))


def hash_password(password: str) -> str:
    """A new "$5$" hash of `password` with a random 16-character salt."""
    return sha256_crypt(password, _random_salt())


# -- users ---------------------------------------------------------------------------

#: kasmpasswd's name field is a char[128]: at most 127 bytes.
MAX_NAME_BYTES = 127
#: kasmvncpasswd refuses shorter passwords.
MIN_PASSWORD_CHARS = 6
#: SHA-crypt's cost grows with the password's length (it is hashed in every
#: round), so a bound keeps a login attempt cheap; far above any real password.
MAX_PASSWORD_BYTES = 1024
#: The user that `create_initial` makes.
DEFAULT_OWNER_NAME = "owner"


class UserStoreError(Exception):
    """Base class of the user store's errors; the message is fit to show."""


class MalformedUsersFileError(UserStoreError):
    """A line of the users file cannot be read; the message names the line."""

    def __init__(self, path: Path, lineno: int, reason: str) -> None:
        super().__init__(f"{path}, line {lineno}: {reason}")
        self.path = path
        self.lineno = lineno
        self.reason = reason


class InvalidUserError(UserStoreError, ValueError):
    """A name or password that the users file cannot hold or that is too weak."""


class UserExistsError(UserStoreError, ValueError):
    pass


class UnknownUserError(UserStoreError, KeyError):
    def __str__(self) -> str:  # KeyError would show the repr
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Permissions:
    """The flags as stored in the file. Use the `can_*` properties to decide."""

    read: bool = False
    write: bool = False
    owner: bool = False

    @classmethod
    def parse(cls, flags: str) -> Permissions:
        unknown = set(flags) - set("rwo")
        if unknown:
            raise ValueError(
                f"unknown permission {''.join(sorted(unknown))!r} (expected letters from 'rwo')"
            )
        return cls(read="r" in flags, write="w" in flags, owner="o" in flags)

    def __str__(self) -> str:
        # KasmVNC writes the letters in this order.
        return (
            ("r" if self.read else "") + ("w" if self.write else "") + ("o" if self.owner else "")
        )

    @property
    def can_view(self) -> bool:
        return self.read or self.write

    @property
    def can_input(self) -> bool:
        """Keyboard, pointer, clipboard and resize."""
        return self.write

    @property
    def can_manage(self) -> bool:
        """The developer API, including user management."""
        return self.owner


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    permissions: Permissions

    def line(self) -> str:
        return f"{self.name}:{self.password_hash}:{self.permissions}\n"


@dataclass(frozen=True)
class UserChange:
    """One entry of KasmVNC's bulk POST to create_user, update_user or
    remove_user. `create` inserts or replaces; `update` sets all three flags
    (so a missing flag means False) and the password if one is given; `remove`
    needs only the name."""

    action: Literal["create", "update", "remove"]
    name: str
    password: str | None = None
    read: bool = False
    write: bool = False
    owner: bool = False


def validate_name(name: str) -> None:
    if not name:
        raise InvalidUserError("user name is empty")
    if any(ch in name for ch in ":\n\r\0"):
        raise InvalidUserError("user name must not contain ':' or line breaks")
    if name != name.strip():
        # A Basic-auth header or a hand-edited file would not keep them reliably.
        raise InvalidUserError("user name must not start or end with white space")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidUserError(f"user name is longer than {MAX_NAME_BYTES} bytes")


def validate_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidUserError(f"password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise InvalidUserError(f"password is longer than {MAX_PASSWORD_BYTES} bytes")
    if any(ch in password for ch in "\n\r\0"):
        # kasmvncpasswd reads one line, and crypt(3) stops at NUL.
        raise InvalidUserError("password must not contain line breaks or NUL")


def default_users_path() -> Path:
    """KasmVNC's default users file, ~/.kasmpasswd."""
    return Path.home() / ".kasmpasswd"


def _parse_users(path: Path, text: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        parts = raw.split(":")
        if len(parts) != 3:
            raise MalformedUsersFileError(
                path, lineno, f"expected name:hash:permissions, found {len(parts) - 1} ':'"
            )
        name, hashed, flags = parts
        try:
            validate_name(name)
        except InvalidUserError as exc:
            raise MalformedUsersFileError(path, lineno, str(exc)) from None
        if not _is_sha256_crypt_hash(hashed):
            raise MalformedUsersFileError(
                path, lineno, f"user {name!r}: the password is not a SHA-256-crypt ($5$) hash"
            )
        try:
            perms = Permissions.parse(flags.strip())
        except ValueError as exc:
            raise MalformedUsersFileError(path, lineno, f"user {name!r}: {exc}") from None
        if name in users:
            raise MalformedUsersFileError(path, lineno, f"user {name!r} appears twice")
        users[name] = User(name, hashed, perms)
    return users


def _render(users: Iterable[User]) -> bytes:
    return "".join(u.line() for u in users).encode("utf-8")


_FileSignature = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def _signature(st: os.stat_result) -> _FileSignature:
    # The inode changes on every atomic replace, so it catches two writes of the
    # same size within the file system's mtime granularity.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_dir(dir_fd: int) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse; nothing else to do
        os.fsync(dir_fd)


def _atomic_write(target: Path, data: bytes, dir_fd: int) -> None:
    write_atomically(target, data, 0o600)
    _fsync_dir(dir_fd)


ChangedCallback = Callable[[str], None]


class UserStore:
    """The users of one kasmpasswd file.

    A missing file is an empty store; the first change creates it (mode 0600).
    Reads (`get`, `users`, `verify`) see an immutable snapshot and are safe
    from any thread, so `verify` can run in a worker thread
    (`trio.to_thread.run_sync`): it costs a few milliseconds of hashing. Changes
    are serialized by a lock and block on fsync; each is on disk before it
    returns and before the `changed` callbacks run (in the calling thread, once
    per affected name)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.changed: list[ChangedCallback] = []
        self._lock = threading.Lock()
        self._users: Mapping[str, User] = {}
        self._signature: _FileSignature | None = None
        # The malformed version last warned about, so it is logged once.
        self._rejected: _FileSignature | None = None
        # Unknown names are checked against a hash of a random password made
        # with the same parameters (rounds, salt length) as the stored users'
        # hashes, so that they cost what a wrong password costs: an attacker
        # cannot time which names exist. One per parameter set, made once.
        self._dummies: dict[tuple[int | None, int], str] = {}
        self._dummy_hash = self._dummy_for(None, _MAX_SALT)
        with self._lock:
            self._users, self._signature = self._read()
            self._dummy_hash = self._typical_dummy(self._users)

    # -- reading ------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, User], _FileSignature | None]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return {}, None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            lineno = data[: exc.start].count(b"\n") + 1
            raise MalformedUsersFileError(self.path, lineno, "not UTF-8 text") from None
        return _parse_users(self.path, text), _signature(st)

    def _current_signature(self) -> _FileSignature | None:
        try:
            return _signature(os.stat(self.path))
        except FileNotFoundError:
            return None

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed on disk since it was last read or
        written (for `trivnc passwd` run while the server runs); cheap enough
        (one stat) to call before every login. Returns whether it did. A
        deleted file means no users (fail closed). A malformed file is logged
        once and ignored: the store keeps the users it had, so a bad hand edit
        does not lock everyone out (the next change refuses to overwrite it)."""
        with self._lock:
            try:
                affected = self._reload_locked()
            except MalformedUsersFileError as exc:
                sig = self._current_signature()
                if sig != self._rejected:
                    self._rejected = sig
                    log.warning("users file not reloaded, keeping the previous users: %s", exc)
                return False
        self._notify(affected)
        return affected is not None

    def _reload_locked(self) -> list[str] | None:
        """Raises MalformedUsersFileError."""
        if self._current_signature() == self._signature:
            return None
        users, sig = self._read()
        affected = _diff(self._users, users)
        self._users, self._signature = users, sig
        self._dummy_hash = self._typical_dummy(users)
        return affected

    def _dummy_for(self, rounds: int | None, salt_length: int) -> str:
        key = (rounds, salt_length)
        dummy = self._dummies.get(key)
        if dummy is None:
            salt = _random_salt()[:salt_length]
            if rounds is not None:
                salt = f"{_PREFIX}{_ROUNDS_PREFIX}{rounds}${salt}"
            dummy = self._dummies[key] = sha256_crypt(secrets.token_urlsafe(16), salt)
        return dummy

    def _typical_dummy(self, users: Mapping[str, User]) -> str:
        """The dummy hash with the parameters most of `users` have (trivnc's
        own, 5000 rounds and a 16-character salt, when there are none)."""
        if not users:
            return self._dummy_for(None, _MAX_SALT)
        counts: dict[tuple[int | None, int], int] = {}
        for user in users.values():
            rounds, salt = _parse_setting(user.password_hash.rpartition("$")[0])
            key = (rounds, len(salt))
            counts[key] = counts.get(key, 0) + 1
        return self._dummy_for(*max(counts, key=lambda k: counts[k]))

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def users(self) -> list[User]:
        """All users in file order."""
        return list(self._users.values())

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __iter__(self) -> Iterator[User]:
        return iter(self.users())

    def verify(self, name: str, password: str) -> User | None:
        """The user if `password` is theirs, else None. Unknown names and wrong
        passwords take the same work: one SHA-256-crypt either way."""
        user = self._users.get(name)
        # A name is looked up once and compared only through the hash below;
        # an unknown one is checked against the dummy, whose rounds and salt
        # length are the stored users' (see _typical_dummy).
        hashed = user.password_hash if user is not None else self._dummy_hash
        if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
            # Refused before hashing, for everyone alike: this only tells an
            # attacker that the password is too long.
            return None
        ok = verify_sha256_crypt(password, hashed)
        return user if ok and user is not None else None

    # -- changing -----------------------------------------------------------------------

    def create(
        self,
        name: str,
        password: str,
        *,
        read: bool,
        write: bool,
        owner: bool,
        replace: bool = False,
    ) -> User:
        """Add a user (or, with `replace`, overwrite one of the same name)."""
        validate_name(name)
        validate_password(password)
        user = User(name, hash_password(password), Permissions(read, write, owner))

        def change(users: dict[str, User]) -> list[str]:
            if name in users and not replace:
                raise UserExistsError(f"user {name!r} already exists")
            users[name] = user
            return [name]

        self._mutate(change)
        return user

    def update(
        self,
        name: str,
        *,
        password: str | None = None,
        read: bool | None = None,
        write: bool | None = None,
        owner: bool | None = None,
    ) -> User:
        """Change a user's password and/or flags; None leaves a field as it is."""
        new_hash = None
        if password is not None:
            validate_password(password)
            new_hash = hash_password(password)
        result: list[User] = []

        def change(users: dict[str, User]) -> list[str]:
            old = users.get(name)
            if old is None:
                raise UnknownUserError(f"no user named {name!r}")
            p = old.permissions
            perms = Permissions(
                p.read if read is None else read,
                p.write if write is None else write,
                p.owner if owner is None else owner,
            )
            users[name] = User(name, new_hash or old.password_hash, perms)
            result.append(users[name])
            return [name]

        self._mutate(change)
        return result[0]

    def remove(self, name: str) -> None:
        def change(users: dict[str, User]) -> list[str]:
            if users.pop(name, None) is None:
                raise UnknownUserError(f"no user named {name!r}")
            return [name]

        self._mutate(change)

    def apply(self, changes: Sequence[UserChange]) -> None:
        """KasmVNC's bulk POST: every change is validated and, for update and
        remove, its user must exist (after the earlier changes of the list);
        then all are written at once, or none if any fails."""
        if not changes:
            return
        # Hash outside the lock: it is the slow part.
        prepared: list[tuple[UserChange, str | None]] = []
        for ch in changes:
            validate_name(ch.name)
            hashed = None
            if ch.action == "create":
                if ch.password is None:
                    raise InvalidUserError(f"user {ch.name!r}: a password is required")
                validate_password(ch.password)
                hashed = hash_password(ch.password)
            elif ch.action == "update" and ch.password is not None:
                validate_password(ch.password)
                hashed = hash_password(ch.password)
            elif ch.action not in ("update", "remove"):
                raise InvalidUserError(f"unknown action {ch.action!r}")
            prepared.append((ch, hashed))

        def change(users: dict[str, User]) -> list[str]:
            affected: list[str] = []
            for ch, hashed in prepared:
                perms = Permissions(ch.read, ch.write, ch.owner)
                if ch.action == "create":
                    assert hashed is not None  # set above for every create
                    users[ch.name] = User(ch.name, hashed, perms)
                elif ch.action == "update":
                    old = users.get(ch.name)
                    if old is None:
                        raise UnknownUserError(f"no user named {ch.name!r}")
                    users[ch.name] = User(ch.name, hashed or old.password_hash, perms)
                elif users.pop(ch.name, None) is None:
                    raise UnknownUserError(f"no user named {ch.name!r}")
                if ch.name not in affected:
                    affected.append(ch.name)
            return affected

        self._mutate(change)

    def _mutate(self, change: Callable[[dict[str, User]], list[str]]) -> None:
        """Apply `change` to a copy of the latest users and write the result.
        The in-memory users change only once the file is on disk."""
        target = Path(os.path.realpath(self.path))  # keep a symlinked file a symlink
        with self._lock:
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # Serializes writers across processes (trivnc passwd against a
                # running server); the lock goes when the descriptor closes.
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
                # Start from what is on disk now, so another writer's change
                # is kept rather than overwritten.
                external = self._reload_locked() or []
                users = dict(self._users)
                affected = change(users)
                _atomic_write(target, _render(users.values()), dir_fd)
                self._users, self._signature = users, self._current_signature()
                self._dummy_hash = self._typical_dummy(users)
            finally:
                os.close(dir_fd)
        self._notify(external)
        self._notify(affected)

    def _notify(self, names: Iterable[str] | None) -> None:
        for name in names or ():
            for callback in list(self.changed):
                callback(name)


def _diff(old: Mapping[str, User], new: Mapping[str, User]) -> list[str]:
    names = list(old) + [n for n in new if n not in old]
    return [n for n in names if old.get(n) != new.get(n)]


def create_initial(path: str | os.PathLike[str]) -> tuple[UserStore, str, str]:
    """First run: create the users file with one user, "owner", holding every
    permission and a random password. Returns (store, name, password) so the
    caller can print them once; the password is not kept anywhere else.
    Raises FileExistsError if the file exists."""
    target = Path(path)
    if os.path.lexists(target):
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = UserStore(target)
    # 18 random bytes: 24 URL-safe characters, easy to copy from a terminal.
    password = secrets.token_urlsafe(18)
    store.create(DEFAULT_OWNER_NAME, password, read=True, write=True, owner=True)
    return store, DEFAULT_OWNER_NAME, password

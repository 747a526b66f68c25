# `trivnc passwd`: KasmVNC's kasmvncpasswd for trivnc's users file.
#
# The flags mean what they mean there: -r/-w/-o set the user's permissions to
# exactly the flags given (so no flag strips them all), -n keeps the password
# and changes only the permissions, -d deletes the user. Unlike kasmvncpasswd,
# -u may be left out and then names "owner", the user that trivnc's first run
# creates; and the password may come on standard input as one line or as two
# identical lines (kasmvncpasswd's `echo -e "pw\npw\n" | ...` works too).
from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .server.users import (
    DEFAULT_OWNER_NAME,
    InvalidUserError,
    Permissions,
    UserStore,
    UserStoreError,
    default_users_path,
    validate_name,
    validate_password,
)

__all__ = ["build_parser", "main"]

_TTY_ATTEMPTS = 3


class _Failure(Exception):
    """Ends the command with this message and exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trivnc passwd",
        description="Add a user to a trivnc (KasmVNC kasmpasswd) users file, change a "
        "user's password or permissions, or delete a user. The file is updated atomically.",
        epilog="Permissions are set to exactly the flags given: without -r, -w or -o the user "
        "has none. The password is asked for twice on a terminal; otherwise it is read from "
        "standard input, one line (or two identical lines). Passwords need at least 6 "
        "characters.",
    )
    p.add_argument(
        "-u",
        dest="user",
        metavar="NAME",
        default=DEFAULT_OWNER_NAME,
        help=f"the user (default {DEFAULT_OWNER_NAME!r})",
    )
    p.add_argument("-r", dest="read", action="store_true", help="read permission: may watch")
    p.add_argument(
        "-w",
        dest="write",
        action="store_true",
        help="write permission: may use keyboard, mouse and clipboard (implies watching)",
    )
    p.add_argument(
        "-o", dest="owner", action="store_true", help="owner: may use the API and manage users"
    )
    p.add_argument(
        "-n",
        dest="nopass",
        action="store_true",
        help="don't change the password, change the permissions only",
    )
    p.add_argument("-d", dest="delete", action="store_true", help="delete the user")
    p.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help=f"users file (default {default_users_path()})",
    )
    return p


def _read_password_tty() -> str:
    for _ in range(_TTY_ATTEMPTS):
        first = getpass.getpass("Password: ")
        if not first:
            raise _Failure("password not changed")
        try:
            validate_password(first)
        except InvalidUserError as exc:
            print(f"{exc} - try again", file=sys.stderr)
            continue
        if getpass.getpass("Verify: ") != first:
            print("passwords don't match - try again", file=sys.stderr)
            continue
        return first
    raise _Failure("password not changed")


def _read_password_stream(stream: TextIO) -> str:
    # At most two lines are read, whatever follows is not ours.
    lines = [stream.readline(), stream.readline()]
    first, second = (line.removesuffix("\n").removesuffix("\r") for line in lines)
    if not lines[0]:
        raise _Failure("no password on standard input")
    if lines[1] and second != first:
        raise _Failure("passwords don't match")
    if not first:
        raise _Failure("password not changed")
    try:
        validate_password(first)
    except InvalidUserError as exc:
        raise _Failure(str(exc)) from None
    return first


def _read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        return _read_password_tty()
    return _read_password_stream(stdin)


def _warn_permissions(name: str, perms: Permissions, before: Permissions | None) -> None:
    if not perms.can_view:
        print(
            f"note: {name!r} has no read or write permission and cannot watch the desktop "
            "(add -r to let them watch)",
            file=sys.stderr,
        )
    if before is not None and before.owner and not perms.owner:
        print(f"note: {name!r} is no longer an owner", file=sys.stderr)


def _run(args: argparse.Namespace, stdin: TextIO) -> int:
    name: str = args.user
    try:
        validate_name(name)
    except InvalidUserError as exc:
        raise _Failure(str(exc)) from None
    path = Path(args.file) if args.file else default_users_path()
    store = UserStore(path)
    perms = Permissions(args.read, args.write, args.owner)
    existing = store.get(name)

    if args.delete:
        store.remove(name)
        print(f"deleted user {name!r} from {path}", file=sys.stderr)
        return 0
    if args.nopass:
        store.update(name, read=perms.read, write=perms.write, owner=perms.owner)
        print(f"set permissions of {name!r} to {str(perms) or 'none'}", file=sys.stderr)
    else:
        password = _read_password(stdin)
        store.create(
            name, password, read=perms.read, write=perms.write, owner=perms.owner, replace=True
        )
        verb = "changed password of" if existing else "added user"
        print(f"{verb} {name!r} ({str(perms) or 'no permissions'}) in {path}", file=sys.stderr)
    _warn_permissions(name, perms, existing.permissions if existing else None)
    return 0


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None) -> int:
    """Run `trivnc passwd` with `argv` (without the program and subcommand
    names). Returns the exit status: 0 done, 1 failed, 2 bad usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse has printed the usage and the reason
        return exc.code if isinstance(exc.code, int) else 2
    if args.delete and (args.nopass or args.read or args.write or args.owner):
        parser.print_usage(sys.stderr)
        print("trivnc passwd: error: -d cannot be combined with -r, -w, -o or -n", file=sys.stderr)
        return 2
    try:
        return _run(args, stdin if stdin is not None else sys.stdin)
    except (_Failure, UserStoreError) as exc:
        # MalformedUsersFileError's message names the file and the line.
        print(f"trivnc passwd: {exc}", file=sys.stderr)
        return 1
    except UnicodeDecodeError:
        print("trivnc passwd: the password on standard input is not valid text", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"trivnc passwd: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except EOFError:
        print("\ntrivnc passwd: password not changed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntrivnc passwd: password not changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

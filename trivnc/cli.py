"""The `trivnc` command: the library with a command line around it."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .config import Config, ConfigError, load_config_file, parse_port, parse_size

if TYPE_CHECKING:
    from .server import Server

DEFAULT_WEB_PORT = 8443

log = logging.getLogger("trivnc")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trivnc",
        description="Share a desktop with VNC viewers and browsers. With no display given, "
        "serves a built-in demo desktop.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--display", metavar=":N", help="share a running X display"
    )
    src.add_argument(
        "--xvfb",
        metavar="WxH",
        help="start a private Xvfb of this size; a command after -- runs in it, and the "
        "session ends when it exits",
    )
    src.add_argument(
        "--geometry", metavar="WxH", help="size of the demo desktop (default 1280x720)"
    )
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        help="address to listen on; repeat for several (default 127.0.0.1)",
    )
    p.add_argument("--rfb-port", metavar="N|off", help="VNC (RFB) port (default 5900)")
    p.add_argument(
        "--web-port",
        metavar="N|off",
        help="HTTPS port for the browser client and the developer API (default 8443)",
    )
    p.add_argument(
        "--users",
        metavar="FILE",
        help="users file in KasmVNC's format (default ~/.kasmpasswd, created on first run)",
    )
    p.add_argument("--web-root", metavar="DIR", help="where noVNC is (default: found)")
    p.add_argument(
        "--rfbauth",
        metavar="FILE",
        help="VNC password file (as TigerVNC's vncpasswd writes it) for VNC authentication",
    )
    p.add_argument("--cert", metavar="FILE", help="TLS certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="let the RFB port accept clients without authentication (loopback only)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML file with the same settings as the options"
    )
    p.add_argument(
        "--max-frame-rate", metavar="N", type=float, help="frames per second at most (default 60)"
    )
    p.add_argument(
        "--defer-update",
        metavar="MS",
        type=float,
        help="wait this long after a change before capturing (default 4)",
    )
    p.add_argument(
        "--quality-min",
        metavar="LEVEL",
        type=int,
        help="lowest JPEG quality level (0-9) dynamic quality may use on a slow link (default 4)",
    )
    p.add_argument(
        "--video-area",
        metavar="PERCENT",
        type=int,
        help="share of the screen that must keep changing for video mode (default 45)",
    )
    p.add_argument(
        "--video-time",
        metavar="S",
        type=float,
        help="seconds of such changes before video mode starts (default 5)",
    )
    p.add_argument(
        "--video-out-time",
        metavar="S",
        type=float,
        help="seconds of smaller changes before video mode ends (default 3)",
    )
    p.add_argument(
        "--video-quality",
        metavar="LEVEL",
        type=int,
        help="JPEG quality level in video mode, -1 for unchanged (default -1)",
    )
    p.add_argument(
        "--video-max-resolution",
        metavar="WxH",
        help="video is scaled down to fit this for clients that scale up (default 1920x1080)",
    )
    p.add_argument("--desktop-name", metavar="NAME", help="name shown by viewers")
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        help="RFB connections (TCP and WebSocket) open at once, 0 for no limit (default 100)",
    )
    p.add_argument(
        "--max-connections-per-user",
        metavar="N",
        type=int,
        help="connections one user may have open at once, 0 for no limit (default 0)",
    )
    p.add_argument(
        "--handshake-timeout",
        metavar="S",
        type=float,
        help="seconds a client has to finish the handshake (default 10)",
    )
    p.add_argument(
        "--send-timeout",
        metavar="S",
        type=float,
        help="disconnect a client that accepts no data for this long (default 30)",
    )
    p.add_argument(
        "--no-tls",
        action="store_true",
        help="plain HTTP and WebSocket on the web port (loopback addresses only)",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    return p


def config_from_args(args: argparse.Namespace, command: list[str] | None = None) -> Config:
    # The command line's own defaults: the web port is on (a library user
    # opts in through Config).
    values: dict[str, Any] = {"web_port": DEFAULT_WEB_PORT}
    if args.config:
        values.update(load_config_file(Path(args.config)))
    if args.display:
        values["display"] = args.display
    if args.xvfb:
        values["xvfb"] = parse_size(args.xvfb)
    if command:
        if not args.xvfb:
            raise ConfigError("a command after -- needs --xvfb")
        values["xvfb_command"] = command
    if args.geometry:
        values["geometry"] = parse_size(args.geometry)
    if args.listen:
        values["listen"] = args.listen
    if args.rfb_port is not None:
        values["rfb_port"] = parse_port(args.rfb_port)
    if args.web_port is not None:
        values["web_port"] = parse_port(args.web_port)
    if args.users:
        values["users_file"] = Path(args.users)
    if args.rfbauth:
        values["vnc_password_file"] = Path(args.rfbauth)
    if args.cert:
        values["cert"] = Path(args.cert)
    if args.key:
        values["key"] = Path(args.key)
    if args.insecure_no_auth:
        values["insecure_no_auth"] = True
    if args.max_frame_rate is not None:
        values["max_frame_rate"] = args.max_frame_rate
    if args.desktop_name:
        values["desktop_name"] = args.desktop_name
    if args.web_root:
        values["web_root"] = Path(args.web_root)
    if args.video_max_resolution:
        values["video_max_resolution"] = parse_size(args.video_max_resolution)
    for name in (
        "quality_min",
        "video_area",
        "video_time",
        "video_out_time",
        "video_quality",
        "defer_update",
        "max_connections",
        "max_connections_per_user",
        "handshake_timeout",
        "send_timeout",
    ):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.no_tls:
        values["no_tls"] = True
    config = Config(**values)
    config.validate()
    return config


async def _run(config: Config) -> None:
    from .server import serve

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, config)
        if config.display:
            what = f"X display {config.display}"
        elif config.xvfb:
            what = f"a private Xvfb ({server.source.name})"
        else:
            what = "the demo desktop"
        w, h = server.service.latest.size if server.service.latest else config.geometry
        print(f"trivnc: serving {what} ({w}x{h})", flush=True)
        if server.initial_credentials is not None:
            path, name, password = server.initial_credentials
            print(
                f"trivnc: created {path} with user {name!r}, password {password!r}"
                " (shown once; change it with `trivnc passwd`)",
                flush=True,
            )
        scheme = "http" if config.no_tls else "https"
        for host, port in server.web_addresses:
            shown = f"[{host}]" if ":" in host else host
            print(f"trivnc: browsers open {scheme}://{shown}:{port}/", flush=True)
        for host, port in server.rfb_addresses:
            shown = f"[{host}]" if ":" in host else host
            print(
                f"trivnc: VNC viewers connect to {shown}::{port}  (e.g. vncviewer {shown}::{port})",
                flush=True,
            )
        if config.insecure_no_auth:
            print("trivnc: no authentication on the RFB port (loopback only)", flush=True)
        print("trivnc: press Ctrl+C to stop", flush=True)
    if server.end_reason:
        print(f"trivnc: {server.end_reason}; stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["passwd"]:
        from .passwd import main as passwd_main

        return passwd_main(argv[1:])
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = config_from_args(args, command)
    except ConfigError as exc:
        print(f"trivnc: {exc}", file=sys.stderr)
        return 2
    expected = _expected_errors()
    try:
        trio.run(_run, config)
    except KeyboardInterrupt:
        print("trivnc: stopped", file=sys.stderr)
    except expected as exc:
        print(f"trivnc: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Errors from inside the server's nurseries arrive grouped.
        if group.subgroup(KeyboardInterrupt) is not None:
            print("trivnc: stopped", file=sys.stderr)
            return 0
        errors = group.subgroup(expected)
        if errors is None:
            raise
        print(f"trivnc: {_first_leaf(errors)}", file=sys.stderr)
        return 1
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    """Failures a user can cause and fix (a port in use, a display that is
    not there, a malformed users file): a message, not a traceback."""
    from .server.users import UserStoreError
    from .sources.x11 import CaptureError, DisplayGone, XvfbError

    return (OSError, ConfigError, UserStoreError, DisplayGone, CaptureError, XvfbError)


def _first_leaf(group: BaseExceptionGroup[Exception]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())

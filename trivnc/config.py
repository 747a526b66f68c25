"""trivnc's configuration: one dataclass that the command line, a TOML config
file and embedding programs all fill in."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources.base import Source

if TYPE_CHECKING:
    from .server.adapt import VideoSettings


class ConfigError(ValueError):
    """The configuration cannot work; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Config:
    """Everything `trivnc.serve` needs. Ports: 0 picks a free port, None is off."""

    #: Where pixels come from; None serves the built-in demo desktop.
    source: Source | None = None
    #: Size of the demo desktop.
    geometry: tuple[int, int] = (1280, 720)
    #: Addresses to listen on.
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    #: The RFB (VNC) port; the command line's default web port is 8443.
    rfb_port: int | None = 5900
    web_port: int | None = None
    #: Accept security type None on the RFB port (only on loopback addresses
    #: unless `allow_remote_no_auth`).
    insecure_no_auth: bool = False
    allow_remote_no_auth: bool = False
    #: Classic VNC authentication: a password, or a vncpasswd file.
    vnc_password: str | None = field(default=None, repr=False)
    vnc_password_file: Path | None = None
    #: Name shown to viewers (default: the source's).
    desktop_name: str | None = None
    #: Frames captured and sent per second at most.
    max_frame_rate: float = 60.0
    #: The lowest JPEG quality level (0-9) dynamic quality may go down to
    #: when the link cannot carry the client's own level (KasmVNC's
    #: encoding.rect_encoding_mode.min_quality, as a level).
    quality_min: int = 4
    #: Video mode: entered when at least `video_area` percent of the screen
    #: changes in every frame for `video_time` seconds, left after
    #: `video_out_time` seconds of smaller changes. In it rects go lossy
    #: without analysis at `video_quality` (-1: the current quality), scaled
    #: down to `video_max_resolution` for clients that scale back up.
    video_area: int = 45
    video_time: float = 5.0
    video_out_time: float = 3.0
    video_quality: int = -1
    video_max_resolution: tuple[int, int] = (1920, 1080)
    #: Milliseconds to wait after the first change of a quiet spell before
    #: capturing (Xvnc's DeferUpdate), so that a frame an application draws
    #: in several steps is captured and sent once.
    defer_update: float = 4.0
    #: Seconds a client has to finish the RFB handshake (TLS included; on the
    #: web port also the TLS handshake before HTTP).
    handshake_timeout: float = 10.0
    #: RFB connections open at once, TCP and WebSocket together, counted from
    #: accept (so connections still in the handshake count); 0 is no limit.
    max_connections: int = 100
    #: Connections one user (VeNCrypt user name or HTTP Basic user) may have
    #: open at once; 0 is no limit.
    max_connections_per_user: int = 0
    #: A client that accepts no bytes for this many seconds while the server
    #: has output for it is disconnected.
    send_timeout: float = 30.0
    #: Bytes of control messages and protocol replies a session may hold for a
    #: client that is not reading; beyond it the server stops reading from the
    #: client, and a client over it for send_timeout seconds is disconnected.
    output_buffer_limit: int = 1 << 20
    #: Serve plain HTTP and WebSocket on the web port (loopback addresses only).
    no_tls: bool = False
    #: Seconds between the measurement task's fence round trips.
    measure_interval: float = 1.0
    #: Clipboard text, in characters, passed either way at most.
    clipboard_max_size: int = 1024 * 1024
    #: Worker threads for capture and encoding (default: one per core).
    encode_threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    #: Share a running X display (":1"), or start a private Xvfb of this size
    #: running `xvfb_command` (both need `source` left as None).
    display: str | None = None
    xvfb: tuple[int, int] | None = None
    xvfb_command: list[str] = field(default_factory=list)
    #: KasmVNC-format users file (default ~/.kasmpasswd); created with an owner
    #: and a random password on first use.
    users_file: Path | None = None
    #: TLS certificate and key (PEM); a self-signed pair is made and kept in
    #: trivnc's state directory when not given.
    cert: Path | None = None
    key: Path | None = None
    #: Where the noVNC web client is (default: Debian's or npm's install).
    web_root: Path | None = None

    def validate(self) -> None:
        """Raise ConfigError for a configuration that cannot start."""
        if self.display is not None and self.xvfb is not None:
            raise ConfigError("give either --display or --xvfb, not both")
        if (self.display is not None or self.xvfb is not None) and self.source is not None:
            raise ConfigError("a Source and --display/--xvfb exclude each other")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--cert and --key go together")
        if self.rfb_port is None and self.web_port is None:
            raise ConfigError("both ports are off: nothing to serve")
        if not 0 < self.max_frame_rate <= 240:
            raise ConfigError("max_frame_rate must be between 0 and 240")
        if not 0 <= self.quality_min <= 9:
            raise ConfigError("quality_min must be a level from 0 to 9")
        if not -1 <= self.video_quality <= 9:
            raise ConfigError("video_quality must be -1 (unchanged) or a level from 0 to 9")
        if not 1 <= self.video_area <= 101:
            raise ConfigError("video_area must be a percentage from 1 to 100 (101: never)")
        if self.video_time < 0 or self.video_out_time < 0:
            raise ConfigError("video_time and video_out_time must not be negative")
        vw, vh = self.video_max_resolution
        if not (16 <= vw <= 16384 and 16 <= vh <= 16384):
            raise ConfigError(f"video_max_resolution {vw}x{vh} out of range (16..16384)")
        if not 0 <= self.defer_update <= 1000:
            raise ConfigError("defer_update must be between 0 and 1000 ms")
        if self.handshake_timeout <= 0 or self.send_timeout <= 0:
            raise ConfigError("handshake_timeout and send_timeout must be positive")
        if self.max_connections < 0 or self.max_connections_per_user < 0:
            raise ConfigError("connection limits must be 0 (no limit) or more")
        if self.output_buffer_limit < 65536:
            raise ConfigError("output_buffer_limit must be at least 65536 bytes")
        if self.no_tls and self.web_port is not None:
            remote = [a for a in self.listen if not is_loopback(a)]
            if remote:
                raise ConfigError(
                    f"--no-tls refused: {', '.join(remote)} is not a loopback address, and "
                    "passwords and the desktop would cross the network unencrypted"
                )
        w, h = self.geometry
        if not (16 <= w <= 16384 and 16 <= h <= 16384):
            raise ConfigError(f"geometry {w}x{h} out of range (16..16384)")
        if self.rfb_port is not None and self.insecure_no_auth and not self.allow_remote_no_auth:
            remote = [a for a in self.listen if not is_loopback(a)]
            if remote:
                raise ConfigError(
                    f"--insecure-no-auth refused: {', '.join(remote)} is not a loopback "
                    "address, and anyone who reaches it would control the desktop"
                )

    def video_settings(self) -> VideoSettings:
        from .server.adapt import VideoSettings

        return VideoSettings(
            area=self.video_area,
            enter_seconds=self.video_time,
            leave_seconds=self.video_out_time,
            quality=self.video_quality,
            max_width=self.video_max_resolution[0],
            max_height=self.video_max_resolution[1],
        )

    @property
    def has_vnc_password(self) -> bool:
        return self.vnc_password is not None or self.vnc_password_file is not None

    @property
    def needs_users(self) -> bool:
        """The web port always authenticates users; the RFB port does through
        VeNCrypt unless it runs without authentication or with a VNC password."""
        if self.web_port is not None or self.users_file is not None:
            return True
        return self.rfb_port is not None and not self.insecure_no_auth and not self.has_vnc_password


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise ConfigError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def parse_port(text: str | int | None) -> int | None:
    if text is None or text == "off":
        return None
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"expected a port number or 'off', got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} out of range")
    return port


#: Config-file keys and how to read them (the command line's long options,
#: with dashes as underscores).
_FILE_KEYS: dict[str, Any] = {
    "geometry": parse_size,
    "listen": lambda v: [v] if isinstance(v, str) else list(v),
    "rfb_port": parse_port,
    "web_port": parse_port,
    "insecure_no_auth": bool,
    "rfbauth": Path,
    "max_frame_rate": float,
    "defer_update": float,
    "quality_min": int,
    "video_area": int,
    "video_time": float,
    "video_out_time": float,
    "video_quality": int,
    "video_max_resolution": parse_size,
    "desktop_name": str,
    "display": str,
    "xvfb": parse_size,
    "users": Path,
    "cert": Path,
    "key": Path,
    "web_root": Path,
    "handshake_timeout": float,
    "max_connections": int,
    "max_connections_per_user": int,
    "send_timeout": float,
    "output_buffer_limit": int,
    "no_tls": bool,
}
_RENAMED = {"rfbauth": "vnc_password_file", "users": "users_file"}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into Config field values."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {f.name for f in fields(Config)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FILE_KEYS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        field_name = _RENAMED.get(name, name)
        assert field_name in known
        out[field_name] = _FILE_KEYS[name](value)
    return out

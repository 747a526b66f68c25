"""MkDocs hooks for trivnc's documentation (see docs/mkdocs.yml).

- The pages that live beside this file (architecture.md, performance.md,
  security.md) join the site as they are: mkdocs cannot use docs/ itself as
  its docs_dir because mkdocs.yml is in it.
- Two pages are generated at build time, so they cannot drift from the code:
  ``cli.md`` from the real argparse parsers and the `Config` dataclass, with
  the kasmvnc.yaml key each option corresponds to (`KASMVNC` below), and
  ``developer-api.md`` from the developer API's OpenAPI document, which is
  also published as ``openapi.json``.

An option or Config field that `OPTIONS` / `CONFIG_ONLY` do not describe
fails the build, as does a table entry that no longer exists in the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Pages kept beside this file and added to the site unchanged.
SIBLING_PAGES = ("architecture.md", "performance.md", "security.md")


# -- the option table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """How one command-line option relates to Config and to KasmVNC.

    `field`: the Config field it sets (None: it sets none). `kasmvnc`: the
    kasmvnc.yaml key it corresponds to (None: KasmVNC has no equivalent;
    `note` says what comes closest, if anything). `default`: how to show the
    default when the field's value alone would not say it."""

    field: str | None
    kasmvnc: str | None
    note: str = ""
    default: str | None = None
    #: What the field does, for fields that the code does not comment.
    meaning: str = ""


SIZE = "desktop.resolution.width, desktop.resolution.height"
NONE_NEEDED = "KasmVNC has no such setting"

#: Every option of `trivnc`'s parser, by argparse dest.
OPTIONS: dict[str, Option] = {
    "display": Option(
        "display",
        None,
        "KasmVNC is itself the X server (`vncserver :N`); it does not share another one",
        default="none (demo desktop)",
    ),
    "xvfb": Option("xvfb", SIZE, "KasmVNC's X server is always private", default="none"),
    "geometry": Option("geometry", SIZE),
    "listen": Option("listen", "network.interface", "also network.use_ipv4, network.use_ipv6"),
    "rfb_port": Option(
        "rfb_port",
        None,
        "kasmvnc.yaml has no port for VNC viewers (Xvnc's -rfbport)",
    ),
    "web_port": Option("web_port", "network.websocket_port"),
    "users": Option(
        "users_file", "server.advanced.kasm_password_file", default="~/.kasmpasswd (created)"
    ),
    "web_root": Option(
        "web_root",
        "server.http.httpd_directory",
        default="/usr/share/novnc, else node_modules/@novnc/novnc",
    ),
    "rfbauth": Option(
        "vnc_password_file", None, "Xvnc's -rfbauth (KasmVNC has no VNC passwords)", default="none"
    ),
    "cert": Option(
        "cert",
        "network.ssl.pem_certificate",
        default="self-signed, kept in $XDG_STATE_HOME/trivnc",
    ),
    "key": Option(
        "key", "network.ssl.pem_key", default="self-signed, kept in $XDG_STATE_HOME/trivnc"
    ),
    "insecure_no_auth": Option(
        "insecure_no_auth", None, "Xvnc's -SecurityTypes None; loopback addresses only"
    ),
    "config": Option(
        None, "~/.vnc/kasmvnc.yaml", "the file itself; TOML with flat keys here", default="none"
    ),
    "max_frame_rate": Option("max_frame_rate", "encoding.max_frame_rate"),
    "defer_update": Option("defer_update", None, "Xvnc's -DeferUpdate"),
    "quality_min": Option(
        "quality_min", "encoding.rect_encoding_mode.min_quality", "there a libjpeg quality"
    ),
    "video_area": Option(
        "video_area", "encoding.video_encoding_mode.enter_video_encoding_mode.area_threshold"
    ),
    "video_time": Option(
        "video_time", "encoding.video_encoding_mode.enter_video_encoding_mode.time_threshold"
    ),
    "video_out_time": Option(
        "video_out_time", "encoding.video_encoding_mode.exit_video_encoding_mode.time_threshold"
    ),
    "video_quality": Option("video_quality", "encoding.video_encoding_mode.jpeg_quality"),
    "video_max_resolution": Option(
        "video_max_resolution", "encoding.video_encoding_mode.max_resolution"
    ),
    "desktop_name": Option("desktop_name", None, "Xvnc's -desktop", default="the source's name"),
    "max_connections": Option("max_connections", None, NONE_NEEDED),
    "max_connections_per_user": Option("max_connections_per_user", None, NONE_NEEDED),
    "handshake_timeout": Option("handshake_timeout", None, NONE_NEEDED),
    "send_timeout": Option("send_timeout", None, NONE_NEEDED),
    "no_tls": Option(
        "no_tls", "network.ssl.require_ssl", "false there; trivnc allows it on loopback only"
    ),
    "verbose": Option(None, "logging.level", "-v info, -vv debug", default="warnings only"),
}

#: Config fields that no command-line option sets.
CONFIG_ONLY: dict[str, Option] = {
    "source": Option("source", None, "a program's own desktop (`ArraySource` or a `Source`)"),
    "allow_remote_no_auth": Option(
        "allow_remote_no_auth",
        None,
        NONE_NEEDED,
        meaning="Let `insecure_no_auth` accept clients on addresses that are not loopback.",
    ),
    "vnc_password": Option("vnc_password", None, "Xvnc's -PasswordFile holds it"),
    "measure_interval": Option(
        "measure_interval",
        None,
        NONE_NEEDED,
        meaning="Seconds between the fence round trips that measure each connection's latency "
        "and bandwidth.",
    ),
    "clipboard_max_size": Option(
        "clipboard_max_size",
        "data_loss_prevention.clipboard.server_to_client.size, "
        "data_loss_prevention.clipboard.client_to_server.size",
        meaning="Characters of clipboard text passed either way at most; longer text is dropped.",
    ),
    "encode_threads": Option(
        "encode_threads",
        "encoding.rect_encoding_mode.rectangle_compress_threads",
        default="one per core",
    ),
    "xvfb_command": Option(
        "xvfb_command",
        None,
        "KasmVNC runs ~/.vnc/xstartup",
        meaning="The command to run in the private Xvfb (the command line's `-- COMMAND`).",
    ),
    "output_buffer_limit": Option("output_buffer_limit", None, NONE_NEEDED),
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _field_comments(path: Path, class_name: str) -> dict[str, str]:
    """The `#:` comments above each field of a dataclass, by field name."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == class_name):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                comment: list[str] = []
                row = item.lineno - 2
                while row >= 0 and lines[row].strip().startswith("#:"):
                    comment.insert(0, lines[row].strip()[2:].strip())
                    row -= 1
                if comment:
                    out[item.target.id] = " ".join(comment)
    return out


def _default_value(config_cls: type, name: str) -> object:
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return dataclasses.MISSING
    raise KeyError(name)


def _show_default(value: object, *, port: bool = False) -> str:
    if value is None:
        return "off" if port else "none"
    if isinstance(value, bool):
        return _code("true" if value else "false")
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return _code(f"{value[0]}x{value[1]}")
    if isinstance(value, list):
        return ", ".join(_code(str(v)) for v in value) or "none"
    if isinstance(value, float) and value.is_integer():
        return _code(str(int(value)))
    return _code(str(value))


_DEFAULT_IN_HELP = re.compile(r"\s*\(default[^)]*\)")


def _help(action: argparse.Action) -> str:
    return _DEFAULT_IN_HELP.sub("", action.help or "").strip()


def _html_code(text: str) -> str:
    # Inline HTML, since a `|` in a Markdown code span would end the table cell.
    return f"<code>{html.escape(text).replace('|', '&#124;')}</code>"


def _option_names(action: argparse.Action) -> str:
    names = ", ".join(_html_code(name) for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} {_html_code(str(metavar))}"


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def check_option_tables() -> None:
    """Raise ValueError if the tables and the code disagree."""
    from trivnc import cli
    from trivnc.config import _FILE_KEYS, _RENAMED, Config

    fields = {f.name for f in dataclasses.fields(Config)}
    dests = {a.dest for a in _actions(cli.build_parser())}
    problems = [
        f"option --{d.replace('_', '-')} is not in docs/hooks.py OPTIONS"
        for d in sorted(dests - set(OPTIONS))
    ]
    problems += [
        f"OPTIONS has {d!r}, which trivnc's parser lacks" for d in sorted(set(OPTIONS) - dests)
    ]
    covered = {o.field for o in OPTIONS.values() if o.field is not None} | set(CONFIG_ONLY)
    problems += [f"Config.{f} is not in OPTIONS or CONFIG_ONLY" for f in sorted(fields - covered)]
    problems += [
        f"docs/hooks.py names Config.{f}, which does not exist" for f in sorted(covered - fields)
    ]
    problems += [
        f"CONFIG_ONLY lists {name!r} under another field"
        for name, o in CONFIG_ONLY.items()
        if o.field != name
    ]
    for key in _FILE_KEYS:
        target = _RENAMED.get(key, key)
        if key in OPTIONS:
            if OPTIONS[key].field != target:
                problems.append(f"config-file key {key!r} sets Config.{target}")
        elif target not in CONFIG_ONLY:
            problems.append(f"config-file key {key!r} is neither an option nor in CONFIG_ONLY")
    if problems:
        raise ValueError("the command-line reference is out of date:\n  " + "\n  ".join(problems))


def cli_page() -> str:
    """The command line and config file reference, as Markdown."""
    from trivnc import cli, passwd
    from trivnc import config as config_module
    from trivnc.config import _FILE_KEYS, _RENAMED, Config

    check_option_tables()
    comments = _field_comments(Path(config_module.__file__), "Config")
    parser = cli.build_parser()
    out = [
        "# Command line and config file",
        "",
        "<!-- Generated by docs/hooks.py from trivnc.cli.build_parser() and "
        "trivnc.config.Config; edit those, not this page. -->",
        "",
        "```text",
        parser.format_usage().strip().removeprefix("usage: "),
        "```",
        "",
        _cell(parser.description or ""),
        "",
        "A command after `--` runs inside the private Xvfb of `--xvfb` (and the session ends "
        "when it exits). `--config FILE` reads a TOML file whose keys are the long options "
        "without their dashes, with `-` or `_` between words; an option given on the command "
        "line wins over the file. Every setting is also a field of `trivnc.Config` for "
        "programs that embed trivnc (see [Embedding](embedding.md)).",
        "",
        "The config file key is also the name of the `trivnc.Config` field unless another is "
        "given. The KasmVNC column names the `kasmvnc.yaml` key that does the same job in KasmVNC; "
        "*none* marks options KasmVNC has no equivalent for.",
        "",
        "## Options",
        "",
        "| option | config file key and `Config` field | default | kasmvnc.yaml | meaning |",
        "|---|---|---|---|---|",
    ]
    for action in _actions(parser):
        option = OPTIONS[action.dest]
        if option.default is not None:
            default = option.default
        elif action.dest == "web_port":
            default = _code(str(cli.DEFAULT_WEB_PORT))  # the command line's own default
        elif option.field is not None:
            default = _show_default(
                _default_value(Config, option.field), port=option.field.endswith("_port")
            )
        else:
            default = _show_default(action.default)
        kasm = _code(option.kasmvnc) if option.kasmvnc else "*none*"
        if option.note:
            kasm += f" ({option.note})"
        if action.dest in _FILE_KEYS:
            where = _code(action.dest)
            if option.field != action.dest:
                where += f" (field {_code(str(option.field))})"
        else:
            where = "command line only"
        cells = (_option_names(action), where, default, kasm, _help(action))
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    out += [
        "",
        "Defaults of the command line that differ from `Config`'s: the web port is on "
        f"(`{cli.DEFAULT_WEB_PORT}`; `Config.web_port` is off), and the source is the demo "
        "desktop unless `--display` or `--xvfb` is given.",
        "",
        "## Settings only a program can make",
        "",
        "These `trivnc.Config` fields have no command-line option; some can be set in the "
        "config file.",
        "",
        "| `Config` field | config file key | default | kasmvnc.yaml | meaning |",
        "|---|---|---|---|---|",
    ]
    file_keys = {_RENAMED.get(key, key): key for key in _FILE_KEYS}
    for name, option in CONFIG_ONLY.items():
        default = option.default or _show_default(_default_value(Config, name))
        kasm = _code(option.kasmvnc) if option.kasmvnc else "*none*"
        if option.note:
            kasm += f" ({option.note})"
        cells = (
            f"`{name}`",
            _code(file_keys.get(name, "")),
            default,
            kasm,
            comments.get(name, option.meaning),
        )
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    out += [
        "",
        "## Config fields explained",
        "",
        "More about the fields that command-line options set, from the comments in "
        "`trivnc/config.py`:",
        "",
    ]
    for f in dataclasses.fields(Config):
        if f.name in comments and f.name not in CONFIG_ONLY:
            out.append(f"- `{f.name}`: {comments[f.name]}")
    pparser = passwd.build_parser()
    out += [
        "",
        "## trivnc passwd",
        "",
        "Adds, changes and deletes users of the users file, with the flags of KasmVNC's "
        "`kasmvncpasswd`.",
        "",
        "```text",
        pparser.format_usage().strip().removeprefix("usage: "),
        "```",
        "",
        "| option | meaning |",
        "|---|---|",
    ]
    for action in _actions(pparser):
        names = _option_names(action) if action.option_strings else f"`{action.dest}`"
        out.append(f"| {_cell(names)} | {_cell(action.help or '')} |")
    out += [
        "",
        "## Example config file",
        "",
        "```toml",
        'listen = ["127.0.0.1", "::1"]',
        "rfb-port = 5901",
        'web-port = "off"',
        'users = "/home/alice/.kasmpasswd"',
        "max-frame-rate = 30",
        "```",
        "",
    ]
    return "\n".join(out)


# -- the developer API page ---------------------------------------------------------------


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return None, node
    target: Any = document
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return ref.rsplit("/", 1)[-1], target


def _schema_text(document: dict[str, Any], schema: dict[str, Any]) -> str:
    name, resolved = _resolve(document, schema)
    if name is not None:
        return f"[{name}](#{name.lower()})"
    kind = resolved.get("type", "")
    if kind == "array" and "items" in resolved:
        return f"array of {_schema_text(document, resolved['items'])}"
    extra = []
    for key in ("enum", "const", "pattern", "minLength", "maxLength", "maxItems", "format"):
        if key in resolved:
            extra.append(f"{key} {json.dumps(resolved[key])}")
    return f"{kind} ({', '.join(extra)})" if extra else str(kind)


def api_page(document: dict[str, Any]) -> str:
    """The developer API reference, as Markdown, from its OpenAPI document."""
    info = document["info"]
    out = [
        "# Developer API",
        "",
        "<!-- Generated by docs/hooks.py from trivnc.api.blueprint.openapi_document(); "
        "edit that, not this page. -->",
        "",
        _cell(info.get("description", "")),
        "",
        "The API is served on the web port (`--web-port`, HTTPS) under `/api`, and by any "
        "application that mounts `trivnc.api.api_blueprint` (see "
        "[Embedding](embedding.md#the-developer-api-in-your-own-quart-trio-app)). The whole "
        f"OpenAPI {document['openapi']} document is [openapi.json](openapi.json); a running "
        "server answers it at `/api/openapi.json`.",
        "",
        "```sh",
        "curl -k -u owner:PASSWORD 'https://127.0.0.1:8443/api/get_screenshot?width=640' "
        "-o shot.jpg",
        "```",
        "",
    ]
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            out += [f"## {method.upper()} {path}", "", _cell(op.get("summary", "")), ""]
            params = op.get("parameters", [])
            if params:
                out += [
                    "| parameter | in | required | schema | description |",
                    "|---|---|---|---|---|",
                ]
                for p in params:
                    out.append(
                        f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} "
                        f"| {_cell(_schema_text(document, p['schema']))} "
                        f"| {_cell(p.get('description', ''))} |"
                    )
                out.append("")
            body = op.get("requestBody")
            if body is not None:
                for media, content in body.get("content", {}).items():
                    out.append(
                        f"Request body ({media}): {_schema_text(document, content['schema'])}. "
                        + _cell(body.get("description", ""))
                    )
                out.append("")
            out += ["| status | meaning | content |", "|---|---|---|"]
            for status, response in op["responses"].items():
                _, resolved = _resolve(document, response)
                content = ", ".join(
                    f"{media}: {_schema_text(document, c['schema'])}" if "schema" in c else media
                    for media, c in resolved.get("content", {}).items()
                )
                out.append(
                    f"| {status} | {_cell(resolved.get('description', ''))} | {_cell(content)} |"
                )
            out.append("")
    components = document.get("components", {})
    out += ["## Schemas", ""]
    for name, schema in components.get("schemas", {}).items():
        out += [f"### {name}", "", "```json", json.dumps(schema, indent=2), "```", ""]
    out += ["## Shared responses", ""]
    for name, response in components.get("responses", {}).items():
        headers = ", ".join(f"`{h}`" for h in response.get("headers", {}))
        line = f"- **{name}**: {response.get('description', '')}"
        out.append(line + (f" Headers: {headers}." if headers else ""))
    out.append("")
    return "\n".join(out)


# -- mkdocs hooks -------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    from trivnc.api.blueprint import openapi_document

    for name in SIBLING_PAGES:
        if (HERE / name).is_file():
            files.append(
                File(
                    name,
                    src_dir=str(HERE),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
        # A missing page is left to mkdocs: the nav names it, and --strict fails.
    document = openapi_document()
    try:
        cli = cli_page()
    except ValueError as exc:
        raise PluginError(str(exc)) from None
    files.append(File.generated(config, "cli.md", content=cli))
    files.append(File.generated(config, "developer-api.md", content=api_page(document)))
    files.append(
        File.generated(config, "openapi.json", content=json.dumps(document, indent=2) + "\n")
    )
    return files

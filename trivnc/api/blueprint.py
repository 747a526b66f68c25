# KasmVNC's developer API (shared/reference/kasmvnc-developer-api.txt; what
# KasmVNC itself does is protocol.md B.10) as a Quart blueprint under /api.
#
# The blueprint speaks to the server only through `ApiBackend`, so an embedding
# application can mount it on its own QuartTrio app. Everything a request
# carries (credentials, query parameters, JSON bodies) is parsed here, strictly
# and with bounded sizes, so that no request can produce a 500: a refusal is an
# ApiError with a short reason, answered as text/plain.
#
# Where KasmVNC is weak, this does better (each place says why):
# - the client address is the socket's peer; X-Forwarded-For is never trusted;
# - booleans are exactly `true`/`false`, not any prefix of `true`;
# - an authenticated user without owner permission gets 403, not 401;
# - bulk POSTs are validated as a whole before anything changes.
from __future__ import annotations

import base64
import binascii
import inspect
import json
import math
import re
from typing import Any, Final, Literal

import quart
import trio
from quart import Blueprint, Response, request
from werkzeug.datastructures import MultiDict

from trivnc.api.backend import ApiBackend, ApiError, ApiUser, ApiUserChange, BulkUserBackend

__all__ = [
    "API_PREFIX",
    "BLUEPRINT_NAME",
    "api_blueprint",
    "authenticate",
    "openapi_document",
]

API_PREFIX: Final = "/api"
BLUEPRINT_NAME: Final = "trivnc_api"
REALM: Final = "trivnc"

# An Authorization header longer than this is not a credential anyone typed;
# refusing it early keeps base64 decoding bounded.
MAX_AUTHORIZATION_HEADER: Final = 4096
# Bulk user changes: KasmVNC has no limit; these are far above any real use
# and keep one request from holding a lot of memory or rewriting the users
# file for minutes.
MAX_BODY_BYTES: Final = 1 << 20
MAX_BULK_ENTRIES: Final = 1000
# Screenshot size bounds: larger than any real screen, small enough that a
# request cannot ask the backend for a multi-gigabyte scaling buffer.
MAX_SCREENSHOT_SIDE: Final = 16384
DEFAULT_SCREENSHOT_QUALITY: Final = 7
# A client selector longer than this cannot match any connection id.
MAX_CLIENT_SELECTOR: Final = 256
# Reasons may quote what the request sent; this keeps them short.
_MAX_QUOTED: Final = 64

_DIGITS = re.compile(r"[0-9]{1,5}")
_QUALITY = re.compile(r"[0-9]")
_BULK_KEYS: Final = {
    "create_user": frozenset({"user", "password", "read", "write", "owner"}),
    "update_user": frozenset({"user", "password", "read", "write", "owner"}),
    "remove_user": frozenset({"user"}),
}


# -- parsing what a request sends ---------------------------------------------------------


def parse_basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(username, password) from an `Authorization: Basic` header, or None for
    anything else: absent, another scheme, bad base64, not UTF-8 (RFC 7617's
    charset), no colon, empty user name or an overlong header."""
    if not header or len(header) > MAX_AUTHORIZATION_HEADER:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        # Header values reach us as latin-1 text; base64 is ASCII, so anything
        # else is garbage, not a credential.
        raw = base64.b64decode(token.strip().encode("ascii"), validate=True)
        text = raw.decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        return None
    username, colon, password = text.partition(":")
    if not colon or not username:
        return None
    return username, password


async def authenticate(
    backend: ApiBackend, username: str, password: str, peer: str
) -> ApiUser | None:
    """`backend.authenticate`, awaited if the backend's is async."""
    result = backend.authenticate(username, password, peer)
    if inspect.isawaitable(result):
        return await result
    return result


def _quote(value: str) -> str:
    shown = value if len(value) <= _MAX_QUOTED else value[:_MAX_QUOTED] + "..."
    return repr(shown)


def _single(args: MultiDict[str, str], key: str) -> str | None:
    # A repeated parameter is ambiguous (which one wins differs between
    # servers and proxies), so it is refused rather than guessed.
    values = args.getlist(key)
    if len(values) > 1:
        raise ApiError(400, f"{key} given more than once")
    return values[0] if values else None


def _required(args: MultiDict[str, str], key: str) -> str:
    value = _single(args, key)
    if value is None or value == "":
        raise ApiError(400, f"{key} is required")
    return value


def _bool_param(args: MultiDict[str, str], key: str) -> bool | None:
    # KasmVNC takes any prefix of "true" (so "t" and "" are true); exactly
    # true/false means a typo is an error instead of a silent permission.
    value = _single(args, key)
    if value is None:
        return None
    if value == "true":
        return True
    if value == "false":
        return False
    raise ApiError(400, f"{key} must be true or false")


def _side_param(args: MultiDict[str, str], key: str) -> int | None:
    value = _single(args, key)
    if value is None:
        return None
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_SCREENSHOT_SIDE:
        raise ApiError(400, f"{key} must be an integer from 1 to {MAX_SCREENSHOT_SIDE}")
    return int(value)


def _quality_param(args: MultiDict[str, str]) -> int:
    value = _single(args, "quality")
    if value is None:
        return DEFAULT_SCREENSHOT_QUALITY
    if not _QUALITY.fullmatch(value):
        raise ApiError(400, "quality must be an integer from 0 to 9")
    return int(value)


async def _read_body() -> bytes:
    """The request body, at most MAX_BODY_BYTES, read within the app's body
    timeout. Quart's own limit (16 MiB by default) is far above what a bulk
    user change needs, so the body is read chunk by chunk and cut off here."""
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise ApiError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    timeout = request.body_timeout if request.body_timeout is not None else math.inf
    with trio.move_on_after(timeout) as scope:
        async for chunk in request.body:
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if scope.cancelled_caught:
        raise ApiError(408, "request body not received in time")
    return bytes(body)


async def _read_bulk(kind: str) -> list[dict[str, Any]]:
    """The JSON list of a bulk user call, checked entry by entry: objects with
    only the keys `kind` allows, `user` a non-empty string, `password` a string,
    flags JSON booleans, no user listed twice."""
    raw = await _read_body()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers JSONDecodeError and over-long integers;
        # RecursionError a deeply nested document.
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(data, list):
        raise ApiError(400, "body must be a JSON list")
    if len(data) > MAX_BULK_ENTRIES:
        raise ApiError(400, f"at most {MAX_BULK_ENTRIES} entries per request")
    allowed = _BULK_KEYS[kind]
    seen: set[str] = set()
    for index, entry in enumerate(data):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ApiError(400, f"{where} is not an object")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            # A misspelt flag ("wirte") would otherwise be read as false.
            raise ApiError(400, f"{where}: unknown key {_quote(unknown[0])}")
        name = entry.get("user")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{where}: user must be a non-empty string")
        if name in seen:
            raise ApiError(400, f"{where}: user {_quote(name)} listed twice")
        seen.add(name)
        # null is not "no password": only a missing key leaves it unchanged.
        if "password" in entry and not isinstance(entry["password"], str):
            raise ApiError(400, f"{where}: password must be a string")
        if kind == "create_user" and "password" not in entry:
            raise ApiError(400, f"{where}: password is required")
        for flag in ("read", "write", "owner"):
            if flag in entry and not isinstance(entry[flag], bool):
                raise ApiError(400, f"{where}: {flag} must be true or false")
    return data


# -- answers ------------------------------------------------------------------------------


def _text(body: str, status: int = 200) -> Response:
    return Response(body, status=status, mimetype="text/plain")


def _json(value: object, status: int = 200) -> Response:
    # allow_nan=False: NaN is not JSON (KasmVNC emits it for an empty window);
    # a backend that produces it is a bug to find, not to pass on.
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return Response(text, status=status, mimetype="application/json")


def _challenge(reason: str) -> Response:
    response = _text(reason, 401)
    response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
    return response


def _current_user() -> ApiUser:
    user = quart.g.get("trivnc_api_user")
    if not isinstance(user, ApiUser):  # only reachable if a route skipped the guard
        raise RuntimeError("API route reached without an authenticated user")
    return user


def _user_json(user: ApiUser) -> dict[str, Any]:
    return {"user": user.name, "read": user.read, "write": user.write, "owner": user.owner}


# -- the blueprint ------------------------------------------------------------------------


def api_blueprint(backend: ApiBackend) -> Blueprint:
    """KasmVNC's developer API under /api, answering from `backend`.

    Every route needs HTTP Basic credentials of a user with owner permission.
    The app it is registered on must be a QuartTrio app (bodies are read with
    trio timeouts)."""
    bp = Blueprint(BLUEPRINT_NAME, __name__, url_prefix=API_PREFIX)

    @bp.before_request
    async def authorize() -> Response | None:
        # The socket's peer, never X-Forwarded-For: a header the client writes
        # would let it choose its own rate-limit bucket (KasmVNC trusts it).
        peer = request.remote_addr or "unknown"
        # Checked before the credentials are, so that a blocked client cannot
        # keep testing passwords and learn from a 200 which one was right.
        wait = backend.login_blocked(peer)
        if wait > 0:
            response = _text("too many failed logins; try again later", 429)
            # RFC 9110 §10.2.3: Retry-After is whole seconds.
            response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return response
        credentials = parse_basic_credentials(request.headers.get("Authorization"))
        if credentials is None:
            return _challenge("authentication required")
        user = await authenticate(backend, credentials[0], credentials[1], peer)
        if user is None:
            return _challenge("wrong user name or password")
        if not user.owner:
            # KasmVNC answers 401 here. 403 is what RFC 9110 §15.5.4 means:
            # the credentials are right but not enough. A 401 would make
            # browsers prompt again and scripts report a wrong password.
            return _text("owner permission required", 403)
        quart.g.trivnc_api_user = user
        return None

    @bp.after_request
    async def harden(response: Response) -> Response:
        # Answers carry screenshots, user lists and reasons that may quote the
        # request: no cache may keep them and no browser may sniff them as HTML.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @bp.errorhandler(ApiError)
    async def refuse(error: ApiError) -> Response:
        return _text(error.reason, error.status)

    @bp.get("/get_bottleneck_stats")
    async def get_bottleneck_stats() -> Response:
        return _json(backend.bottleneck_stats())

    @bp.get("/get_frame_stats")
    async def get_frame_stats() -> Response:
        client = _required(request.args, "client")
        if len(client) > MAX_CLIENT_SELECTOR:
            raise ApiError(400, "client is too long")
        return _json(await backend.frame_stats(client, _current_user().name))

    @bp.get("/get_screenshot")
    async def get_screenshot() -> Response:
        args = request.args
        width = _side_param(args, "width")
        height = _side_param(args, "height")
        quality = _quality_param(args)
        deduplicate = _bool_param(args, "deduplicate") or False
        jpeg = await backend.screenshot(width, height, quality, deduplicate)
        if jpeg is None:
            # The document says "return nothing"; KasmVNC sends a text/plain
            # hash with 200, which a client must sniff to tell from an image.
            # 204 says it in the status line, and its empty body is what a
            # client checking for a short non-JPEG answer sees as well.
            return Response(b"", status=204)
        return Response(jpeg, status=200, mimetype="image/jpeg")

    @bp.get("/send_full_frame")
    async def send_full_frame() -> Response:
        backend.send_full_frame()
        return _text("OK")

    @bp.get("/get_users")
    async def get_users() -> Response:
        return _json([_user_json(user) for user in backend.get_users()])

    @bp.get("/get_sessions")
    async def get_sessions() -> Response:
        sessions = [
            {
                "username": session.username,
                "connected_since": session.connected_since,
                "connection": session.connection_id,
            }
            for session in backend.get_sessions()
        ]
        return _json({"users": sessions})

    @bp.get("/create_user")
    async def create_user() -> Response:
        args = request.args
        name = _required(args, "name")
        password = _required(args, "password")
        flags = {flag: _bool_param(args, flag) or False for flag in ("read", "write", "owner")}
        # The single-user form refuses an existing name (as KasmVNC does), so
        # a typo cannot overwrite someone's password.
        backend.create_user(name, password, **flags, replace=False)
        return _text("OK")

    @bp.post("/create_user")
    async def create_users() -> Response:
        entries = await _read_bulk("create_user")
        if isinstance(backend, BulkUserBackend):
            # All or nothing, including what only the backend can check
            # (password rules): one transaction.
            _apply(backend, "create", entries)
            return _text("OK")
        # Everything that can be checked is checked above, and the backend
        # calls below are synchronous, so no other request interleaves.
        for entry in entries:
            backend.create_user(
                entry["user"],
                entry["password"],
                read=entry.get("read", False),
                write=entry.get("write", False),
                owner=entry.get("owner", False),
                replace=True,  # KasmVNC's bulk form inserts or replaces
            )
        return _text("OK")

    @bp.get("/update_user")
    async def update_user() -> Response:
        args = request.args
        name = _required(args, "name")
        # Only what is given changes; unlike KasmVNC, the password too.
        backend.update_user(
            name,
            password=_single(args, "password"),
            read=_bool_param(args, "read"),
            write=_bool_param(args, "write"),
            owner=_bool_param(args, "owner"),
        )
        return _text("OK")

    @bp.post("/update_user")
    async def update_users() -> Response:
        entries = await _read_bulk("update_user")
        _require_existing(backend, entries)
        if isinstance(backend, BulkUserBackend):
            _apply(backend, "update", entries)
            return _text("OK")
        for entry in entries:
            # The bulk form states each user's whole permission set (missing
            # flag = false, as KasmVNC), and the password only when given.
            backend.update_user(
                entry["user"],
                password=entry.get("password"),
                read=entry.get("read", False),
                write=entry.get("write", False),
                owner=entry.get("owner", False),
            )
        return _text("OK")

    @bp.get("/remove_user")
    async def remove_user() -> Response:
        backend.remove_user(_required(request.args, "name"))
        return _text("OK")

    @bp.post("/remove_user")
    async def remove_users() -> Response:
        entries = await _read_bulk("remove_user")
        _require_existing(backend, entries)
        if isinstance(backend, BulkUserBackend):
            _apply(backend, "remove", entries)
            return _text("OK")
        for entry in entries:
            backend.remove_user(entry["user"])
        return _text("OK")

    @bp.get("/openapi.json")
    async def openapi_json() -> Response:
        return _json(openapi_document())

    return bp


def _apply(
    backend: BulkUserBackend,
    action: Literal["create", "update", "remove"],
    entries: list[dict[str, Any]],
) -> None:
    """A checked bulk list (see _read_bulk) as one transaction; missing
    flags are false, as in KasmVNC."""
    backend.apply_user_changes(
        [
            ApiUserChange(
                action,
                entry["user"],
                entry.get("password"),
                read=entry.get("read", False),
                write=entry.get("write", False),
                owner=entry.get("owner", False),
            )
            for entry in entries
        ]
    )


def _require_existing(backend: ApiBackend, entries: list[dict[str, Any]]) -> None:
    # KasmVNC refuses the whole bulk update or removal if any user is unknown;
    # checking before the first change keeps it all or nothing.
    known = {user.name for user in backend.get_users()}
    for entry in entries:
        if entry["user"] not in known:
            raise ApiError(400, f"unknown user {_quote(entry['user'])}")


# -- the OpenAPI document -----------------------------------------------------------------
#
# Written by hand so that it says what the routes above do, including their
# refusals; tests/test_api.py checks that its paths and methods are exactly
# the blueprint's routes.


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _query(
    name: str, description: str, schema: dict[str, Any], *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


_BOOL = {"type": "string", "enum": ["true", "false"]}
_TEXT_OK = {
    "description": "Done.",
    "content": {"text/plain": {"schema": {"type": "string", "const": "OK"}}},
}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    every = {
        "401": _ref("responses", "Unauthorized"),
        "403": _ref("responses", "Forbidden"),
        "429": _ref("responses", "TooManyRequests"),
    }
    operation["responses"] = {**responses, **every}
    return operation


def _bulk_body(item: str, description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": f"{description} At most {MAX_BULK_ENTRIES} entries and "
        f"{MAX_BODY_BYTES} bytes; each user at most once. Validated as a whole "
        "before anything changes.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "maxItems": MAX_BULK_ENTRIES,
                    "items": _ref("schemas", item),
                }
            }
        },
    }


_BULK_RESPONSES = {
    "200": _TEXT_OK,
    "400": _ref("responses", "BadRequest"),
    "408": _ref("responses", "BodyTimeout"),
    "413": _ref("responses", "PayloadTooLarge"),
}
_CHANGE_RESPONSES = {"200": _TEXT_OK, "400": _ref("responses", "BadRequest")}


def _flag_schema(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route of `api_blueprint`."""
    p = API_PREFIX
    read = "Whether the user may watch the screen."
    write = "Whether the user may use keyboard, mouse and clipboard."
    owner = "Whether the user may call this API."

    def flag_params(missing: str) -> list[dict[str, Any]]:
        return [
            _query("read", f"{read} {missing}", _BOOL),
            _query("write", f"{write} {missing}", _BOOL),
            _query("owner", f"{owner} {missing}", _BOOL),
        ]

    side = {"type": "string", "pattern": "^[0-9]{1,5}$"}
    paths: dict[str, Any] = {
        f"{p}/get_bottleneck_stats": {
            "get": _operation(
                "CPU and network bottleneck scores of every connection (10 = no constraint).",
                {
                    "200": {
                        "description": "{user: {connection id: [cpu, cpu average, "
                        "network, network average]}}.",
                        "content": {
                            "application/json": {"schema": _ref("schemas", "BottleneckStats")}
                        },
                    }
                },
            )
        },
        f"{p}/get_frame_stats": {
            "get": _operation(
                "Timings of the next frame, server side and per selected client.",
                {
                    "200": {
                        "description": "The frame's statistics.",
                        "content": {"application/json": {"schema": _ref("schemas", "FrameStats")}},
                    },
                    "400": _ref("responses", "BadRequest"),
                },
                parameters=[
                    _query(
                        "client",
                        "auto (the caller's first connection), all, none (server side "
                        "only), or a part of a connection id.",
                        {"type": "string", "minLength": 1, "maxLength": MAX_CLIENT_SELECTOR},
                        required=True,
                    )
                ],
            )
        },
        f"{p}/get_screenshot": {
            "get": _operation(
                "A JPEG of the screen. A width and height off the screen's aspect ratio "
                "give the requested width, the height following the aspect ratio.",
                {
                    "200": {
                        "description": "The screenshot.",
                        "content": {
                            "image/jpeg": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    "204": {
                        "description": "deduplicate=true and the screen has not changed "
                        "since the previous screenshot (KasmVNC answers 200 with a hash)."
                    },
                    "400": _ref("responses", "BadRequest"),
                },
                parameters=[
                    _query(
                        "width",
                        f"Width in pixels, 1-{MAX_SCREENSHOT_SIDE}; default the screen's.",
                        side,
                    ),
                    _query(
                        "height",
                        f"Height in pixels, 1-{MAX_SCREENSHOT_SIDE}; default the screen's.",
                        side,
                    ),
                    _query(
                        "quality",
                        "JPEG quality level 0-9 (Tight's scale); default "
                        f"{DEFAULT_SCREENSHOT_QUALITY}.",
                        {"type": "string", "pattern": "^[0-9]$"},
                    ),
                    _query(
                        "deduplicate",
                        "true: answer 204 if the screen has not changed since the "
                        "previous screenshot. Default false.",
                        _BOOL,
                    ),
                ],
            )
        },
        f"{p}/send_full_frame": {
            "get": _operation(
                "Every viewer with read permission receives the whole screen.",
                {"200": _TEXT_OK},
            )
        },
        f"{p}/create_user": {
            "get": _operation(
                "Add a user; refused if the name exists.",
                _CHANGE_RESPONSES,
                parameters=[
                    _query("name", "The new user's name.", {"type": "string"}, required=True),
                    _query("password", "Their password.", {"type": "string"}, required=True),
                    *flag_params("Default false."),
                ],
            ),
            "post": _operation(
                "Add or replace several users.",
                _BULK_RESPONSES,
                body=_bulk_body("UserCreate", "Users to add; an existing user is replaced."),
            ),
        },
        f"{p}/update_user": {
            "get": _operation(
                "Change one user: only the flags given, and the password if given.",
                _CHANGE_RESPONSES,
                parameters=[
                    _query("name", "An existing user's name.", {"type": "string"}, required=True),
                    _query("password", "New password (optional).", {"type": "string"}),
                    *flag_params("Unchanged if absent."),
                ],
            ),
            "post": _operation(
                "Set the permissions (a missing flag is false) and, if given, the password "
                "of several users; refused unless every user exists.",
                _BULK_RESPONSES,
                body=_bulk_body("UserUpdate", "Users to change."),
            ),
        },
        f"{p}/remove_user": {
            "get": _operation(
                "Remove a user; their open connections end.",
                _CHANGE_RESPONSES,
                parameters=[
                    _query("name", "An existing user's name.", {"type": "string"}, required=True)
                ],
            ),
            "post": _operation(
                "Remove several users; refused unless every user exists.",
                _BULK_RESPONSES,
                body=_bulk_body("UserRemove", "Users to remove."),
            ),
        },
        f"{p}/get_users": {
            "get": _operation(
                "Every user and their permissions.",
                {
                    "200": {
                        "description": "The users.",
                        "content": {
                            "application/json": {
                                "schema": {"type": "array", "items": _ref("schemas", "User")}
                            }
                        },
                    }
                },
            )
        },
        f"{p}/get_sessions": {
            "get": _operation(
                "Every open viewer connection.",
                {
                    "200": {
                        "description": "The connections.",
                        "content": {"application/json": {"schema": _ref("schemas", "Sessions")}},
                    }
                },
            )
        },
        f"{p}/openapi.json": {
            "get": _operation(
                "This document.",
                {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            )
        },
    }
    user_name = {"type": "string", "minLength": 1}
    flags = {
        "read": _flag_schema(read),
        "write": _flag_schema(write),
        "owner": _flag_schema(owner),
    }
    schemas: dict[str, Any] = {
        "User": {
            "type": "object",
            "required": ["user", "read", "write", "owner"],
            "properties": {"user": {"type": "string"}, **flags},
        },
        "UserCreate": {
            "type": "object",
            "required": ["user", "password"],
            "additionalProperties": False,
            "properties": {"user": user_name, "password": {"type": "string"}, **flags},
        },
        "UserUpdate": {
            "type": "object",
            "required": ["user"],
            "additionalProperties": False,
            "properties": {"user": user_name, "password": {"type": "string"}, **flags},
        },
        "UserRemove": {
            "type": "object",
            "required": ["user"],
            "additionalProperties": False,
            "properties": {"user": user_name},
        },
        "BottleneckStats": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": {
                    "type": "array",
                    "minItems": 4,
                    "maxItems": 4,
                    "items": {"type": "number"},
                },
            },
        },
        "FrameStats": {
            "type": "object",
            "required": ["frame", "server_side", "client_side"],
            "properties": {
                "frame": {
                    "type": "object",
                    "properties": {
                        "resx": {"type": "integer"},
                        "resy": {"type": "integer"},
                        "changed": {"type": "number", "description": "Percent changed."},
                        "server_time": {"type": "number", "description": "Wall clock, ms."},
                    },
                },
                "server_side": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["process_name", "time"],
                        "properties": {
                            "process_name": {"type": "string"},
                            "time": {"type": "number"},
                            "count": {"type": "integer"},
                            "area": {"type": "integer"},
                            "videoscaling": {"type": "number"},
                        },
                    },
                },
                "client_side": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "client": {"type": "string"},
                            "client_time": {"type": "number"},
                            "ping": {"type": "number"},
                            "processes": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "process_name": {"type": "string"},
                                        "time": {"type": "number"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
        "Sessions": {
            "type": "object",
            "required": ["users"],
            "properties": {
                "users": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["username", "connected_since", "connection"],
                        "properties": {
                            "username": {"type": "string"},
                            "connected_since": {
                                "type": "number",
                                "description": "Unix time, seconds.",
                            },
                            "connection": {
                                "type": "string",
                                "description": "Connection id, as in the bottleneck stats.",
                            },
                        },
                    },
                }
            },
        },
    }
    reason = {"text/plain": {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {
        "BadRequest": {
            "description": "A bad parameter, body or user; the reason.",
            "content": reason,
        },
        "Unauthorized": {
            "description": "No, malformed or wrong credentials.",
            "headers": {
                "WWW-Authenticate": {
                    "schema": {"type": "string"},
                    "description": f'Basic realm="{REALM}", charset="UTF-8"',
                }
            },
            "content": reason,
        },
        "Forbidden": {
            "description": "The credentials are right but the user is not an owner "
            "(KasmVNC answers 401).",
            "content": reason,
        },
        "TooManyRequests": {
            "description": "Too many failed logins from this address.",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
            "content": reason,
        },
        "PayloadTooLarge": {"description": f"Body over {MAX_BODY_BYTES} bytes.", "content": reason},
        "BodyTimeout": {"description": "The body did not arrive in time.", "content": reason},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trivnc developer API",
            "version": "1",
            "description": "KasmVNC's developer API as trivnc serves it. Every call needs "
            "HTTP Basic credentials of a user with owner permission.",
        },
        "security": [{"basic": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "schemas": schemas,
            "responses": responses,
        },
    }

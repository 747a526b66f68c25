"""trivnc's developer API inside an application's own Quart-Trio app.

The program serves a desktop (a numpy `ArraySource`) to VNC viewers and runs
its own web app, which has routes of its own (``/`` and ``/paint``) and, under
``/api``, KasmVNC's developer API as trivnc implements it: the blueprint from
``trivnc.api.api_blueprint`` with a backend over the running server.

::

    python docs/examples/quart_blueprint.py --users /tmp/example-users
    curl http://127.0.0.1:PORT/paint?colour=ff8000
    curl -u owner:PASSWORD http://127.0.0.1:PORT/api/get_users

The API needs HTTP Basic credentials of a user with owner permission from a
users file in KasmVNC's format; when the file does not exist, trivnc creates
it with a user ``owner`` and a random password, printed once. The example
serves plain HTTP on the loopback address to stay short; a program reachable
from other machines gives hypercorn a certificate (``certfile``/``keyfile``).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request
from quart_trio import QuartTrio

import trivnc
from trivnc.api import api_blueprint
from trivnc.sources.array import ArraySource

WIDTH, HEIGHT = 320, 240
COLOUR = re.compile(r"[0-9a-fA-F]{6}")


def create_app(server: trivnc.Server, source: ArraySource) -> QuartTrio:
    """The application's own app, with trivnc's API mounted under /api."""
    app = QuartTrio(__name__)
    app.register_blueprint(api_blueprint(server.api_backend()))

    @app.route("/")
    async def index() -> Response:
        width, height = source.size
        text = (
            f"My application. Its desktop is {width}x{height}, "
            f"{len(server.sessions)} viewer(s) connected.\n"
            "GET /paint?colour=RRGGBB fills it; /api/* is trivnc's developer API.\n"
        )
        return Response(text, mimetype="text/plain")

    @app.route("/paint")
    async def paint() -> Response:
        colour = request.args.get("colour", "")
        if not COLOUR.fullmatch(colour):
            return Response("colour must be RRGGBB in hex\n", 400, mimetype="text/plain")
        rgb = tuple(int(colour[i : i + 2], 16) for i in (0, 2, 4))
        with source.lock:
            source.rgb = rgb
        source.mark_changed()
        return Response("OK\n", mimetype="text/plain")

    return app


async def main(port: int, web_port: int, users: Path | None, seconds: float | None) -> None:
    source = ArraySource(WIDTH, HEIGHT, name="quart example")
    source.rgb = (0, 96, 160)
    source.mark_changed()
    config = trivnc.Config(
        source=source,
        listen=["127.0.0.1"],
        rfb_port=port,
        # trivnc's own web port stays off: the application serves the API.
        web_port=None,
        insecure_no_auth=True,
        # A users file makes trivnc load users (and create the file on first
        # use), which the API needs even though its own web port is off.
        users_file=users or Path.home() / ".kasmpasswd",
    )
    with trio.move_on_after(seconds if seconds is not None else math.inf):
        async with trio.open_nursery() as nursery:
            server: trivnc.Server = await nursery.start(trivnc.serve, config)
            host, bound = server.rfb_addresses[0]
            print(f"quart_blueprint: VNC viewers connect to {host}::{bound}", flush=True)
            if server.initial_credentials is not None:
                path, name, password = server.initial_credentials
                print(
                    f"quart_blueprint: created {path}: user {name} password {password}", flush=True
                )

            web = HypercornConfig()
            web.bind = [f"127.0.0.1:{web_port}"]
            web.accesslog = None
            app = create_app(server, source)
            urls: list[str] = await nursery.start(hypercorn_serve, app, web)
            print(f"quart_blueprint: the application's web app is at {urls[0]}/", flush=True)
    print("quart_blueprint: stopped", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="trivnc's API in an application's own app.")
    parser.add_argument("--port", type=int, default=0, help="RFB port (default: free)")
    parser.add_argument("--web-port", type=int, default=0, help="HTTP port (default: free)")
    parser.add_argument("--users", type=Path, help="users file (default ~/.kasmpasswd)")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    trio.run(main, args.port, args.web_port, args.users, args.seconds)

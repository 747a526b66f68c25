"""The server: sessions, the encoding scheduler, listeners."""

from __future__ import annotations

from .server import Server as Server
from .server import ServerContext as ServerContext
from .server import serve as serve
from .session import ClientSession as ClientSession

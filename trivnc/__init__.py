"""trivnc: a VNC server library on trio.

Embed it in a trio program::

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trivnc.serve, trivnc.Config(source=source, rfb_port=0))
        print(server.rfb_addresses)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config as Config
from .config import ConfigError as ConfigError
from .server import Server as Server
from .server import serve as serve
from .sources.base import Damage as Damage
from .sources.base import Source as Source

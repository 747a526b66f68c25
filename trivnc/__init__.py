"""trivnc: a VNC server library on trio.

Embed it in a trio program::

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trivnc.serve, trivnc.Config(source=source, rfb_port=0))
        print(server.rfb_addresses)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Config as Config
    from .config import ConfigError as ConfigError
    from .server import Server as Server
    from .server import serve as serve
    from .sources.base import Damage as Damage
    from .sources.base import Source as Source

# Imported on first use: pytest loads the plugin in trivnc.testing for every
# test run once trivnc is installed, and the server's imports (numpy, TLS,
# the codecs) must not slow down suites that never use it.
_EXPORTS = {
    "Config": ".config",
    "ConfigError": ".config",
    "Server": ".server",
    "serve": ".server",
    "Damage": ".sources.base",
    "Source": ".sources.base",
}
__all__ = ["Config", "ConfigError", "Damage", "Server", "Source", "__version__", "serve"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trivnc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

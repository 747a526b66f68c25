"""trivnc: a VNC server library on trio."""
from __future__ import annotations

__version__ = "0.1.0"

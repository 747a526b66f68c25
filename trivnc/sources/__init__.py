"""Pixel sources: the built-in demo desktop, an application's numpy array, X11."""
from __future__ import annotations

from .base import Damage as Damage
from .base import Pixels as Pixels
from .base import Source as Source

"""Pixel sources: the built-in demo desktop, an application's numpy array, X11."""

from __future__ import annotations

from .array import ArraySource as ArraySource
from .array import ClipboardInput as ClipboardInput
from .array import InputEvent as InputEvent
from .array import KeyInput as KeyInput
from .array import PointerInput as PointerInput
from .array import ResizeRequest as ResizeRequest
from .array import ScrollInput as ScrollInput
from .base import Damage as Damage
from .base import Pixels as Pixels
from .base import Source as Source
from .demo import DemoSource as DemoSource

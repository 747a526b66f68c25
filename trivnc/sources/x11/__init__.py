"""X11 desktops: shared-memory capture, XDamage, RandR resize, and an Xvfb
launcher. Input, clipboard and cursor helpers live beside them."""

from __future__ import annotations

from .shm import CaptureError as CaptureError
from .shm import DisplayGone as DisplayGone
from .source import X11Source as X11Source
from .xvfb import XvfbDesktop as XvfbDesktop
from .xvfb import XvfbError as XvfbError

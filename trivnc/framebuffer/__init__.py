"""The framebuffer service: frames, versions, damage, timing spans."""

from __future__ import annotations

from .damage import TILE as TILE
from .damage import changed_tiles as changed_tiles
from .damage import mask_to_rects as mask_to_rects
from .service import Frame as Frame
from .service import FramebufferService as FramebufferService
from .timing import FrameTiming as FrameTiming

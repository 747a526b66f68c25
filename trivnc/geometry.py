# Rectangles in framebuffer coordinates. Shared by the protocol core (update
# requests), the framebuffer service (damage) and the encoders (rect splits).
from __future__ import annotations

from typing import NamedTuple


class Rect(NamedTuple):
    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    def is_empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    def intersect(self, other: Rect) -> Rect:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1, y1 = min(self.right, other.right), min(self.bottom, other.bottom)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    def union(self, other: Rect) -> Rect:
        """The bounding box of both (an empty rect contributes nothing)."""
        if self.is_empty():
            return other
        if other.is_empty():
            return self
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        x1, y1 = max(self.right, other.right), max(self.bottom, other.bottom)
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def contains(self, other: Rect) -> bool:
        """Whether every pixel of `other` lies in this rect."""
        return (
            self.x <= other.x
            and self.y <= other.y
            and other.right <= self.right
            and other.bottom <= self.bottom
        )

    def slices(self) -> tuple[slice, slice]:
        """Numpy index of this rect in an (h, w, ...) array."""
        return slice(self.y, self.bottom), slice(self.x, self.right)

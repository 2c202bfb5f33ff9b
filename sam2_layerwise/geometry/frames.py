"""Original-image pixels <-> square model-input pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class ImageFrame:
    """The resize SAM 2 applies: (orig_w, orig_h) -> (image_size, image_size), aspect ratio not kept."""

    orig_w: int
    orig_h: int
    image_size: int

    @property
    def sx(self) -> float:
        """Input pixels per original pixel along x."""
        return self.image_size / self.orig_w

    @property
    def sy(self) -> float:
        return self.image_size / self.orig_h

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original (x, y) -> input (x, y); the same scaling SAM2Transforms.transform_coords applies."""
        return x * self.sx, y * self.sy

    def token_at(self, x: float, y: float, grid_h: int, grid_w: int) -> tuple[int, int]:
        """Original (x, y) -> (row, col) of the token covering it on a grid_h x grid_w token grid.

        Exact: col = floor(x · grid_w / orig_w) in rational arithmetic. (The resize scales x by
        image_size / orig_w and a token covers image_size / grid_w input pixels; rounding a ratio first put a
        click on a token boundary, x = 49 of 98 pixels, in the token before it.)"""
        col = math.floor(Fraction(x) * grid_w / self.orig_w)
        row = math.floor(Fraction(y) * grid_h / self.orig_h)
        return min(max(row, 0), grid_h - 1), min(max(col, 0), grid_w - 1)

    def token_box(self, row: int, col: int, grid_h: int, grid_w: int) -> list[float]:
        """Pixel box [x0, y0, x1, y1) in original pixels covered by token (row, col) of a grid: each edge is
        the nearest float to its exact value (one rounding), so a click on an edge lies in the box `token_at`
        gives it."""
        w, h = self.orig_w, self.orig_h
        return [col * w / grid_w, row * h / grid_h, (col + 1) * w / grid_w, (row + 1) * h / grid_h]

    def to_dict(self) -> dict:
        return {"orig_w": self.orig_w, "orig_h": self.orig_h, "image_size": self.image_size}

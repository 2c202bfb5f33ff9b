"""Original-image pixels <-> square model-input pixels."""

from __future__ import annotations

from dataclasses import dataclass


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

    def to_original_box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        """An input-frame box [x0, y0, x1, y1) -> the same box in original pixels."""
        return [x0 / self.sx, y0 / self.sy, x1 / self.sx, y1 / self.sy]

    def token_at(self, x: float, y: float, grid_h: int, grid_w: int) -> tuple[int, int]:
        """Original (x, y) -> (row, col) of the token covering it on a grid_h x grid_w token grid."""
        xi, yi = self.to_input(x, y)
        col = int(xi * grid_w // self.image_size)
        row = int(yi * grid_h // self.image_size)
        return min(max(row, 0), grid_h - 1), min(max(col, 0), grid_w - 1)

    def token_box(self, row: int, col: int, grid_h: int, grid_w: int) -> list[float]:
        """Pixel box [x0, y0, x1, y1) in original pixels covered by token (row, col) of a grid."""
        sh, sw = self.image_size / grid_h, self.image_size / grid_w
        return self.to_original_box(col * sw, row * sh, (col + 1) * sw, (row + 1) * sh)

    def to_dict(self) -> dict:
        return {"orig_w": self.orig_w, "orig_h": self.orig_h, "image_size": self.image_size}

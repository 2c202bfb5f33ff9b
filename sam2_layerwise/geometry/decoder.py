"""Mask-decoder token roles and the decoder's image-token grid."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GridGeometry:
    """A plain row-major token grid (decoder / memory attention image tokens), no windows."""

    grid_h: int
    grid_w: int

    def cell(self, index: int) -> tuple[int, int]:
        return divmod(index, self.grid_w)

    def index(self, row: int, col: int) -> int:
        return row * self.grid_w + col

    def to_dict(self) -> dict:
        return {"grid_hw": [self.grid_h, self.grid_w], "order": "row-major"}


@dataclass(frozen=True)
class DecoderTokenLayout:
    """Token order of SAM 2's two-way transformer: output tokens, then sparse prompt tokens.

    `SAM2ImagePredictor` puts box corners before points and always lets the prompt encoder append one
    padding ("not a point") token, because it passes boxes as points. On video frames without prompts SAM 2
    feeds one empty point (label -1) instead: `num_no_points` of them, role `no_point`.
    """

    has_obj_score: bool
    num_mask_tokens: int
    num_box_corners: int
    num_points: int
    padding: bool = True
    num_no_points: int = 0

    @property
    def roles(self) -> list[str]:
        roles = ["obj_score"] if self.has_obj_score else []
        roles += ["iou"] + [f"mask{i}" for i in range(self.num_mask_tokens)]
        roles += [f"box_corner{i}" for i in range(self.num_box_corners)]
        roles += [f"point{i}" for i in range(self.num_points)]
        roles += ["no_point"] * self.num_no_points
        if self.padding:
            roles.append("padding")
        return roles

    def priority(self) -> list[int]:
        """Token indices in the order queries are chosen: clicks first, then masks, IoU, obj-score, box, pad."""
        roles = self.roles
        order = [r for r in roles if r.startswith("point")]
        order += [r for r in roles if r.startswith("mask")]
        order += [r for r in ("iou", "obj_score") if r in roles]
        order += [r for r in roles if r.startswith("box_corner")]
        rest = [i for i, r in enumerate(roles) if r in ("no_point", "padding")]
        return [roles.index(r) for r in order] + rest

    def to_dict(self) -> dict:
        return {"roles": self.roles}

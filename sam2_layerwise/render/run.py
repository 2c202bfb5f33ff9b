"""Render a capture into its run directory: attention images, overlays, top-k lists.

Two sources, one path: a live `ImageCapture` (the `visualize` command's `before_summary` hook) and a saved
run (`render.saved`, the `render` command). Both become `RecordView`s, then maps, then files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from sam2_layerwise.geometry import ImageFrame
from sam2_layerwise.render.attention import RenderOptions, RenderResult, render_maps
from sam2_layerwise.render.maps import MapOptions, RecordView, build_maps
from sam2_layerwise.render.topk import write_topk

log = logging.getLogger("sam2_layerwise")


@dataclass(frozen=True)
class RenderPlan:
    """Everything one rendering pass does; `to_dict` goes into the summary as `render`."""

    draw: RenderOptions
    maps: MapOptions
    topk: int = 0
    topk_symlink: bool = False

    @property
    def active(self) -> bool:
        return self.draw.images or self.draw.overlays

    def to_dict(self) -> dict:
        maps = dict(self.maps.__dict__)  # max_queries None: the saved queries plus the extra query places
        return {**self.draw.to_dict(), **maps, "topk": self.topk, "topk_symlink": self.topk_symlink}


def render_views(views: list[RecordView], photo: np.ndarray | None, frame: ImageFrame, plan: RenderPlan, writer, *,
                 prompts=None, extra_locations=None) -> tuple[RenderResult, dict]:
    """Draw every view's maps and the top-k lists into `writer`. Returns (result, summary `files` entries)."""
    t0 = time.perf_counter()
    maps = [m for v in views for m in build_maps(v, frame, plan.maps, prompts=prompts, extra_locations=extra_locations)]
    result = render_maps(maps, photo, plan.draw, writer)
    files = dict(result.files)
    files.update(write_topk(result.rendered, plan.topk, writer, symlink=plan.topk_symlink))
    log.info("drew %d attention maps (%d images, %d overlays) in %.1f s", len(result.rendered),
             sum(r.image is not None for r in result.rendered), sum(r.overlay is not None for r in result.rendered),
             time.perf_counter() - t0)
    return result, files


def render_capture(writer, cap, photo: np.ndarray, plan: RenderPlan) -> dict:
    """The `before_summary` hook body for a live capture: renders, adds each record's pictures to its
    `files`, returns the run's `files` entries."""
    if not plan.active:
        return {}
    result, files = render_views([RecordView.from_record(r) for r in cap.attention], photo, cap.frame, plan, writer,
                                 prompts=cap.prompts)
    per_record = result.by_record()
    for record in cap.attention:
        record.files.update(per_record.get((record.layer_key, record.call_index), {}))
    return files

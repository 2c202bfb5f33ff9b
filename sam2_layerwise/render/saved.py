"""Re-render a saved run without the model: a different colormap, overlays, more queries from saved q/k.

Reads `layerwise_summary.json`, the saved attention tensors (`*__attn.pt`, `*__qkv.pt`, loaded with
`weights_only=True`) and the photograph the summary names. Rewrites the run's pictures: `attn_images/`,
`attn_overlays/` and `attn_topk/` are replaced by what this pass draws (folders it does not draw are removed,
so nothing stale points at old pictures), and the summary records the new files and options. Tensors and
predictions are left as they are.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam2_layerwise.capture.attention import attention_probs
from sam2_layerwise.errors import InputError
from sam2_layerwise.geometry import ImageFrame
from sam2_layerwise.inputs import Point, Prompts, load_image
from sam2_layerwise.render.maps import RecordView, probs_transformed
from sam2_layerwise.render.run import RenderPlan, render_views
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_write_json, safe_load
from sam2_layerwise.store.layout import RunWriter
from sam2_layerwise.store.summary import SCHEMA

log = logging.getLogger("sam2_layerwise")

RENDER_DIRS = (layout.ATTN_IMAGES, layout.ATTN_OVERLAYS, layout.ATTN_TOPK)


@dataclass
class SavedRun:
    """A run directory as rendering needs it."""

    run_dir: Path
    summary: dict
    frame: ImageFrame
    prompts: Prompts
    locations: list[tuple[str, float, float]]
    image_path: Path | None


def open_run(run_dir: str | Path, flag: str = "--run-dir") -> SavedRun:
    """Check that `run_dir` is a sam2-layerwise run directory and read its summary."""
    p = Path(run_dir).expanduser()
    if not p.is_dir():
        raise InputError("is not a directory", flag=flag, value=str(run_dir))
    summary_path = p / layout.SUMMARY
    if not summary_path.is_file():
        raise InputError(f"is not a run directory (no {layout.SUMMARY}; make one with 'sam2-layerwise visualize')",
                         flag=flag, value=str(run_dir))
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {layout.SUMMARY}: {exc}", flag=flag, value=str(run_dir)) from None
    if not isinstance(summary, dict) or summary.get("schema") != SCHEMA or "attention" not in summary:
        raise InputError(f"{layout.SUMMARY} is not a sam2-layerwise summary", flag=flag, value=str(run_dir))
    fr = summary.get("frame") or {}
    pr = summary.get("prompts") or {}
    prompts = Prompts(points=[Point(float(x), float(y), int(lab)) for x, y, lab in pr.get("points") or []],
                      box=tuple(pr["box"]) if pr.get("box") else None,
                      queries=[tuple(q) for q in pr.get("queries") or []])
    locations = [(d["label"], float(d["x"]), float(d["y"])) for d in summary.get("query_locations") or []]
    image_path = (summary.get("image") or {}).get("path")
    return SavedRun(run_dir=p, summary=summary, frame=ImageFrame(int(fr["orig_w"]), int(fr["orig_h"]), int(fr["image_size"])),
                    prompts=prompts, locations=locations, image_path=Path(image_path) if image_path else None)


def load_photo(run: SavedRun, override: str | None = None) -> np.ndarray:
    """The photograph the run was captured on (or `--image`), checked against the run's size."""
    if override is None and (run.image_path is None or not run.image_path.is_file()):
        raise InputError(f"the photograph this run names is missing ({run.image_path}); pass --image PATH",
                         flag="--image")
    path = Path(override) if override is not None else run.image_path
    photo = load_image(path, flag="--image")
    h, w = photo.shape[:2]
    if (w, h) != (run.frame.orig_w, run.frame.orig_h):
        raise InputError(f"is {w}x{h}; the run was captured on a {run.frame.orig_w}x{run.frame.orig_h} image",
                         flag="--image", value=str(path))
    return photo


def _stem(entry: dict) -> str:
    """The record's file stem, as the summary stores it (older summaries: derived the way records do)."""
    if entry.get("file_stem"):
        return entry["file_stem"]
    return entry["layer_key"] if not entry.get("call_index") else f"{entry['layer_key']}__call{entry['call_index']}"


def saved_views(run: SavedRun) -> list[RecordView]:
    """A RecordView per attention call whose tensors were saved (`--save-attn` and/or `--save-qkv`).

    Probabilities come from `__attn.pt` (exact, possibly key-pooled); without it they are recomputed from
    `__qkv.pt` by `attention_probs`, the capture's own recomputation.
    """
    views = []
    limit = (run.summary.get("capture_options") or {}).get("max_attn_queries")
    for entry in run.summary["attention"]:
        files = entry.get("files") or {}
        attn = safe_load(run.run_dir / files["attn"]) if files.get("attn") else None
        qkv = safe_load(run.run_dir / files["qkv"]) if files.get("qkv") else None
        if attn is None and qkv is None:
            continue
        queries = (attn or qkv).get("queries") or entry["queries"]
        if attn is not None:
            probs, pooling = attn["probs"], attn.get("key_pooling")
        else:
            groups = list(qkv["groups"])
            rows = []
            for q in queries:
                gi = groups.index(q["group"])
                qv = qkv["q"][gi][:, q["index"]:q["index"] + 1]  # [heads, 1, d]
                rows.append(attention_probs(qv, qkv["k"][gi], float(qkv["scale"]))[:, 0])  # [heads, K]
            probs = torch.stack(rows) if rows else torch.zeros((0, entry["heads"], entry["keys_per_group"]))
            pooling = None
        views.append(RecordView(layer_key=entry["layer_key"], kind=entry["kind"], call_index=entry.get("call_index", 0),
                                stem=_stem(entry), heads=entry["heads"], geometry=entry["geometry"], queries=queries,
                                probs=probs, key_pooling=pooling, qkv=qkv,
                                probs_transformed=probs_transformed(entry.get("quant")), recomputed=attn is None,
                                query_limit=int(limit) if limit is not None else None))
    return views


def rerender_writer(run_dir: Path) -> RunWriter:
    """A RunWriter that owns only the pictures (`attn_images/`, `attn_overlays/`, `attn_topk/`) and the summary:
    the run's tensors and predictions stay; picture folders this pass did not draw are removed with the old
    summary, so no top-k link points at an old picture."""
    return RunWriter(run_dir, owned=(layout.SUMMARY, *RENDER_DIRS), flag="--run-dir")


def rerender(run: SavedRun, photo: np.ndarray | None, plan: RenderPlan, *, extra_points=()) -> dict:
    """Draw the saved run again into its own directory; returns the updated summary."""
    views = saved_views(run)
    if not views:
        raise InputError("holds no saved attention tensors (capture with --save-attn and/or --save-qkv)",
                         flag="--run-dir", value=str(run.run_dir))
    extra = [(f"extra{i}", float(x), float(y)) for i, (x, y) in enumerate(extra_points)]
    # without --max-attn-queries: the saved queries plus the extra points, not the run's uncaptured places
    locations = (run.locations if plan.maps.max_queries is not None else []) + extra
    summary = run.summary
    with rerender_writer(run.run_dir) as writer:
        result, files = render_views(views, photo, run.frame, plan, writer, prompts=run.prompts,
                                     extra_locations=locations)
        for key in (*RENDER_DIRS, "attn_topk_links"):
            summary.setdefault("files", {}).pop(key, None)
        summary["files"].update(files)
        per_record = result.by_record()
        for entry in summary["attention"]:
            ef = entry.setdefault("files", {})
            ef.pop(layout.ATTN_IMAGES, None)
            ef.pop(layout.ATTN_OVERLAYS, None)
            ef.update(per_record.get((entry["layer_key"], entry.get("call_index", 0)), {}))
        summary["render"] = {**plan.to_dict(), "command": "render", "skipped_calls_without_tensors":
                             len(summary["attention"]) - len(views)}
        atomic_write_json(summary, writer.path(layout.SUMMARY))
    return summary

"""The sweep page: the aggregated layer x head heatmap; clicking a head lists the items where it changed most;
the layers (Spearman's rho: correlational) and the attribution units (causal).

One page, two ways to open it, one template and one script (`viewer/static/sweep.html`, `sweep.js`,
`sweep.css`):
- `sweep/index.html`, written by the aggregation: self-contained (script, styles and data inline), opens from
  disk with no server; it holds the ten items per head and ranking metric that changed most;
- `sam2-layerwise view OUT` (viewer/server.py): the same page, its script and styles served as files, its data
  read from the sweep's tables by the server (checked, untrusted) and the items asked for per click, so any
  number of items per head can be listed and each kept run (`--keep-runs`) opens in the viewer.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import pandas as pd

# Heatmap metrics: (column of sweep/heads.parquet, label, the per-item metric its items are ranked by).
METRICS = (("js_mean_mean", "mean JS, mean over items (bits)", "js_mean"),
           ("js_mean_p95", "mean JS, 95th percentile over items (bits)", "js_mean"),
           ("js_max_mean", "max JS, mean over items (bits)", "js_max"),
           ("out_rel_err_mean", "attention output relative error, mean over items", "out_rel_err"),
           ("entropy_norm_delta_mean", "Δ normalised entropy (Q − FP), mean over items", "entropy_norm_delta"),
           ("topk_overlap_mean", "top-k overlap, mean over items", "topk_overlap"))
ITEM_LABELS = {"js_mean": "mean JS (bits)", "js_max": "max JS (bits)", "out_rel_err": "output rel. error",
               "entropy_norm_delta": "Δ normalised entropy", "topk_overlap": "top-k overlap"}
TEXT_LIMIT = 300  # characters of a name or path shown on the page


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _text(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)[:TEXT_LIMIT]


def _row(r: dict) -> dict:
    return {k: (_num(v) if isinstance(v, float) else _text(v) if isinstance(v, str) else v) for k, v in r.items()}


def item_meta(items: pd.DataFrame, runs: dict[int, str]) -> dict[str, dict]:
    """item -> what the item list shows: image file name, prompt, points, box, the item's FP vs Q mask IoU and
    ground-truth IoUs, and its kept run's link (or None)."""
    out = {}
    for r in items.itertuples(index=False):
        out[str(int(r.item))] = {"image": _text(str(r.image).rsplit("/", 1)[-1]), "prompt": _text(r.prompt),
                                 "points": _text(r.points), "box": _text(r.box), "iou": _num(r.iou),
                                 "gt_iou_fp": _num(r.gt_iou_fp), "gt_iou_q": _num(r.gt_iou_q),
                                 "run": runs.get(int(r.item))}
    return out


def top_rows(top: dict[str, list[dict]]) -> dict[str, list[list]]:
    """aggregate.top_items' entries -> [[item, value], ...] per head (the item's details are in item_meta)."""
    return {k: [[e["item"], _num(e["value"])] for e in entries] for k, entries in top.items()}


def page_data(hs: pd.DataFrame, ls: pd.DataFrame, at: pd.DataFrame, summary: dict, *, served: bool,
              heads: pd.DataFrame | None = None, items: pd.DataFrame | None = None,
              runs: dict[int, str] | None = None) -> dict:
    """What the page draws, as plain JSON data. From disk (`served` False) it also holds the items of every
    head (`heads`: heads.parquet of the ok items, `items`: those items); served, the page asks for them."""
    from sam2_layerwise.sweep.aggregate import CHANGE, top_items

    layers = [{"key": f"{r.layer_key}#{r.call_index}", "layer_key": _text(r.layer_key), "call": int(r.call_index),
               "label": _text(r.layer)}
              for r in hs[["layer_key", "call_index", "layer", "order"]].drop_duplicates().itertuples()]
    metrics = [[m, label, item] for m, label, item in METRICS if m in hs and hs[m].notna().any()]
    cells = {m: {f"{r.layer_key}#{r.call_index}#{r.head}": _num(getattr(r, m)) for r in hs.itertuples()}
             for m, _, _ in metrics}
    n = summary["items"]
    subtitle = (f"{n['ok']} items measured ({n['failed']} failed); mean IoU of FP and Q masks "
                f"{'n/a' if n['iou_mean'] is None else format(n['iou_mean'], '.4f')}")
    data = {"served": served, "subtitle": subtitle, "layers": layers,
            "heads": int(hs["head"].max()) + 1 if len(hs) else 0, "cells": cells, "metrics": metrics,
            "item_metrics": {m: {"label": ITEM_LABELS.get(m, m), "most": CHANGE[m]} for _, _, m in metrics},
            "layer_rows": [_row(r) for r in ls.to_dict("records")],
            "units": [_row(r) for r in at.to_dict("records")] if not at.empty else [],
            "top": None, "items": {}}
    if not served and heads is not None and items is not None:
        data["top"] = {m: top_rows(top_items(heads, items, metric=m)) for m in dict.fromkeys(x[2] for x in metrics)}
        data["items"] = item_meta(items, {i: f"../{run}/" for i, run in (runs or {}).items()})
    return data


def _static(name: str) -> str:
    return (resources.files("sam2_layerwise.viewer") / "static" / name).read_text(encoding="utf-8")


def json_for_html(data) -> str:
    """JSON that stays inert inside a <script type="application/json"> element: every '<' escaped."""
    return json.dumps(data, default=lambda o: None, allow_nan=False).replace("<", "\\u003c")


def render(data, *, inline: bool) -> str:
    """The page: everything inline (opens from disk), or script and styles from the server's /static/ and the
    data fetched (`data` None)."""
    if inline:
        script = _static("sweep.js")
        assert not any(t in script.lower() for t in ("</script", "<script", "<!--"))  # inert as inline text
        style = f"<style>\n{_static('viewer.css')}\n{_static('sweep.css')}</style>"
        script = f"<script>\n{script}</script>"
    else:
        style = ('<link rel="stylesheet" href="/static/viewer.css">\n'
                 '<link rel="stylesheet" href="/static/sweep.css">')
        script = '<script src="/static/sweep.js" defer></script>'
    parts = {"@STYLE@": style, "@DATA@": json_for_html(data), "@SCRIPT@": script}
    return re.sub("|".join(parts), lambda m: parts[m.group(0)], _static("sweep.html"))  # one pass: data stays data


def sweep_page(hs: pd.DataFrame, ls: pd.DataFrame, at: pd.DataFrame, summary: dict, *, heads: pd.DataFrame,
               items: pd.DataFrame, runs: dict[int, str]) -> str:
    """`sweep/index.html`: the page with its data inline (`runs`: item -> its kept run, relative to the sweep
    directory)."""
    return render(page_data(hs, ls, at, summary, served=False, heads=heads, items=items, runs=runs), inline=True)

"""Heatmap and per-layer chart: valid PNGs, layers in model order, NaN vs missing heads."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sam2_layerwise.metrics import heatmap, layer_chart
from sam2_layerwise.metrics import plots


def metric_table(heads=(2, 4, 8), nan_at=(1, 3)) -> pd.DataFrame:
    """One row per (layer, head); layers listed out of model order; one NaN value."""
    rows = []
    for order, n in reversed(list(enumerate(heads))):
        kind = "global" if order == 1 else "window"
        for head in range(n):
            value = math.nan if (order, head) == nan_at else 0.01 * (order + 1) * (head + 1)
            rows.append({"layer": f"image_encoder.trunk.blocks.{order} ({kind})", "order": order, "head": head,
                         "js": value, "entropy_norm_delta": value - 0.1})
    return pd.DataFrame(rows)


def open_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_heatmap_and_chart_write_pngs(tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    table = metric_table()
    w, h = open_png(heatmap(table, "js", tmp_path / "js.png"))
    assert w > 200 and h > 100
    open_png(heatmap(table, "entropy_norm_delta", tmp_path / "delta.png", title="signed"))  # diverging scale
    open_png(layer_chart(table, "js", tmp_path / "js_layers.png", "JS per layer\nmask IoU 0.93, chosen mask kept"))
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # no pyplot state touched


def test_grid_separates_nan_from_missing_heads():
    table = metric_table()
    layers = plots._layers(table)
    assert [label for _, label in layers] == [f"image_encoder.trunk.blocks.{i} ({k})"
                                              for i, k in enumerate(("window", "global", "window"))]
    values, present = plots._grid(table, "js", layers)
    assert values.shape == (3, 8)
    assert present.sum(1).tolist() == [2, 4, 8]
    assert present[1, 3] and math.isnan(values[1, 3])  # a NaN value: drawn grey
    assert not present[0, 2] and math.isnan(values[0, 2])  # no such head: drawn blank
    assert values[2, 7] == pytest.approx(0.03 * 8)


def test_heatmap_grows_with_layers(tmp_path):
    small = open_png(heatmap(metric_table(heads=(2, 2)), "js", tmp_path / "small.png"))
    big = open_png(heatmap(metric_table(heads=(4,) * 31, nan_at=(0, 0)), "js", tmp_path / "big.png"))
    assert big[1] > 3 * small[1]


def test_all_nan_and_constant_columns(tmp_path):
    table = metric_table()
    table["js"] = np.nan
    open_png(heatmap(table, "js", tmp_path / "nan.png"))
    open_png(layer_chart(table, "js", tmp_path / "nan_layers.png", "all undefined"))
    table["js"] = 0.5
    open_png(heatmap(table, "js", tmp_path / "const.png"))


def test_bad_tables(tmp_path):
    table = metric_table()
    with pytest.raises(ValueError, match="lacks column.*order"):
        heatmap(table.drop(columns="order"), "js", tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks column.*missing_metric"):
        layer_chart(table, "missing_metric", tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="head 0 twice"):
        heatmap(pd.concat([table, table.iloc[:1]]), "js", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

"""generate's tables without pandas: `csv_bytes` writes what `DataFrame.to_csv` writes, byte for byte, and the
plots take the same table as a dict of columns."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sam2_layerwise.analysis.generate import _columns, csv_bytes
from sam2_layerwise.metrics import heatmap, heatmaps, layer_chart

# every kind of column generate's rows hold: ints, floats with None / NaN / inf, ints with None (pandas makes
# them float64), all None, strings that need quoting, bools with and without None, keys missing in some rows
ROWS = [
    {"order": 0, "layer": "trunk.blocks.0 (win)", "head": 0, "js": 3.677448830785579e-06, "n": 1, "group": 625,
     "err": None, "nan": math.nan, "none": None, "flag": True, "maybe": True, "mixed": 1, "text": 'a,b "c"'},
    {"order": 1, "layer": "decoder.layers.0 (tok→img)", "head": 1, "js": -0.0, "n": 2, "group": None,
     "err": 0.1, "nan": 1e-300, "none": None, "flag": False, "maybe": None, "mixed": 0.5, "text": "tab\there"},
    {"order": 2, "layer": "x\ny", "head": 3, "js": math.inf, "n": 3, "group": 7, "err": -math.inf,
     "nan": 123456789012.5, "none": None, "flag": True, "maybe": False, "mixed": 2, "text": None,
     "late": 1.0},
]


@pytest.mark.parametrize("float_format,sep", [("%.17g", ","), ("%.6g", "\t")])
def test_csv_bytes_equals_pandas(float_format, sep):
    expect = pd.DataFrame(ROWS).to_csv(index=False, sep=sep, float_format=float_format).encode()
    assert csv_bytes(ROWS, sep=sep, float_format=float_format) == expect
    columns = ["order", "group", "text", "absent", "js"]  # a chosen order, and a column no row has
    expect = pd.DataFrame(ROWS, columns=columns).to_csv(index=False, sep=sep, float_format=float_format).encode()
    assert csv_bytes(ROWS, columns, sep=sep, float_format=float_format) == expect
    assert csv_bytes([], columns, float_format=float_format) == \
        pd.DataFrame([], columns=columns).to_csv(index=False, float_format=float_format).encode()


def test_plots_of_a_dict_table_equal_those_of_a_dataframe(tmp_path):
    rows = [{"order": o, "layer": f"block {o}", "head": h, "js": 0.01 * (o + 1) * (h + 1) if (o, h) != (1, 0)
             else None, "delta": 0.05 * h - 0.04 * o} for o, n in enumerate((2, 4, 1)) for h in range(n)]
    frame, columns = pd.DataFrame(rows), _columns(rows)
    for name, table in (("frame", frame), ("dict", columns)):
        heatmap(table, "js", tmp_path / f"{name}_js.png")
        layer_chart(table, "js", tmp_path / f"{name}_chart.png", "JS\nper layer")
        # several metrics from one figure: each PNG as heatmap draws it alone
        heatmaps(table, [(m, tmp_path / f"{name}_many_{m}.png", None) for m in ("delta", "js")])
    for png in ("js", "chart", "many_js", "many_delta"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"frame_{png}.png")),
                              np.asarray(Image.open(tmp_path / f"dict_{png}.png"))), png
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dict_js.png")),
                          np.asarray(Image.open(tmp_path / "dict_many_js.png")))
    heatmap(columns, "delta", tmp_path / "alone_delta.png")  # signed: a diverging colour bar after viridis
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone_delta.png")),
                          np.asarray(Image.open(tmp_path / "dict_many_delta.png")))

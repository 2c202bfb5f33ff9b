"""A sweep's tables reduced over its items into `sweep/` (docs/sweep.md): per layer x head the mean and 95th
percentile over items of every head metric, per layer the Spearman correlation between its JS divergence and
the item's IoU loss, per attribution unit the distribution of its IoU change, rankings, plots and a page.

Only items whose status is `ok` count. Pure pandas/numpy on the tables: nothing here needs the model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

SCHEMA = "sam2-layerwise/sweep-aggregate"
SCHEMA_VERSION = 1
HEAD_KEYS = ["layer_key", "call_index", "head"]
LAYER_KEYS = ["layer_key", "call_index"]
HEATMAPS = ("js_mean_mean", "js_mean_p95", "out_rel_err_mean")
RANK_COLUMNS = ("js_mean_mean", "js_mean_p95", "js_max_mean", "topk_overlap_mean", "q_rel_err_mean",
                "k_rel_err_mean", "v_rel_err_mean", "out_rel_err_mean", "layer_spearman_js_iou_loss",
                "layer_attribution_delta_iou_mean")
TOP_ITEMS = 10  # items listed per head on the page
# How a per-item head metric says "changed most": its highest values, its lowest, or its largest magnitude.
CHANGE = {"js_mean": "highest", "js_p95": "highest", "js_max": "highest", "out_rel_err": "highest",
          "q_rel_err": "highest", "k_rel_err": "highest", "v_rel_err": "highest",
          "entropy_norm_delta": "largest |value|", "topk_overlap": "lowest", "q_mass_on_fp_topk": "lowest"}


def spearman(x, y) -> tuple[float, int]:
    """Spearman's rank correlation of two series (ties get their average rank), over the pairs where both are
    finite: (rho, n). NaN when n < 3 or one side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3:
        return math.nan, n
    rx, ry = pd.Series(x[ok]).rank().to_numpy(), pd.Series(y[ok]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan, n
    return float(np.corrcoef(rx, ry)[0, 1]), n


def head_metrics(heads: pd.DataFrame) -> list[str]:
    from sam2_layerwise.sweep.store import _head_metrics

    return [m for m in _head_metrics() if m in heads.columns]


def heads_summary(heads: pd.DataFrame) -> pd.DataFrame:
    """Per layer x head: `n_items`, and `<metric>_mean` / `<metric>_p95` over items (NaN left out; p95 with
    linear interpolation, as `metrics.summarise`)."""
    metrics = head_metrics(heads)
    cols = ["order", "layer", "layer_key", "call_index", "kind", "head", "n_items"] + \
        [f"{m}_{s}" for m in metrics for s in ("mean", "p95")]
    if heads.empty:
        return pd.DataFrame(columns=cols)
    g = heads.groupby(HEAD_KEYS, sort=False)
    first = g[["order", "layer", "kind"]].first()
    n = g["item"].nunique().rename("n_items")
    mean = g[metrics].mean().add_suffix("_mean")
    p95 = g[metrics].quantile(0.95, interpolation="linear").add_suffix("_p95")
    out = pd.concat([first, n, mean, p95], axis=1).reset_index()
    return out.sort_values(["order", "head"], kind="stable").reindex(columns=cols).reset_index(drop=True)


def layers_summary(heads: pd.DataFrame, items: pd.DataFrame, attribution: pd.DataFrame) -> pd.DataFrame:
    """Per layer: the item's layer JS (mean over its heads of `js_mean`), its mean and p95 over items, and
    Spearman's rho between it and the item's IoU loss (1 - IoU of the chosen FP and Q masks); with attribution,
    the IoU change of the layer's unit (mean, min, max over items)."""
    cols = ["order", "layer", "layer_key", "call_index", "kind", "n_items", "js_mean", "js_p95", "out_rel_err_mean",
            "spearman_js_iou_loss", "spearman_n", "attribution_delta_iou_mean", "attribution_delta_iou_min",
            "attribution_delta_iou_max"]
    if heads.empty:
        return pd.DataFrame(columns=cols)
    per_item = heads.groupby(LAYER_KEYS + ["item"], sort=False).agg(
        order=("order", "first"), layer=("layer", "first"), kind=("kind", "first"), js=("js_mean", "mean"),
        out=("out_rel_err", "mean")).reset_index()
    loss = items.set_index("item")["iou_loss"]
    per_item["iou_loss"] = per_item["item"].map(loss)
    rows = []
    for (key, call), g in per_item.groupby(LAYER_KEYS, sort=False):
        rho, n = spearman(g["js"], g["iou_loss"])
        rows.append({"order": int(g["order"].iloc[0]), "layer": g["layer"].iloc[0], "layer_key": key,
                     "call_index": int(call), "kind": g["kind"].iloc[0], "n_items": int(g["item"].nunique()),
                     "js_mean": g["js"].mean(), "js_p95": g["js"].quantile(0.95), "out_rel_err_mean": g["out"].mean(),
                     "spearman_js_iou_loss": rho, "spearman_n": n})
    out = pd.DataFrame(rows)
    if not attribution.empty:
        a = attribution.groupby("unit")["delta_iou"].agg(["mean", "min", "max"])
        for stat in ("mean", "min", "max"):
            out[f"attribution_delta_iou_{stat}"] = out["layer_key"].map(a[stat])
    return out.reindex(columns=cols).sort_values("order", kind="stable").reset_index(drop=True)


def attribution_summary(attribution: pd.DataFrame) -> pd.DataFrame:
    """Per unit: its IoU change over items (mean, median, min, max), the mean IoU against FP with it changed,
    how often the chosen mask changed, the mean cost of one restart in seconds."""
    cols = ["order", "unit", "kind", "mode", "sites", "params", "n_items", "delta_iou_mean", "delta_iou_median",
            "delta_iou_min", "delta_iou_max", "delta_iou_mean_mean", "iou_mean", "chosen_changed_rate",
            "seconds_mean"]
    if attribution.empty:
        return pd.DataFrame(columns=cols)
    g = attribution.groupby("unit", sort=False)
    out = g.agg(order=("order", "first"), kind=("kind", "first"), mode=("mode", "first"), sites=("sites", "first"),
                params=("params", "first"), n_items=("item", "nunique"), delta_iou_mean=("delta_iou", "mean"),
                delta_iou_median=("delta_iou", "median"), delta_iou_min=("delta_iou", "min"),
                delta_iou_max=("delta_iou", "max"), delta_iou_mean_mean=("delta_iou_mean", "mean"),
                iou_mean=("iou", "mean"), chosen_changed_rate=("chosen_changed", "mean"),
                seconds_mean=("seconds", "mean")).reset_index()
    return out.reindex(columns=cols).sort_values("order", kind="stable").reset_index(drop=True)


def ranked_heads(summary: pd.DataFrame, layers: pd.DataFrame, n: int) -> list[dict]:
    """Heads by mean (over items) of their mean JS, highest first (NaN last; ties in model order), with their
    layer's Spearman rho and attribution beside."""
    if summary.empty:
        return []
    df = summary.merge(layers[LAYER_KEYS + ["spearman_js_iou_loss", "attribution_delta_iou_mean"]].rename(
        columns={"spearman_js_iou_loss": "layer_spearman_js_iou_loss",
                 "attribution_delta_iou_mean": "layer_attribution_delta_iou_mean"}), on=LAYER_KEYS, how="left")
    df = df.assign(_nan=df["js_mean_mean"].isna()).sort_values(
        ["_nan", "js_mean_mean", "order", "head"], ascending=[True, False, True, True], kind="stable").head(n)
    return [{"rank": i + 1, **{c: _py(r[c]) for c in ("layer_key", "call_index", "layer", "kind", "head",
                                                       "n_items", *RANK_COLUMNS)}}
            for i, (_, r) in enumerate(df.iterrows())]


def ranked_units(summary: pd.DataFrame) -> list[dict]:
    """Units by how much they matter: restore mode by mean IoU recovered (highest first), isolate mode by mean
    IoU lost (most negative first)."""
    if summary.empty:
        return []
    restore = (summary["mode"] == "restore").all()
    df = summary.sort_values(["delta_iou_mean", "order"], ascending=[not restore, True], kind="stable")
    return [{"rank": i + 1, **{c: _py(v) for c, v in r.items()}} for i, (_, r) in enumerate(df.iterrows())]


def top_items(heads: pd.DataFrame, items: pd.DataFrame, n: int = TOP_ITEMS,
              metric: str = "js_mean") -> dict[str, list[dict]]:
    """`layer_key#call#head` -> the n items where that head changed most by `metric` (per item, as in
    heads.parquet; `CHANGE` says whether most is highest, lowest or largest in magnitude), most first, ties by
    item; NaN left out. Each entry: item, image (file name), prompt, points, `value` (the metric), js_mean, iou
    (the item's FP vs Q mask IoU), key."""
    if metric not in CHANGE:
        raise ValueError(f"no item ranking by {metric!r} (one of {', '.join(CHANGE)})")
    if heads.empty:
        return {}
    meta = items.set_index("item")
    df = heads[list(dict.fromkeys([*HEAD_KEYS, "item", "js_mean", metric]))]
    value = df[metric].astype(float)
    score = {"highest": value, "lowest": -value, "largest |value|": value.abs()}[CHANGE[metric]]
    df = df.assign(value_=value, score_=score).dropna(subset=["score_"])
    df = df.sort_values(["score_", "item"], ascending=[False, True], kind="stable").groupby(HEAD_KEYS).head(n)
    out: dict[str, list[dict]] = {}
    for r in df.itertuples(index=False):
        m = meta.loc[r.item]
        out.setdefault(f"{r.layer_key}#{r.call_index}#{r.head}", []).append(
            {"item": int(r.item), "image": str(m["image"]).rsplit("/", 1)[-1], "prompt": m["prompt"],
             "points": m["points"], "value": _py(r.value_), "js_mean": _py(r.js_mean), "iou": _py(m["iou"]),
             "key": m["key"]})
    return out


def _py(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if v is pd.NA or v is None:
        return None
    return v


def _csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False, float_format="%.9g").encode()


def _parquet(df: pd.DataFrame) -> bytes:
    from sam2_layerwise.sweep.store import _parquet_bytes

    return _parquet_bytes(df)


def aggregate(tables: dict[str, pd.DataFrame], write, *, rank: int = 20, runs: dict[int, str] | None = None) -> dict:
    """Write `sweep/` through `write(rel, bytes)`; return summary.json's content."""
    items = tables["items"]
    ok = items[items["status"] == "ok"]
    ok_items = set(ok["item"])
    heads = tables["heads"][tables["heads"]["item"].isin(ok_items)]
    attribution = tables["attribution"][tables["attribution"]["item"].isin(ok_items)]
    hs = heads_summary(heads)
    ls = layers_summary(heads, ok, attribution)
    at = attribution_summary(attribution)
    ranking = ranked_heads(hs, ls, rank)
    units = ranked_units(at)
    files = {"heads": ["heads.parquet", "heads.csv"], "layers": ["layers.parquet", "layers.csv"],
             "ranking": ["ranking.txt", "ranking.json"], "plots": [], "page": "index.html"}
    for name, df in (("heads", hs), ("layers", ls)):
        write(f"{name}.parquet", _parquet(df))
        write(f"{name}.csv", _csv(df))
    if not at.empty:
        write("attribution.parquet", _parquet(at))
        write("attribution.csv", _csv(at))
        write("attribution_ranking.txt", pd.DataFrame(units).to_csv(sep="\t", index=False,
                                                                    float_format="%.6g").encode())
        files["attribution"] = ["attribution.parquet", "attribution.csv", "attribution_ranking.txt"]
    write("ranking.txt", pd.DataFrame(ranking).to_csv(sep="\t", index=False, float_format="%.6g").encode())
    write("ranking.json", (json.dumps(ranking, indent=1) + "\n").encode())
    files["plots"] = _plots(hs, ls, at, write, len(ok))
    summary = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "items": {"total": int(len(items)), "ok": int(len(ok)), "failed": int(len(items) - len(ok)),
                  "iou_mean": _py(ok["iou"].mean()) if len(ok) else None,
                  "iou_loss_mean": _py(ok["iou_loss"].mean()) if len(ok) else None,
                  "gt_iou_fp_mean": _py(ok["gt_iou_fp"].mean()) if len(ok) else None,
                  "gt_iou_q_mean": _py(ok["gt_iou_q"].mean()) if len(ok) else None},
        "definitions": {
            "<metric>_mean / <metric>_p95": "mean / 95th percentile (linear) over items of the item's per-head value "
                                            "(js_mean_p95: p95 over items of the item's mean JS over its queries)",
            "spearman_js_iou_loss": "Spearman rank correlation over items between the layer's JS (mean over its heads "
                                    "of js_mean) and the item's IoU loss 1 - IoU(chosen FP mask, chosen Q mask)",
            "delta_iou": "restore: IoU(Q with the unit in full precision, FP) - IoU(Q, FP); isolate: IoU(FP with only "
                         "the unit quantized, FP) - 1",
        },
        "ranking": ranking[:10],
        "attribution_ranking": units[:10],
        "files": files,
    }
    from sam2_layerwise.sweep.page import sweep_page

    write("index.html", sweep_page(hs, ls, at, summary, heads=heads, items=ok, runs=runs or {}).encode())
    write("summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def _plots(hs: pd.DataFrame, ls: pd.DataFrame, at: pd.DataFrame, write, n_items: int) -> list[str]:
    import tempfile
    from pathlib import Path

    from sam2_layerwise.metrics import heatmap
    from sam2_layerwise.metrics.plots import attribution_chart

    out = []
    if hs.empty:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        def keep(path: Path):
            write(f"plots/{path.name}", path.read_bytes())
            out.append(f"plots/{path.name}")

        for metric in HEATMAPS:
            if metric in hs and hs[metric].notna().any():
                path = Path(tmp) / f"heatmap_{metric}.png"
                heatmap(hs, metric, path, title=f"{metric} per layer and head over {n_items} items")
                keep(path)
        path = Path(tmp) / "layers.png"
        _layer_panels(ls, path, n_items)
        keep(path)
        if not at.empty:
            path = Path(tmp) / "attribution.png"
            attribution_chart(list(at["unit"]), at["delta_iou_mean"], path,
                              f"attribution ({at['mode'].iloc[0]}): mean change of mask IoU vs FP over {n_items} "
                              f"items (bars: min..max)", low=at["delta_iou_min"], high=at["delta_iou_max"])
            keep(path)
    return out


def _layer_panels(ls: pd.DataFrame, path, n_items: int) -> None:
    """Per layer: mean JS over items (p95 as a tick) above, Spearman rho with the IoU loss below."""
    from sam2_layerwise.metrics.plots import DPI, FONT, _figure

    n = len(ls)
    width = max(6.0, 0.28 * n + 2.2)
    fig = _figure(width, 6.2)
    top = fig.add_axes((1.0 / width, 0.62, 1 - 1.4 / width, 0.31))
    bottom = fig.add_axes((1.0 / width, 0.27, 1 - 1.4 / width, 0.25))
    x = np.arange(n)
    top.bar(x, ls["js_mean"].astype(float), color="#3b528b", label="mean over items")
    top.scatter(x, ls["js_p95"].astype(float), marker="_", color="#c0392b", s=80, label="p95 over items")
    top.set_ylabel("JS (bits)", fontsize=FONT + 1)
    top.set_title(f"attention change per layer (mean JS over heads) over {n_items} items", loc="left",
                  fontsize=FONT + 1.5)
    top.legend(fontsize=FONT)
    top.set_xticks(x, [""] * n)
    rho = ls["spearman_js_iou_loss"].astype(float)
    bottom.bar(x, rho.fillna(0), color=np.where(rho.fillna(0) >= 0, "#21918c", "#b5367a"))
    bottom.set_ylim(-1, 1)
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_ylabel("Spearman rho", fontsize=FONT + 1)
    bottom.set_title("rank correlation of the layer's JS with the item's IoU loss (no bar: undefined)", loc="left",
                     fontsize=FONT + 1.5)
    bottom.set_xticks(x, ls["layer"], rotation=60, ha="right", rotation_mode="anchor", fontsize=FONT)
    for ax in (top, bottom):
        ax.set_xlim(-0.5, max(n - 0.5, 0.5))
        ax.tick_params(axis="y", labelsize=FONT)
    fig.savefig(path, format="png", dpi=DPI)

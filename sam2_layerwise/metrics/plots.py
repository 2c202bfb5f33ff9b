"""Static plots of per-(layer, head) metric tables: a layer x head heatmap and a per-layer line chart.

`table` has one row per (layer, head) — a pandas DataFrame, or a dict of equal-length column lists (what
`generate` passes: no pandas import) — with columns `layer` (a readable label, drawn as given), `order` (int,
the layer's place in the model; rows are drawn in this order), `head` (int) and metric columns.
Heads vary per layer (Hiera b+ has 2, 4, 8, 16 by stage). Figures are `matplotlib.figure.Figure` objects
drawn by the Agg canvas, so pyplot and its global state are never touched; PNGs go where the caller says.
matplotlib is imported on first use, keeping `import sam2_layerwise.metrics` light.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FONT = 7  # tick labels: ~31 layer names must stay legible without a huge figure
NAN_COLOR = "#b4b4b4"  # a (layer, head) whose value is NaN (undefined)
MISSING_COLOR = "white"  # a head the layer does not have
ROW_IN = 0.22  # inches per layer row in the heatmap
HEAD_IN = 0.34  # inches per head column
DPI = 110
PNG_OPTIONS = {"compress_level": 1}  # see _save_png


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _text_in(label: str, size: float = FONT) -> float:
    """Rough width in inches of one line of text at `size` points."""
    return len(label) * size * 0.58 / 72


def _check(table, metric: str) -> None:
    missing = [c for c in ("layer", "order", "head", metric) if c not in table]
    if missing:
        raise ValueError(f"metric table lacks column(s) {', '.join(missing)}; "
                         f"it has {', '.join(map(str, table))}")


def _layers(table) -> list[tuple[int, str]]:
    """(order, label) of every layer, in model order."""
    pairs = dict.fromkeys(zip(table["order"], table["layer"]))
    return sorted(((int(o), str(l)) for o, l in pairs), key=lambda p: p[0])


def _numbers(table, name: str) -> np.ndarray:
    """A column as float64, NaN where it is missing (None, NaN, pandas' NA)."""
    column = table[name]
    try:
        if hasattr(column, "to_numpy"):  # a DataFrame's
            return column.to_numpy(dtype=float, na_value=np.nan)
        return np.array([np.nan if v is None else v for v in column], dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric table: column {name!r} is not numeric ({e})") from None


def _grid(table, metric: str, layers: list[tuple[int, str]]):
    """values [layers, heads] float (NaN where the metric is NaN or the head is missing) and present [layers, heads]."""
    heads = [int(h) for h in table["head"]]
    n_heads = max(heads) + 1 if heads else 0
    values = np.full((len(layers), n_heads), np.nan)
    present = np.zeros((len(layers), n_heads), dtype=bool)
    row_of = {layer: i for i, layer in enumerate(layers)}
    column = _numbers(table, metric)
    for order, label, h, value in zip(table["order"], table["layer"], heads, column):
        r = row_of[(int(order), str(label))]
        if h < 0:
            raise ValueError(f"metric table: negative head {h} in layer {label!r}")
        if present[r, h]:
            raise ValueError(f"metric table: layer {label!r} has head {h} twice; give each call its own label")
        present[r, h] = True
        values[r, h] = value
    return values, present


def _colour_scale(values: np.ndarray, cmap: str | None, vmin: float | None, vmax: float | None):
    """A diverging map centred at 0 for signed data (e.g. a change Q − FP), viridis otherwise."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    signed = lo < 0 < hi
    if signed and vmin is None and vmax is None:
        bound = max(-lo, hi)
        lo, hi = -bound, bound
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return (cmap or ("RdBu_r" if signed else "viridis"), lo if vmin is None else vmin, hi if vmax is None else vmax)


def heatmap(table, metric: str, path, title: str | None = None, *, cmap: str | None = None,
            vmin: float | None = None, vmax: float | None = None) -> Path:
    """Layer x head heatmap of `metric` written as a PNG to `path`; returns the path.

    Rows: layers in `order`, labelled with `layer`; columns: heads 0..max. Grey cells: NaN values; white
    cells: heads a layer does not have. Colour bar named after the metric; `cmap` defaults to viridis, or
    to RdBu_r centred at 0 when values have both signs. The figure grows with the number of layers and heads.
    """
    return heatmaps(table, [(metric, path, title)], cmap=cmap, vmin=vmin, vmax=vmax)[0]


def heatmaps(table, plots, *, cmap: str | None = None, vmin: float | None = None,
             vmax: float | None = None) -> list[Path]:
    """`heatmap` of several metrics of one table: `plots` is a list of (metric, path, title or None); returns
    the paths. The PNGs are the ones `heatmap` draws, but what all of them share (layer and head labels, axis
    label: most of the drawing time) is drawn once; per metric only the cells, the title and the colour bar."""
    import matplotlib
    from matplotlib.cm import ScalarMappable

    plots = list(plots)
    for metric, _, _ in plots:
        _check(table, metric)
    if not plots:
        return []
    layers = _layers(table)
    grids = [_grid(table, metric, layers) for metric, _, _ in plots]  # every metric checked before drawing
    present = grids[0][1]  # the same rows for every metric: the same heads present
    n_layers, n_heads = present.shape

    label_w = max([_text_in(label) for _, label in layers], default=0.5) + 0.2
    left, right, top, bottom = label_w, 1.2, 0.55, 0.55  # inches around the cells (colour bar on the right)
    cells_w, cells_h = max(HEAD_IN * n_heads, 1.2), max(ROW_IN * n_layers, 0.6)
    width, height = left + cells_w + right, top + cells_h + bottom
    fig = _figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, cells_w / width, cells_h / height))
    cax_rect = ((left + cells_w + 0.15) / width, bottom / height, 0.15 / width, cells_h / height)

    # the cells of each metric as one RGBA image [layers, heads, 4] uint8, coloured here: values through the
    # colour map, NaN grey, missing heads blank (matplotlib's own colouring of masked data costs more than the
    # rest of a frame, and a second image on top for the missing heads as much again)
    image = ax.imshow(np.zeros((n_layers, n_heads, 4), dtype=np.uint8), aspect="auto", interpolation="nearest")
    blank = matplotlib.colors.to_rgba_array(MISSING_COLOR)[0] * 255

    ax.set_yticks(range(n_layers), [label for _, label in layers], fontsize=FONT)
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=FONT)
    # cell borders as two line collections: minor ticks would make ~600 Tick objects, the bulk of the draw time
    rows = ax.hlines(np.arange(n_layers + 1) - 0.5, -0.5, n_heads - 0.5, colors="white", linewidths=0.6)
    cols = ax.vlines(np.arange(n_heads + 1) - 0.5, -0.5, n_layers - 0.5, colors="white", linewidths=0.6)
    ax.set_xlim(-0.5, n_heads - 0.5)
    ax.set_ylim(n_layers - 0.5, -0.5)
    ax.set_xlabel("head (grey: NaN, blank: no such head)", fontsize=FONT + 1)
    ax.set_title("", fontsize=FONT + 2)  # placed by the full draw below; one line, whatever its text

    # Draw everything but what changes, keep the pixels, then per metric restore them and draw the rest in
    # the order Axes.draw would (z-order: cells, borders, spines; the title last).
    changing = [image, rows, cols, *ax.spines.values(), ax.title]
    for artist in changing:
        artist.set_visible(False)
    canvas = fig.canvas
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    renderer = canvas.get_renderer()
    for artist in changing:
        artist.set_visible(True)

    # PNG encoding (Pillow's row filters, a third of a frame's time) runs beside the drawing of the next frame:
    # Pillow releases the GIL while it encodes
    bar, pending = None, []
    with ThreadPoolExecutor(1) as encoder:
        for (metric, path, title), (values, _) in zip(plots, grids):
            cmap_name, lo, hi = _colour_scale(values, cmap, vmin, vmax)
            colours = matplotlib.colormaps[cmap_name].with_extremes(bad=NAN_COLOR)
            norm = matplotlib.colors.Normalize(lo, hi)
            cells = colours(norm(np.ma.masked_invalid(values)), bytes=True)  # [layers, heads, 4] uint8
            cells[~present] = blank
            image.set_data(cells)
            ax.set_title(title if title is not None else f"{metric} per layer and head", fontsize=FONT + 2)
            scale = ScalarMappable(norm=norm, cmap=colours)
            if bar is None:
                bar = fig.colorbar(scale, cax=fig.add_axes(cax_rect))
                bar.ax.tick_params(labelsize=FONT)
            else:  # a new norm: the colour bar's ticks start afresh, as in a new figure
                bar.update_normal(scale)
            bar.set_label(metric, fontsize=FONT + 1)
            canvas.restore_region(background)
            for artist in changing:
                artist.draw(renderer)
            bar.ax.draw(renderer)
            pending.append(encoder.submit(_save_png, np.array(canvas.buffer_rgba()), path))  # [H, W, 4] copy
    return [job.result() for job in pending]


def _save_png(pixels: np.ndarray, path) -> Path:
    """What `savefig(path, format="png")` writes of a figure drawn into `pixels` [H, W, 4] uint8 (figure dpi,
    matplotlib's metadata), with faster compression: zlib level 1 gives ~6 % larger files in less time."""
    from matplotlib.image import imsave

    imsave(path, pixels, format="png", origin="upper", dpi=DPI, pil_kwargs=PNG_OPTIONS)
    return Path(path)


def layer_chart(table, metric: str, path, title: str) -> Path:
    """Per-layer line chart of `metric` written as a PNG to `path`; returns the path.

    x: layers in `order` (rotated `layer` labels); y: the mean over a layer's heads and the maximum over
    them (NaN heads left out; a layer with no defined value leaves a gap). `title` may hold several lines.
    """
    _check(table, metric)
    layers = _layers(table)
    values, _ = _grid(table, metric, layers)
    with np.errstate(all="ignore"):
        defined = np.isfinite(values)
        count = defined.sum(1)
        mean = np.where(count > 0, np.where(defined, values, 0).sum(1) / np.maximum(count, 1), np.nan)
        top = np.where(count > 0, np.where(defined, values, -np.inf).max(1, initial=-np.inf), np.nan)

    n_layers = len(layers)
    title_lines = title.count("\n") + 1
    label_w = [_text_in(label) for _, label in layers]
    plot_w, plot_h = max(0.28 * n_layers, 4.0), 2.8
    step = plot_w / max(n_layers, 1)
    # Labels rotated 60 degrees hang down and to the left of their tick: room below, and left of the first ones.
    overhang = max([w * math.cos(math.radians(60)) - (i + 0.5) * step for i, w in enumerate(label_w)], default=0)
    top_in, bottom_in = 0.3 + 0.17 * title_lines, max(label_w, default=0.5) * math.sin(math.radians(60)) + 0.3
    left_in, right_in = max(0.8, overhang + 0.15), 0.3
    width, height = left_in + plot_w + right_in, top_in + plot_h + bottom_in
    fig = _figure(width, height)
    ax = fig.add_axes((left_in / width, bottom_in / height, plot_w / width, plot_h / height))
    x = np.arange(n_layers)
    ax.plot(x, mean, marker="o", markersize=3, linewidth=1.2, label="mean over heads")
    ax.plot(x, top, marker="^", markersize=3, linewidth=1.0, linestyle="--", label="max over heads")
    ax.set_xticks(x, [label for _, label in layers], fontsize=FONT, rotation=60, ha="right",
                  rotation_mode="anchor")
    ax.set_xlim(-0.5, max(n_layers - 0.5, 0.5))
    ax.tick_params(axis="y", labelsize=FONT)
    ax.set_ylabel(metric, fontsize=FONT + 1)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=FONT, loc="best")
    ax.set_title(title, fontsize=FONT + 1.5, loc="left")
    fig.savefig(path, format="png", dpi=DPI, pil_kwargs=PNG_OPTIONS)
    return Path(path)


def attribution_chart(units: list[str], delta, path, title: str, low=None, high=None) -> Path:
    """Bar chart of counterfactual attribution: one bar per unit (model order) of its change of mask IoU
    (`delta`, e.g. IoU with the unit restored minus IoU of the quantized model); `low` / `high` (optional)
    draw a range per bar (min..max over items). Written as a PNG to `path`; returns the path."""
    delta = np.asarray(delta, dtype=float)
    labels = [u.replace("image_encoder_trunk_blocks_", "block ").replace("sam_mask_decoder_transformer_", "dec ")
              .replace("sam_mask_decoder_", "dec ") for u in units]
    label_w = max((_text_in(label) for label in labels), default=0.5)
    plot_w, plot_h = max(0.26 * len(units), 4.0), 2.6
    title_lines = title.count("\n") + 1
    top_in, bottom_in, left_in, right_in = 0.3 + 0.17 * title_lines, label_w * 0.87 + 0.3, 0.9, 0.3
    width, height = left_in + plot_w + right_in, top_in + plot_h + bottom_in
    fig = _figure(width, height)
    ax = fig.add_axes((left_in / width, bottom_in / height, plot_w / width, plot_h / height))
    x = np.arange(len(units))
    ax.bar(x, np.nan_to_num(delta), color=np.where(np.nan_to_num(delta) >= 0, "#21918c", "#b5367a"))
    if low is not None and high is not None:
        lo, hi = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
        ax.errorbar(x, delta, yerr=[np.maximum(delta - lo, 0), np.maximum(hi - delta, 0)], fmt="none",
                    ecolor="#333", linewidth=0.7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, labels, fontsize=FONT, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.5, max(len(units) - 0.5, 0.5))
    ax.tick_params(axis="y", labelsize=FONT)
    ax.set_ylabel("change of mask IoU", fontsize=FONT + 1)
    ax.grid(True, axis="y", linewidth=0.4, alpha=0.5)
    ax.set_title(title, fontsize=FONT + 1.5, loc="left")
    fig.savefig(path, format="png", dpi=DPI, pil_kwargs=PNG_OPTIONS)
    return Path(path)

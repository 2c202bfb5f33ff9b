"""Colormaps and the legend strip that says what the colours mean.

Colours come from matplotlib (`matplotlib.colormaps[name]`), text and the colour bar are drawn with Pillow.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sam2_layerwise.errors import InputError

NOT_A_KEY_RGB = (48, 48, 48)  # grid cells that are not keys of this query (outside its window)
LEGEND_BG, LEGEND_FG = (20, 20, 20), (235, 235, 235)


def colormap_names() -> list[str]:
    import matplotlib

    return sorted(matplotlib.colormaps)


@lru_cache(maxsize=16)
def _lookup(name: str):
    """matplotlib's colormap `name`, looked up once per name (the registry hands out a fresh copy each time;
    maps only read it, so every map of a pass shares one)."""
    import matplotlib

    return matplotlib.colormaps[name]


def check_cmap(name: str, flag: str = "--cmap"):
    """The matplotlib colormap called `name`, or an InputError listing close names."""
    try:
        return _lookup(name)
    except (KeyError, ValueError, TypeError):
        pass
    names = colormap_names()
    lower = {n.lower(): n for n in names}
    close = ([lower[name.lower()]] if name.lower() in lower else []) + difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    close = list(dict.fromkeys(close))[:5] or ["viridis", "plasma", "magma", "inferno", "turbo"]
    raise InputError(f"unknown matplotlib colormap; close names: {', '.join(close)}", flag=flag, value=name)


def colorize(values: np.ndarray, cmap_name: str, vmax: float) -> tuple[np.ndarray, np.ndarray]:
    """values [h, w] float (NaN = not a key) -> (RGB uint8 [h, w, 3], valid bool [h, w]).

    Linear normalisation from 0 to `vmax` (the map's maximum): value / vmax picks the colour.
    """
    cmap = check_cmap(cmap_name)
    valid = np.isfinite(values)
    norm = np.where(valid, values, 0.0) / (vmax if vmax > 0 else 1.0)
    rgb = cmap(np.clip(norm, 0.0, 1.0), bytes=True)[..., :3]  # [h, w, 3] uint8
    rgb[~valid] = NOT_A_KEY_RGB
    return np.ascontiguousarray(rgb), valid


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=4096)
def text_width(text: str, size: int) -> float:
    """Width in pixels of `text` in the legend font of `size` (cached: legends repeat the same words)."""
    return font(size).getlength(text)


def wrap(text: str, size: int, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of `width` pixels (the last one cut with an ellipsis)."""
    space = text_width(" ", size)
    lines, line, used = [], "", 0.0
    for word in text.split(" "):
        w = text_width(word, size)
        if line and used + space + w > width:
            lines.append(line)
            line, used = word, w
        else:
            line, used = (f"{line} {word}", used + space + w) if line else (word, w)
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    out = []
    for ln in lines:  # a single word longer than the line: cut it (proportional guess)
        full = text_width(ln, size)
        if full > width:
            ln = ln[:max(1, int(len(ln) * width / full) - 2)] + "…"
        out.append(ln)
    return out


def legend_strip(width: int, title: str, cmap_name: str, vmax: float, quantity: str, *,
                 not_a_key: str | None = None) -> Image.Image:
    """A strip for under a picture: the title, a colour bar from 0 to `vmax`, and what the values are.

    width: pixels (at least 360). quantity: what a colour measures. not_a_key: how cells that are not keys of
    the query look ("grey" on the key grid, "dimmed" on the photograph), or None when every cell is a key.
    """
    width = max(width, 360)
    fs = 12 if width < 700 else 15
    fnt = font(fs)
    pad, line = 6, fs + 3
    head = wrap(title, fs, width - 2 * pad)
    foot = wrap(f"colour = {quantity}, linear from 0 to this map's maximum", fs, width - 2 * pad)
    bar_h = fs
    height = pad + line * len(head) + pad + bar_h + pad + line * len(foot) + pad
    strip = Image.new("RGB", (width, height), LEGEND_BG)
    draw = ImageDraw.Draw(strip)
    y = pad
    for ln in head:
        draw.text((pad, y), ln, fill=LEGEND_FG, font=fnt)
        y += line
    y += pad
    lo, hi = "0", f"{vmax:.4g}"
    x = pad
    draw.text((x, y), lo, fill=LEGEND_FG, font=fnt)
    x += int(text_width(lo, fs)) + 4
    bar_w = max(60, int(width * 0.45))
    cmap = check_cmap(cmap_name)
    gradient = cmap(np.linspace(0.0, 1.0, bar_w), bytes=True)[None, :, :3].repeat(bar_h, 0)  # [bar_h, bar_w, 3]
    strip.paste(Image.fromarray(np.ascontiguousarray(gradient)), (x, y))
    x += bar_w + 4
    draw.text((x, y), hi, fill=LEGEND_FG, font=fnt)
    x += int(text_width(hi, fs)) + 12
    if not_a_key:
        if not_a_key == "grey":
            draw.rectangle([x, y, x + bar_h, y + bar_h - 1], fill=NOT_A_KEY_RGB, outline=LEGEND_FG)
            x += bar_h + 4
        draw.text((x, y), f"{not_a_key}: not a key", fill=LEGEND_FG, font=fnt)
    y += bar_h + pad
    for ln in foot:
        draw.text((pad, y), ln, fill=LEGEND_FG, font=fnt)
        y += line
    return strip


def stack(picture: Image.Image, strip: Image.Image) -> Image.Image:
    """`picture` at the top-left, `strip` below it (the canvas is as wide as the wider of the two)."""
    out = Image.new("RGB", (max(picture.width, strip.width), picture.height + strip.height), LEGEND_BG)
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out

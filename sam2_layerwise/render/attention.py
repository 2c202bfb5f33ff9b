"""Attention images and overlays on the photograph, written into a run directory.

- attention image (`attn_images/`): the map on its layer's whole key grid, each token a square block
  (integer nearest upsampling, at most `max_image_side` px), the window outlined, the query's own cells marked
  in cyan; decoder token keys are drawn as a labelled row of cells.
- overlay (`attn_overlays/`): the map resampled (nearest, so every token stays a block) onto the photograph at
  its own size and aspect ratio (long side capped at `max_overlay_side`), blended over it; cells that are not
  keys of the query are dimmed; the query's pixel box is outlined in cyan and black.

In both, the picture sits at the top-left and a legend strip (title, colour bar, what the colours mean) is
appended below it. Colours are linear from 0 to the map's maximum (the legend prints that maximum).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from sam2_layerwise.render import colors
from sam2_layerwise.render.maps import AttentionMap, real_max
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_save_png, link_or_copy

log = logging.getLogger(__name__)

_IN_FLIGHT = 8
QUERY_RGB, EDGE_RGB, WINDOW_RGB, MARK_RGB = (0, 255, 255), (0, 0, 0), (255, 255, 255), (0, 255, 255)


@dataclass(frozen=True)
class RenderOptions:
    """How attention is drawn; written into the summary (`render`).

    images / overlays: write `attn_images/` / `attn_overlays/`. cmap: a matplotlib colormap name.
    overlay_alpha: weight of the colour over the photograph. dim: brightness of photograph cells that are not
    keys of the query. max_image_side / max_overlay_side: pixel caps. png_level: zlib level (speed vs size).
    """

    images: bool = True
    overlays: bool = False
    cmap: str = "plasma"
    overlay_alpha: float = 0.6
    dim: float = 0.35
    max_image_side: int = 512
    max_overlay_side: int = 1024
    png_level: int = 1

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Rendered:
    """What one map became on disk (run-relative paths) and what top-k ranks."""

    map: AttentionMap
    image: str | None = None
    overlay: str | None = None

    @property
    def path(self) -> str:
        """The picture a top-k line points to: the overlay when there is one, else the attention image."""
        return self.overlay or self.image


@dataclass
class RenderResult:
    rendered: list[Rendered] = field(default_factory=list)
    files: dict = field(default_factory=dict)

    def by_record(self) -> dict[tuple[str, int], dict[str, list[str]]]:
        """(layer_key, call_index) -> {"attn_images": [...], "attn_overlays": [...]} for the summary."""
        out: dict = {}
        for r in self.rendered:
            d = out.setdefault((r.map.layer_key, r.map.call_index), {})
            if r.image:
                d.setdefault("attn_images", []).append(r.image)
            if r.overlay:
                d.setdefault("attn_overlays", []).append(r.overlay)
        return out


# -- drawing ------------------------------------------------------------------------------------------
def _outline(draw: ImageDraw.ImageDraw, box, color, width: int = 2, edge: bool = True) -> None:
    """A rectangle outline [x0, y0, x1, y1) drawn just outside `box`, with a thin black edge around it. The box
    is clipped to just beyond the picture first (a box read back from a damaged run may hold any number)."""
    w, h = draw.im.size
    pad = width + 2
    x0, x1 = (min(max(v, -pad), w + pad) for v in box[0::2])
    y0, y1 = (min(max(v, -pad), h + pad) for v in box[1::2])
    for i in range(width):
        draw.rectangle([x0 - 1 - i, y0 - 1 - i, x1 + i, y1 + i], outline=color)
    if edge:
        draw.rectangle([x0 - 1 - width, y0 - 1 - width, x1 + width, y1 + width], outline=EDGE_RGB)


def _mark(draw: ImageDraw.ImageDraw, x: float, y: float, r: int) -> None:
    draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=EDGE_RGB, width=1)
    draw.ellipse([x - r, y - r, x + r, y + r], outline=MARK_RGB, width=2)


def _vmax(m: AttentionMap) -> float:
    """The top of the colour scale: the map's maximum over its real (non-padding) cells, 0 when there is none
    (or the scale the map shares with others, `m.vmax`)."""
    if m.vmax is not None:
        return m.vmax
    v = real_max(m.grid, m.real_hw)
    return v if np.isfinite(v) else 0.0


def attention_image(m: AttentionMap, opts: RenderOptions) -> Image.Image:
    """The map on its key grid (display "grid") or as a row of token cells (display "tokens")."""
    if m.display == "tokens":
        return _token_image(m, opts)
    gh, gw = m.grid.shape
    vmax = _vmax(m)
    rgb, _ = colors.colorize(m.grid, opts.cmap, vmax)  # [gh, gw, 3]
    s = max(1, opts.max_image_side // max(gh, gw))
    img = Image.fromarray(rgb).resize((gw * s, gh * s), Image.NEAREST)
    if max(img.size) > opts.max_image_side:  # grids larger than the cap: shrink (still nearest)
        f = opts.max_image_side / max(img.size)
        img, s = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.NEAREST), s * f
    draw = ImageDraw.Draw(img)
    rh, rw = m.real_hw
    if (rh, rw) != (gh, gw):  # window padding: keys without pixels, beyond this line
        draw.line([(0, rh * s), (rw * s, rh * s), (rw * s, 0)], fill=WINDOW_RGB, width=1)
    if m.window:
        r0, r1, c0, c1 = m.window
        draw.rectangle([c0 * s, r0 * s, c1 * s - 1, r1 * s - 1], outline=WINDOW_RGB, width=1)
    if m.query_cells:
        r0, r1, c0, c1 = m.query_cells
        _outline(draw, (c0 * s, r0 * s, c1 * s, r1 * s), QUERY_RGB, width=max(1, min(2, int(s) // 2)))
    strip = colors.legend_strip(img.width, m.title, opts.cmap, vmax, m.quantity,
                                not_a_key="grey" if m.window else None)
    return colors.stack(img, strip)


def _token_image(m: AttentionMap, opts: RenderOptions) -> Image.Image:
    """Decoder token keys: one coloured cell per token, its role and value written under it."""
    n = len(m.token_values)
    vmax = float(m.token_values.max())
    rgb, _ = colors.colorize(m.token_values.reshape(1, n).astype(np.float32), opts.cmap, vmax)
    cell = max(48, min(96, opts.max_image_side // max(n, 1)))
    fnt = colors.font(11)
    img = Image.new("RGB", (cell * n, cell + 34), colors.LEGEND_BG)
    img.paste(Image.fromarray(rgb).resize((cell * n, cell), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(img)
    for j, (role, v) in enumerate(zip(m.token_roles, m.token_values)):
        draw.line([(j * cell, 0), (j * cell, cell)], fill=colors.LEGEND_BG)
        draw.text((j * cell + 3, cell + 3), role[:10], fill=colors.LEGEND_FG, font=fnt)
        draw.text((j * cell + 3, cell + 18), f"{v:.3f}", fill=colors.LEGEND_FG, font=fnt)
    strip = colors.legend_strip(img.width, m.title, opts.cmap, vmax, m.quantity)
    return colors.stack(img, strip)


def fit_photo(photo: np.ndarray, max_side: int) -> tuple[Image.Image, tuple[float, float]]:
    """HWC uint8 photo -> (PIL image with long side <= max_side, (sx, sy) its pixels per original pixel)."""
    img = Image.fromarray(photo)
    if img.mode != "RGB":  # grey (H x W), grey + alpha or RGBA (H x W x 4): blended with RGB colour, so RGB
        img = img.convert("RGB")
    h, w = photo.shape[:2]
    s = min(1.0, max_side / max(w, h))
    if s < 1.0:
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    return img, (img.width / w, img.height / h)


def overlay_image(m: AttentionMap, photo: Image.Image, scale: tuple[float, float], opts: RenderOptions) -> Image.Image:
    """The map blended over `photo` (already fitted; `scale` = (sx, sy), its pixels per original pixel).

    Key-grid cell (r, c) of the real grid (h, w) covers [c·W/w, (c+1)·W/w) × [r·H/h, (r+1)·H/h) of the W×H
    photograph; nearest resampling of the grid to W×H puts every pixel whose centre lies in that box there.
    """
    rh, rw = m.real_hw
    real = m.grid[:rh, :rw]  # [h, w]; padding cells have no pixels
    vmax = _vmax(m)
    rgb, valid = colors.colorize(real, opts.cmap, vmax)
    W, H = photo.size
    heat = Image.fromarray(rgb).resize((W, H), Image.NEAREST)  # every token a block of pixels
    keys = Image.fromarray(valid.astype(np.uint8) * 255).resize((W, H), Image.NEAREST)  # 'L' mask [H, W]
    img = Image.blend(photo, heat, opts.overlay_alpha)  # photo * (1 - alpha) + colour * alpha
    if not valid.all():
        img = Image.composite(img, photo.point(lambda v: v * opts.dim), keys)
    draw = ImageDraw.Draw(img)
    sx, sy = scale
    if m.query_box:
        x0, y0, x1, y1 = m.query_box
        _outline(draw, (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)), QUERY_RGB)
    for x, y in m.marks:
        _mark(draw, x * sx, y * sy, max(4, round(min(W, H) / 60)))
    strip = colors.legend_strip(img.width, m.title, opts.cmap, vmax, m.quantity,
                                not_a_key="dimmed" if not valid.all() else None)
    return colors.stack(img, strip)


# -- writing ------------------------------------------------------------------------------------------
def _write(pool: ThreadPoolExecutor, jobs: list, writer, folder: str, m: AttentionMap, img: Image.Image,
           level: int) -> str:
    """`<folder>/by_layer/<layer>/<name>.png`, hard-linked as `<folder>/all/<name>.png`. Returns the first.

    PNG encoding runs in `pool` (Pillow releases the GIL while it compresses); drawing stays in this thread.
    """
    rel = f"{folder}/by_layer/{m.layer_dir}/{m.name}.png"
    path, flat = writer.path(rel), writer.path(f"{folder}/all/{m.name}.png")

    def job():
        atomic_save_png(img, path, compress_level=level)
        link_or_copy(path, flat)
    jobs.append(pool.submit(job))
    if len(jobs) > _IN_FLIGHT:  # bound the pictures waiting in memory
        jobs[-_IN_FLIGHT - 1].result()
    return rel


def _draw_one(m: AttentionMap, names: set, opts: RenderOptions, writer, pool, jobs, fitted, scale,
              result: RenderResult) -> None:
    base, i = m.name, 1
    while m.name in names:  # two labels on one token: keep both pictures
        i += 1
        m.name = f"{base}_{i}"
    names.add(m.name)
    r = Rendered(m)
    if opts.images:
        r.image = _write(pool, jobs, writer, layout.ATTN_IMAGES, m, attention_image(m, opts), opts.png_level)
    if opts.overlays and m.display == "grid":
        r.overlay = _write(pool, jobs, writer, layout.ATTN_OVERLAYS, m, overlay_image(m, fitted, scale, opts),
                           opts.png_level)
    if r.path:
        result.rendered.append(r)


def render_maps(maps: list[AttentionMap], photo: np.ndarray, opts: RenderOptions, writer) -> RenderResult:
    """Draw and write every map: attention images when `opts.images`, overlays (grid maps only) when
    `opts.overlays`. `photo`: HWC uint8 original photograph. `writer`: a RunWriter (files are staged)."""
    result = RenderResult()
    fitted, scale = fit_photo(photo, opts.max_overlay_side) if opts.overlays else (None, (1.0, 1.0))
    names: set[str] = set()
    jobs: list = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for m in maps:
            _draw_one(m, names, opts, writer, pool, jobs, fitted, scale, result)
        for job in jobs:
            job.result()  # re-raise the first failed write
    if opts.images and any(r.image for r in result.rendered):
        result.files[layout.ATTN_IMAGES] = f"{layout.ATTN_IMAGES}/"
    if opts.overlays and any(r.overlay for r in result.rendered):
        result.files[layout.ATTN_OVERLAYS] = f"{layout.ATTN_OVERLAYS}/"
    return result

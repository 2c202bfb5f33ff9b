"""Geometry on the pictures themselves: the hottest overlay pixel sits on the key the captured map puts highest.

The expected pixel box is derived here from the record's probabilities and the token arithmetic written out
(SAM 2 resizes W x H to a square, so key-grid cell (r, c) of an h x w grid covers
[c W/w, (c+1) W/w) x [r H/h, (r+1) H/h) of the photograph); the renderer's own mapping is not used.
Overlays are drawn with alpha 1 so a coloured pixel is exactly a colormap entry and can be read back.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts
from sam2_layerwise.render.attention import RenderOptions
from sam2_layerwise.render.maps import MapOptions
from sam2_layerwise.render.run import RenderPlan, render_capture
from sam2_layerwise.store.layout import RunWriter

CLICK = (220, 150)  # on the cat's nose, chelsea.png (451 x 300)
LAYERS = {
    "windowed": "image_encoder_trunk_blocks_0",
    "q-pooled": "image_encoder_trunk_blocks_1",
    "global": "image_encoder_trunk_blocks_4",
    "decoder": "sam_mask_decoder_transformer_final_attn_token_to_image",
}
CMAP = "plasma"


def _render(tmp_path, model, photo, click, name):
    h, w = photo.shape[:2]
    prompts = parse_prompts([*click, 1], None, [w * 0.85, h * 0.2], w, h)
    cap = capture_image(model, photo, prompts, CaptureOptions(max_attn_queries=2, keep_qkv=True))
    plan = RenderPlan(RenderOptions(images=True, overlays=True, cmap=CMAP, overlay_alpha=1.0), MapOptions(max_queries=2))
    out = tmp_path / name
    with RunWriter(out) as writer:
        render_capture(writer, cap, photo, plan)
    return cap, out


@pytest.fixture(scope="module")
def chelsea_run(tmp_path_factory, tiny_model, chelsea):
    return _render(tmp_path_factory.mktemp("geo"), tiny_model, chelsea, CLICK, "chelsea")


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, tiny_model, coffee):
    """A photograph larger than the overlay cap (2400 x 1600): overlays are scaled to a 1024 px long side."""
    big = np.asarray(Image.fromarray(coffee).resize((2400, 1600), Image.BILINEAR))
    return _render(tmp_path_factory.mktemp("geo"), tiny_model, big, (1300, 700), "big")


def _lut_index(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] colormap index where the colour is exactly a colormap entry, else -1."""
    lut = matplotlib.colormaps[CMAP](np.arange(256), bytes=True)[:, :3].astype(np.int64)
    codes = (lut[:, 0] << 16) | (lut[:, 1] << 8) | lut[:, 2]
    assert len(set(codes.tolist())) == 256
    order = np.argsort(codes)
    px = rgb.astype(np.int64)
    c = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    pos = np.clip(np.searchsorted(codes[order], c), 0, 255)
    return np.where(codes[order][pos] == c, order[pos], -1)


def _expected(rec, W, H):
    """Boxes (original pixels) of the top-coloured keys and of the argmax key of the first query."""
    q = rec.queries[0]
    p = rec.probs[0].mean(0).numpy()  # [keys] head mean
    r0, r1, c0, c1 = q.key_block
    bw = c1 - c0
    gh, gw = rec.geometry["key_grid_hw"]

    def box(j):
        r, c = r0 + j // bw, c0 + j % bw
        return (c * W / gw, r * H / gh, (c + 1) * W / gw, (r + 1) * H / gh)

    x = p / p.max()
    top = [j for j in range(len(p)) if min(int(x[j] * 256), 255) == 255]  # keys drawn in the top colour
    window = (c0 * W / gw, r0 * H / gh, min(c1, gw) * W / gw, min(r1, gh) * H / gh)
    return q, [box(j) for j in top], box(int(np.argmax(p))), window


def _inside(xs, ys, box, s=(1.0, 1.0)):
    """Pixel centres (in the picture, scaled by s = (sx, sy) from original pixels) inside an original-pixel box;
    a centre exactly on an edge (up to float rounding) counts as inside either neighbour."""
    x0, y0, x1, y1 = box[0] * s[0], box[1] * s[1], box[2] * s[0], box[3] * s[1]
    e = 1e-3
    return (xs + 0.5 >= x0 - e) & (xs + 0.5 <= x1 + e) & (ys + 0.5 >= y0 - e) & (ys + 0.5 <= y1 + e)


@pytest.mark.parametrize("which", list(LAYERS))
@pytest.mark.parametrize("run_name", ["chelsea_run", "big_run"])
def test_hottest_overlay_pixel_is_on_the_top_key(request, which, run_name):
    cap, out = request.getfixturevalue(run_name)
    key = LAYERS[which]
    rec = cap.record(key)
    W, H = cap.frame.orig_w, cap.frame.orig_h
    f = min(1.0, RenderOptions().max_overlay_side / max(W, H))
    Wp, Hp = round(W * f), round(H * f)  # the photograph, long side capped
    s = (Wp / W, Hp / H)
    q, top_boxes, argmax_box, window = _expected(rec, W, H)
    png = Image.open(out / "attn_overlays" / "by_layer" / key / f"{key}__{q.label}__mean.png").convert("RGB")
    assert png.width == Wp and png.height > Hp  # the photograph's own size and aspect, legend below
    idx = _lut_index(np.asarray(png)[:Hp, :Wp])
    ys, xs = np.nonzero(idx == idx.max())
    assert idx.max() == 255 and len(xs) > 0
    in_top = np.zeros(len(xs), bool)
    for b in top_boxes:
        in_top |= _inside(xs, ys, b, s)
    assert in_top.all(), f"{which}: hottest pixels outside the top keys' boxes"
    assert _inside(xs, ys, argmax_box, s).any()
    # every coloured pixel lies in the query's key block (a window lights up only its own place)
    ys_all, xs_all = np.nonzero(idx >= 0)
    assert _inside(xs_all, ys_all, window, s).all()
    if which == "windowed":
        assert len(xs_all) < 0.25 * Wp * Hp  # one 8x8 window of a 32x32 grid: a sixteenth of the photo
    if which in ("global", "decoder"):
        assert len(xs_all) > 0.9 * Wp * Hp  # (minus the query marker)


def test_qpool_query_marker_covers_its_2x2_source_tokens(chelsea_run):
    cap, out = chelsea_run
    key = LAYERS["q-pooled"]
    rec = cap.record(key)
    q = rec.queries[0]
    W, H = cap.frame.orig_w, cap.frame.orig_h
    gh, gw = rec.geometry["key_grid_hw"]  # 32 x 32 keys; queries on a 16 x 16 grid
    sr0, sr1, sc0, sc1 = q.source_cells
    assert (sr1 - sr0, sc1 - sc0) == (2, 2)
    qr, qc = q.cell
    assert (sr0, sc0) == (2 * qr, 2 * qc)
    x0, y0, x1, y1 = sc0 * W / gw, sr0 * H / gh, sc1 * W / gw, sr1 * H / gh
    png = np.asarray(Image.open(out / "attn_overlays" / "by_layer" / key / f"{key}__{q.label}__mean.png").convert("RGB"))
    ys, xs = np.nonzero(np.all(png[:H, :W] == (0, 255, 255), axis=-1))  # the cyan query outline
    assert len(xs) > 0
    # drawn just outside the box [x0, x1) x [y0, y1), at most 3 px away from it on every side
    assert x0 - 4 <= xs.min() < x0 and x1 <= xs.max() <= x1 + 3
    assert y0 - 4 <= ys.min() < y0 and y1 <= ys.max() <= y1 + 3
    inside = (xs >= round(x0)) & (xs < round(x1)) & (ys >= round(y0)) & (ys < round(y1))
    assert not inside.any()  # no cyan on the query's own pixels


def test_attention_image_places_the_window_on_the_whole_grid(chelsea_run):
    """The attention image is the key grid itself: the window's cells coloured, the rest grey."""
    cap, out = chelsea_run
    key = LAYERS["windowed"]
    rec = cap.record(key)
    q = rec.queries[0]
    gh, gw = rec.geometry["key_grid_hw"]
    png = np.asarray(Image.open(out / "attn_images" / "by_layer" / key / f"{key}__{q.label}__mean.png").convert("RGB"))
    idx = _lut_index(png)
    grey = np.all(png == (48, 48, 48), axis=-1)
    grid_px = grey | (idx >= 0)
    side = int(np.argmin(grid_px[0])) or png.shape[1]  # the grid picture is square and starts at the top-left
    cell = side / gw
    assert not grid_px[side, :side].all()
    assert cell == int(cell) and side <= 512
    r0, r1, c0, c1 = q.key_block
    ys_c, xs_c = np.nonzero(idx[:side, :side] >= 0)
    assert xs_c.min() >= c0 * cell and xs_c.max() < c1 * cell and ys_c.min() >= r0 * cell and ys_c.max() < r1 * cell
    p = rec.probs[0].mean(0).numpy()
    j = int(np.argmax(p))
    r, c = r0 + j // (c1 - c0), c0 + j % (c1 - c0)
    hot_y, hot_x = np.nonzero(idx[:side, :side] == 255)
    assert ((hot_x // cell == c) & (hot_y // cell == r)).any()


def test_per_head_maps_average_to_the_head_mean(chelsea_run):
    from sam2_layerwise.render.maps import RecordView, build_maps

    cap, _ = chelsea_run
    rec = cap.record(LAYERS["global"])
    maps = build_maps(RecordView.from_record(rec), cap.frame, MapOptions(max_queries=1, per_head=True))
    assert [m.name.rsplit("__", 1)[1] for m in maps] == ["mean"] + [f"h{h:02d}" for h in range(rec.heads)]
    assert np.allclose(np.mean([m.grid for m in maps[1:]], axis=0), maps[0].grid, atol=1e-7)


def test_image_to_token_map_shows_which_pixels_attend_to_the_token(chelsea_run):
    """`to_point0`: at each image token, the share of its attention that goes to the point token; at the click's
    own token that share is what the capture recorded for the click query."""
    from sam2_layerwise.render.maps import RecordView, build_maps

    cap, _ = chelsea_run
    rec = cap.record("sam_mask_decoder_transformer_layers_0_cross_attn_image_to_token")
    maps = {m.label: m for m in build_maps(RecordView.from_record(rec), cap.frame, MapOptions(max_queries=2),
                                           prompts=cap.prompts)}
    roles = rec.geometry["key_roles"]
    t = roles.index("point0")
    q, k = rec.qkv["q"][0].double(), rec.qkv["k"][0].double()  # [heads, 64 image tokens, d], [heads, tokens, d]
    share = torch.softmax(q @ k.transpose(-1, -2) * rec.qkv["scale"], -1).mean(0)[:, t]  # [64]
    gh, gw = rec.geometry["query_grid_hw"]
    assert np.allclose(maps["to_point0"].grid, share.reshape(gh, gw).numpy(), atol=1e-6)
    click = rec.queries[0]
    r, c = click.cell
    assert maps["to_point0"].grid[r, c] == pytest.approx(rec.probs[0, :, t].mean().item(), abs=1e-6)
    assert maps["to_point0"].marks == [tuple(float(v) for v in CLICK)]

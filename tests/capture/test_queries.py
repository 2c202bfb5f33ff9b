"""The click's token, at each layer's own resolution and inside its own window, derived independently
with SAM 2's own window_partition on a grid of token ids."""

from __future__ import annotations

import math

import pytest
import torch
from sam2.modeling.backbones.utils import window_partition

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts

# (x, y) clicks on the 451 x 300 photo: centre, near the bottom-right corner (window padding at 160 px), top-left.
CLICKS = [(220.0, 150.0), (447.0, 297.0), (3.0, 2.0)]


def _expected(block, in_h, in_w, qh, qw, x, y, W, H):
    """(group, index) of the query covering original pixel (x, y), via window_partition on token ids."""
    q_stride = block.q_stride[0] if block.q_stride else 1
    row, col = math.floor(y * qh / H), math.floor(x * qw / W)  # query-grid cell (SAM 2 scales x and y separately)
    ids = (torch.arange(in_h * in_w, dtype=torch.float32) + 1).reshape(1, in_h, in_w, 1)
    if q_stride > 1:  # a pooled query is the max over its 2x2 sources: its id is the bottom-right source's
        target = (row * q_stride + q_stride - 1) * in_w + (col * q_stride + q_stride - 1) + 1
    else:
        target = row * in_w + col + 1
    if block.window_size:
        win, _ = window_partition(ids, block.window_size)  # [G, ws, ws, 1]
    else:
        win = ids
    if q_stride > 1:
        win = torch.nn.functional.max_pool2d(win.permute(0, 3, 1, 2), q_stride).permute(0, 2, 3, 1)
    flat = win.reshape(win.shape[0], -1)
    hits = (flat == target).nonzero().tolist()
    assert len(hits) == 1
    return tuple(hits[0]), (row, col)


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny160_model"])
def test_click_maps_to_its_token_in_every_hiera_block(request, model_name, chelsea):
    model = request.getfixturevalue(model_name)
    H, W = chelsea.shape[:2]
    pts = [v for x, y in CLICKS for v in (x, y, 1)]
    cap = capture_image(model, chelsea, parse_prompts(pts, None, None, W, H), CaptureOptions(max_attn_queries=3))
    kinds = set()
    for r in cap.attention:
        if not r.kind.startswith("hiera"):
            continue
        kinds.add(r.kind)
        block = model.image_encoder.trunk.blocks[int(r.layer_key.rsplit("_", 1)[1])]
        in_h, in_w = r.geometry["key_grid_hw"]
        qh, qw = r.geometry["query_grid_hw"]
        assert len(r.queries) == 3
        for spec, (x, y) in zip(r.queries, CLICKS):
            (group, index), cell = _expected(block, in_h, in_w, qh, qw, x, y, W, H)
            assert (spec.group, spec.index) == (group, index), (r.layer_key, spec)
            assert tuple(spec.cell) == cell
            x0, y0, x1, y1 = spec.pixel_box
            assert x0 <= x < x1 and y0 <= y < y1
    assert kinds == {"hiera_windowed", "hiera_qpool", "hiera_global"}


def test_selected_q_is_the_blocks_own_projection_at_the_click(tiny160_model, chelsea):
    """The q row captured for the click equals norm1 -> qkv of the block input at that token (max-pooled over
    the 2x2 sources in q-pool blocks): the capture saw exactly what the kernel saw."""
    model = tiny160_model
    H, W = chelsea.shape[:2]
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone()))
             for i, b in enumerate(model.image_encoder.trunk.blocks)]
    try:
        cap = capture_image(model, chelsea, parse_prompts([447, 297, 1], None, None, W, H), CaptureOptions(keep_qkv=True))
    finally:
        for h in hooks:
            h.remove()
    for i, block in enumerate(model.image_encoder.trunk.blocks):
        r = cap.record(f"image_encoder_trunk_blocks_{i}")
        spec = r.queries[0]
        attn = block.attn
        with torch.no_grad():
            x = block.norm1(inputs[i])  # [1, H, W, C]
            qkv = attn.qkv(x).reshape(*x.shape[:3], 3, attn.num_heads, -1)
        s = block.q_stride[0] if block.q_stride else 1
        row, col = spec.cell
        src = qkv[0, row * s:(row + 1) * s, col * s:(col + 1) * s, 0]  # [s, s, heads, hd]
        expected_q = src.amax(dim=(0, 1))  # max-pool (identity when s == 1)
        got = r.qkv["q"][r.qkv["groups"].index(spec.group), :, spec.index]
        torch.testing.assert_close(got, expected_q, atol=1e-6, rtol=1e-6)
        # and its keys: the key block of its window, in row-major order (zero-padded input outside the grid)
        r0, r1, c0, c1 = spec.key_block
        xp = torch.nn.functional.pad(x, (0, 0, 0, max(0, c1 - x.shape[2]), 0, max(0, r1 - x.shape[1])))
        with torch.no_grad():
            kk = attn.qkv(xp[0, r0:r1, c0:c1]).reshape(-1, 3, attn.num_heads, attn.qkv.out_features // 3 // attn.num_heads)[:, 1]
        torch.testing.assert_close(r.qkv["k"][r.qkv["groups"].index(spec.group)], kk.transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_decoder_queries_are_named_by_role(tiny_model, chelsea):
    H, W = chelsea.shape[:2]
    prompts = parse_prompts([220, 150, 1, 30, 30, 0], [300, 20, 440, 120], None, W, H)
    cap = capture_image(tiny_model, chelsea, prompts, CaptureOptions(max_attn_queries=20))
    rec = cap.record("sam_mask_decoder_transformer_final_attn_token_to_image")
    roles = rec.geometry["query_roles"]
    assert roles == ["obj_score", "iou", "mask0", "mask1", "mask2", "mask3", "box_corner0", "box_corner1",
                     "point0", "point1", "padding"]
    assert rec.q_shape[2] == len(roles)
    assert [q.label for q in rec.queries][:2] == ["point0", "point1"]  # the clicks' tokens come first
    assert all(roles[q.index] == q.label for q in rec.queries)
    i2t = cap.record("sam_mask_decoder_transformer_layers_0_cross_attn_image_to_token")
    assert i2t.geometry["key_roles"] == roles
    # image->token queries are the image tokens under the clicks, then the box centre, on the 8x8 decoder grid
    assert [q.label for q in i2t.queries] == ["click0", "click1", "box_center"]
    assert i2t.queries[0].index == math.floor(150 * 8 / H) * 8 + math.floor(220 * 8 / W)


def test_max_attn_queries_bounds_selection(tiny_model, chelsea):
    H, W = chelsea.shape[:2]
    prompts = parse_prompts([220, 150, 1], None, [10, 10, 400, 20, 100, 250], W, H)
    cap = capture_image(tiny_model, chelsea, prompts, CaptureOptions(max_attn_queries=2))
    for r in cap.attention:
        assert len(r.queries) <= 2 and r.probs.shape[0] == len(r.queries)
    assert [q.label for q in cap.record("image_encoder_trunk_blocks_0").queries] == ["click0", "query0"]

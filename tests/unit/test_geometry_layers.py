"""Geometry arithmetic, layer selection and config-name resolution."""

from __future__ import annotations

import pytest
import torch
from sam2.modeling.backbones.utils import window_partition

from sam2_layerwise.errors import InputError, ModelError
from sam2_layerwise.geometry import HieraLayerGeometry, ImageFrame
from sam2_layerwise.layers import expand, select
from sam2_layerwise.model.loading import official_id, resolve_config


def test_frame_scales_axes_separately():
    f = ImageFrame(orig_w=640, orig_h=480, image_size=1024)
    assert f.to_input(320, 240) == (512.0, 512.0)
    assert f.token_at(320, 240, 64, 64) == (32, 32)
    assert f.token_at(639.9, 479.9, 64, 64) == (63, 63)
    assert f.token_box(0, 0, 64, 64) == [0.0, 0.0, 10.0, 7.5]  # 16 input px = 10 px wide, 7.5 px high


def test_click_on_a_token_edge_is_in_the_token_that_starts_there():
    """x = 49 on a 98-pixel image is input pixel 64.0 of 128, the first pixel of token 16 of 32 (rounding
    128 / 98 first gave 63.99999999999999, token 15)."""
    f = ImageFrame(orig_w=98, orig_h=392, image_size=128)
    assert f.token_at(49, 196, 32, 32) == (16, 16)
    assert f.token_box(16, 16, 32, 32) == [49.0, 196.0, 52.0625, 208.25]
    assert f.token_at(48.999, 195.999, 32, 32) == (15, 15)


@pytest.mark.parametrize("size, grid", [(1024, 64), (1024, 256), (128, 32), (1008, 72)])
def test_every_whole_pixel_lies_in_the_box_of_its_token(size, grid):
    """For every width up to 400 and every whole pixel x: the token is floor(x * grid / width) exactly, and
    its pixel box holds x (the box's left edge is x itself when x starts the token)."""
    for width in range(1, 401):
        f = ImageFrame(orig_w=width, orig_h=width, image_size=size)
        for x in range(width):
            row, col = f.token_at(x, x, grid, grid)
            assert row == col == x * grid // width, (width, x)
            x0, _, x1, _ = f.token_box(row, col, grid, grid)
            assert x0 <= x < x1, (width, x, x0, x1)


@pytest.mark.parametrize("h, w, window", [(70, 70, 14), (64, 64, 14), (32, 32, 7), (10, 12, 4)])
def test_key_cells_follow_window_partition(h, w, window):
    """key_cell(group, j) agrees with SAM 2's own window_partition for padded grids too."""
    geo = HieraLayerGeometry(batch=1, in_h=h, in_w=w, window=window, q_stride=1)
    ids = (torch.arange(h * w) + 1).float().reshape(1, h, w, 1)
    win, (hp, wp) = window_partition(ids, window)
    assert list(geo.padded_hw) == [hp, wp] and geo.groups == win.shape[0]
    flat = win.reshape(win.shape[0], -1)
    for g in range(geo.groups):
        for j in range(geo.keys_per_group):
            r, c = geo.key_cell(g, j)
            expected = 0 if geo.is_padding_key(r, c) else r * w + c + 1
            assert flat[g, j].item() == expected
            if not geo.is_padding_key(r, c):
                assert geo.locate_query(r, c) == (g, j)


def test_layer_ranges_and_globs():
    keys = [f"image_encoder_trunk_blocks_{i}" for i in range(24)] + ["sam_mask_decoder_transformer_layers_0_self_attn"]
    rng, glob = expand("image_encoder_trunk_blocks_0:2,x*")
    assert (rng.prefix, rng.a, rng.b, rng.suffix, glob) == ("image_encoder_trunk_blocks_", 0, 2, "", "x*")
    assert select(keys, "image_encoder_trunk_blocks_0:2") == keys[:3]
    assert select(keys, "image_encoder_trunk_blocks_1:2*") == [keys[1], keys[2]] + keys[10:24]  # 1*, 2*: as globs
    assert select(keys, "image_encoder_trunk_blocks_21:23") == keys[21:24]
    assert select(keys, "*self_attn,image_encoder_trunk_blocks_3") == [keys[3], keys[24]]
    assert select(keys, None) == keys
    with pytest.raises(InputError, match="--layers.*'image_encoder_trunk_blocks_24' matches no layer"):
        select(keys, "image_encoder_trunk_blocks_22:30")
    with pytest.raises(InputError, match="backwards"):
        expand("blocks_5:2")


def test_config_names_resolve():
    for name in ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_b+.yaml",
                 "sam2.1_hiera_b+"):
        assert resolve_config(name).name == "sam2.1_hiera_b+.yaml"
    assert resolve_config("configs/sam2/sam2_hiera_b+.yaml").parent.name == "sam2"
    with pytest.raises(ModelError, match="close names: .*sam2.1_hiera_l.yaml"):
        resolve_config("configs/sam2.1/sam2.1_hiera_ll.yaml")
    assert official_id("facebook/sam2.1-hiera-base-plus") == "sam2.1_hiera_base_plus"
    assert official_id("sam2_hiera_tiny") == "sam2_hiera_tiny" and official_id("sam3") is None

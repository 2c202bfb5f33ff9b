"""Rendering pieces without a model: colormap lookup, pooled maps, decoder token order, legends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sam2_layerwise.capture.attention import pool_keys
from sam2_layerwise.errors import InputError
from sam2_layerwise.inputs import Point, Prompts
from sam2_layerwise.render import colors
from sam2_layerwise.render.attention import RenderOptions, attention_image, fit_photo, overlay_image
from sam2_layerwise.render.maps import AttentionMap, place_on_grid, probs_transformed, role_position, token_priority


def test_check_cmap_accepts_every_matplotlib_name_and_suggests_close_ones():
    assert colors.check_cmap("plasma").name == "plasma"
    assert colors.check_cmap("viridis_r").name == "viridis_r"
    with pytest.raises(InputError) as e:
        colors.check_cmap("Magma")
    msg = str(e.value)
    assert msg.startswith("--cmap Magma: unknown matplotlib colormap; close names: ") and "magma" in msg
    assert "\n" not in msg


def test_pooled_keys_spread_back_to_tokens_sum_to_one():
    """10x10 keys pooled 3x3 (edge cells hold fewer tokens): every token gets its cell's mean, total stays 1."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(1, 100) * 3, -1)
    pooled, info = pool_keys(p, (10, 10), 16)
    assert info["factor"] == 3 and info["pooled_hw"] == [4, 4]
    grid = place_on_grid(pooled[0].numpy(), [2, 12, 0, 10], (14, 10), info)  # block placed at rows 2..12
    assert np.isnan(grid[:2]).all() and np.isnan(grid[12:]).all()
    assert np.nansum(grid) == pytest.approx(1.0, abs=1e-6)
    exact = p[0].reshape(10, 10).numpy()
    assert grid[11, 9] == pytest.approx(exact[9, 9], rel=1e-6)  # a corner cell of one token is that token
    assert grid[2, 0] == pytest.approx(exact[:3, :3].mean(), rel=1e-5)


def test_decoder_token_order_and_places():
    roles = ["obj_score", "iou", "mask0", "mask1", "mask2", "mask3", "box_corner0", "box_corner1", "point0", "padding"]
    order = [roles[i] for i in token_priority(roles)]
    assert order[:5] == ["point0", "mask0", "mask1", "mask2", "mask3"] and order[-1] == "padding"
    prompts = Prompts(points=[Point(10, 20, 1)], box=(1, 2, 30, 40))
    assert role_position("point0", prompts) == (10, 20)
    assert role_position("box_corner1", prompts) == (30, 40)
    assert role_position("mask0", prompts) is None


def test_probs_transformed_reads_the_quantization_report():
    assert not probs_transformed(None)
    assert not probs_transformed({"float": True, "float_sites": []})
    assert not probs_transformed({"float": False, "kernel": {"q": {}, "k": {}}, "layers": {}})
    assert probs_transformed({"float": False, "kernel": {"probs": {"bits": 8}}, "layers": {}})


def _map(grid, window=None, real_hw=None):
    return AttentionMap(layer_key="L", kind="hiera_windowed", call_index=0, name="L__q__mean", label="q", title="t",
                        quantity="p", display="grid", head=None, score=float(np.nanmax(grid)), peak="",
                        grid=grid, real_hw=real_hw or grid.shape, window=window, query_box=[0, 0, 5, 5])


def test_pictures_stay_bounded():
    grid = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    img = attention_image(_map(grid), RenderOptions())
    assert img.width == 512 and img.height < 512 + 120
    huge = np.zeros((3000, 5000, 3), np.uint8)
    photo, scale = fit_photo(huge, 1024)
    assert photo.size == (1024, 614) and scale == (1024 / 5000, 614 / 3000)
    ov = overlay_image(_map(grid), photo, scale, RenderOptions())
    assert ov.width == 1024 and 614 < ov.height < 614 + 120


def test_overlay_dims_cells_that_are_not_keys():
    grid = np.full((4, 4), np.nan, np.float32)
    grid[:2, :2] = [[0.1, 0.2], [0.3, 0.4]]
    photo = Image.new("RGB", (40, 40), (200, 200, 200))
    ov = np.asarray(overlay_image(_map(grid, window=[0, 2, 0, 2]), photo, (1.0, 1.0), RenderOptions(dim=0.5)))
    assert (ov[30, 30] == 100).all()  # outside the window: the photo at half brightness
    assert not (ov[15, 15] == 200).all() and not (ov[15, 15] == 100).all()  # inside: blended with a colour

"""The real b+ architecture at 1024 (random weights, saved and loaded as a SAM 2 checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest

from sam2_layerwise import CaptureOptions, build_model, capture_image, parse_prompts, run_plain
from sam2_layerwise.model import save_checkpoint

pytestmark = pytest.mark.slow


def test_bplus_capture_is_faithful_and_changes_nothing(tmp_path, coffee):
    cfg = "configs/sam2/sam2_hiera_b+.yaml"
    ckpt = tmp_path / "bplus_random.pt"
    save_checkpoint(build_model(cfg, random_init=True, device="cpu").model, ckpt)
    model = build_model(cfg, str(ckpt), device="cpu").model
    prompts = parse_prompts([320, 240, 1], None, None, coffee.shape[1], coffee.shape[0])
    plain = run_plain(model, coffee, prompts)
    cap = capture_image(model, coffee, prompts, CaptureOptions(max_attn_queries=2, all_query_stats=False))
    assert np.array_equal(plain.masks, cap.prediction.masks)
    assert np.array_equal(plain.low_res_logits, cap.prediction.low_res_logits)
    assert len(cap.attention) == 24 + 7
    kinds = {}
    for r in cap.attention:
        kinds.setdefault(r.kind, []).append(r.layer_key)
        assert r.module_max_abs_err <= 1e-4 and r.kernel_max_abs_err <= 1e-4, r.layer_key
    assert kinds["hiera_global"] == [f"image_encoder_trunk_blocks_{i}" for i in (12, 16, 20)]
    assert kinds["hiera_qpool"] == [f"image_encoder_trunk_blocks_{i}" for i in (2, 5, 21)]
    g12 = cap.record("image_encoder_trunk_blocks_12")
    assert g12.q_shape == [1, 8, 4096, 56] and tuple(g12.probs.shape) == (1, 8, 4096)  # one click, one query
    w13 = cap.record("image_encoder_trunk_blocks_13")  # 64x64 padded to 70x70: 25 windows of 14x14
    assert w13.geometry["padded_key_grid_hw"] == [70, 70] and w13.q_shape[0] == 25
    # the click (320, 240) on 600x400 -> input (546.1, 614.4) -> stage-3 token (38, 34) -> window (2, 2)
    spec = w13.queries[0]
    assert tuple(spec.cell) == (38, 34) and spec.group == 2 * 5 + 2 and spec.index == (38 - 28) * 14 + (34 - 28)

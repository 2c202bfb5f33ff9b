"""W8A8 vs W4A8 on the real b+ architecture (random weights saved and loaded as a SAM 2 checkpoint).

Runs at image_size 512 (not 1024) to keep it to about four encoder passes on a CPU: float capture, one
calibration image, W8A8 capture, W4A8 capture. The same module tree and kernels run; grids are 128/64/32/16.
"""

from __future__ import annotations

import pytest

from sam2_layerwise import CaptureOptions, build_model, capture_image, parse_prompts
from sam2_layerwise.model import save_checkpoint
from sam2_layerwise.quant import calibrate_model, quantize_model
from tests.quant.helpers import mean_js, mean_mask_iou

pytestmark = pytest.mark.slow
CFG = "configs/sam2.1/sam2.1_hiera_b+.yaml"
SIZE = {"model.image_size": 512}


def test_bplus_w8_changes_attention_less_than_w4(tmp_path, coffee, w8a8_cfg, w4a8_cfg):
    ckpt = tmp_path / "bplus_random.pt"
    save_checkpoint(build_model(CFG, random_init=True, device="cpu", overrides=SIZE).model, ckpt)
    model = build_model(CFG, str(ckpt), device="cpu", overrides=SIZE).model
    assert model.image_size == 512
    prompts = parse_prompts([320, 240, 1], None, None, coffee.shape[1], coffee.shape[0])
    options = CaptureOptions(max_attn_queries=2, all_query_stats=False)
    ref = capture_image(model, coffee, prompts, options)

    qm8 = calibrate_model(model, w8a8_cfg, [coffee])
    try:
        cap8 = capture_image(model, coffee, prompts, options)
    finally:
        qm8.remove()
    # W4A8: the same calibrated activation scales, 4-bit weights (their scales come from the weights)
    acts = {q: p for q, p in qm8.params().items() if not q.endswith(":weight")}
    qm4 = quantize_model(model, w4a8_cfg, acts)
    try:
        cap4 = capture_image(model, coffee, prompts, options)
    finally:
        qm4.remove()

    for cap in (cap8, cap4):
        assert len(cap.attention) == 24 + 7
        for r in cap.attention:
            assert r.kernel_max_abs_err <= 1e-4 and r.module_max_abs_err <= 1e-4, r.layer_key
    js8, js4 = mean_js(ref.attention, cap8.attention), mean_js(ref.attention, cap4.attention)
    iou8, iou4 = mean_mask_iou(ref.prediction, cap8.prediction), mean_mask_iou(ref.prediction, cap4.prediction)
    err8 = abs(cap8.prediction.low_res_logits - ref.prediction.low_res_logits).mean()
    err4 = abs(cap4.prediction.low_res_logits - ref.prediction.low_res_logits).mean()
    print(f"b+@512: JS w8a8 {js8:.2e} w4a8 {js4:.2e}; mask IoU {iou8:.4f} {iou4:.4f}; logit err {err8:.2e} {err4:.2e}")
    assert 0 < js8 < 0.01 and iou8 > 0.9
    assert js4 > js8 and err4 > err8 and iou4 <= iou8

"""Output impact of quantization on small hand-made predictions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sam2_layerwise.metrics import output_impact


def square(top: int, left: int, size: int = 4, hw: int = 8) -> torch.Tensor:
    m = torch.zeros(hw, hw, dtype=torch.bool)
    m[top:top + size, left:left + size] = True
    return m


def predictions(masks, ious, logits=None) -> dict:
    masks = torch.stack(masks)  # [M, H, W]
    if logits is None:
        logits = torch.where(masks, 1.0, -1.0)  # low-res frame = the mask frame here
    return {"masks": masks, "iou_predictions": torch.tensor(ious, dtype=torch.float32), "low_res_logits": logits}


def test_identical_predictions():
    fp = predictions([square(0, 0), square(2, 2), torch.zeros(8, 8, dtype=torch.bool)], [0.9, 0.7, 0.1])
    q = {k: v.clone() for k, v in fp.items()}
    out = output_impact(fp, q)
    assert out["num_masks"] == 3
    assert [m["iou"] for m in out["masks"]] == [1.0, 1.0, 1.0]  # both empty masks count as identical
    assert out["masks"][0]["area_fp"] == 16 / 64 and out["masks"][0]["area_change"] == 0.0
    assert out["masks"][2]["area_q"] == 0.0
    assert out["chosen"] == {"fp": 0, "q": 0, "changed": False, "iou": 1.0}
    assert out["logits"] == {"max_abs_error": 0.0, "mean_abs_error": 0.0, "sign_agreement": 1.0}
    assert out["iou_mean"] == 1.0 and out["iou_min"] == 1.0


def test_shifted_mask_and_chosen_change():
    fp = predictions([square(0, 0), square(4, 4)], [0.9, 0.5])
    q = predictions([square(0, 1), square(4, 4)], [0.6, 0.8])  # mask 0 shifted one column right
    out = output_impact(fp, q)
    m0, m1 = out["masks"]
    assert m0["iou"] == pytest.approx(12 / 20)  # 4x4 squares overlapping in 4x3 pixels
    assert m0["area_fp"] == m0["area_q"] == 0.25 and m0["area_change"] == 0.0
    assert m0["pred_iou_fp"] == pytest.approx(0.9) and m0["pred_iou_q"] == pytest.approx(0.6)
    assert m0["pred_iou_change"] == pytest.approx(-0.3)
    assert m1["iou"] == 1.0 and m1["pred_iou_change"] == pytest.approx(0.3)
    assert out["chosen"] == {"fp": 0, "q": 1, "changed": True, "iou": 0.0}  # squares at (0,0) and (4,4) are disjoint
    assert out["iou_min"] == pytest.approx(0.6) and out["iou_mean"] == pytest.approx(0.8)
    # logits +-1 on the masks: the shift flips 4 + 4 pixels of 128, each by 2
    assert out["logits"]["max_abs_error"] == 2.0
    assert out["logits"]["mean_abs_error"] == pytest.approx(8 * 2 / 128)
    assert out["logits"]["sign_agreement"] == pytest.approx(120 / 128)


def test_area_change_and_logit_error_hand_values():
    fp = predictions([square(0, 0, size=2)], [0.5], logits=torch.tensor([[[1.0, -2.0], [0.5, 3.0]]]))
    fp["masks"] = torch.tensor([[[True, False], [True, True]]])
    q = predictions([square(0, 0, size=2)], [0.5], logits=torch.tensor([[[1.5, 1.0], [-0.5, 3.0]]]))
    q["masks"] = torch.tensor([[[True, True], [False, True]]])
    out = output_impact(fp, q)
    m = out["masks"][0]
    assert m["iou"] == pytest.approx(2 / 4)
    assert m["area_fp"] == 0.75 and m["area_q"] == 0.75
    assert out["logits"]["max_abs_error"] == 3.0
    assert out["logits"]["mean_abs_error"] == pytest.approx((0.5 + 3.0 + 1.0 + 0.0) / 4)
    assert out["logits"]["sign_agreement"] == 0.5


def test_json_safe_with_nan_and_numpy_inputs():
    fp = predictions([square(0, 0), square(1, 1)], [math.nan, 0.3])
    q = {k: v.numpy() for k, v in predictions([square(0, 0), square(1, 1)], [0.2, 0.3]).items()}
    out = output_impact(fp, q)
    assert out["masks"][0]["pred_iou_fp"] is None and out["masks"][0]["pred_iou_change"] is None
    assert out["chosen"]["fp"] == 1  # a NaN score is never chosen
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    assert all(type(v) in (int, float, bool, type(None)) for m in out["masks"] for v in m.values())


def test_bad_predictions_raise_value_error():
    fp = predictions([square(0, 0), square(1, 1)], [0.5, 0.3])
    with pytest.raises(ValueError, match="masks shape"):
        q = dict(fp, masks=torch.zeros(2, 9, 8, dtype=torch.bool))
        output_impact(fp, q)
    with pytest.raises(ValueError, match="low_res_logits shape"):
        output_impact(fp, dict(fp, low_res_logits=torch.zeros(2, 4, 4)))
    with pytest.raises(ValueError, match="Q predictions lack iou_predictions"):
        output_impact(fp, {k: v for k, v in fp.items() if k != "iou_predictions"})
    with pytest.raises(ValueError, match="number of masks"):
        output_impact(fp, dict(fp, iou_predictions=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"expected masks \[M, H, W\]"):
        output_impact(dict(fp, masks=fp["masks"][0]), fp)
    with pytest.raises(ValueError, match="no masks"):
        empty = {"masks": torch.zeros(0, 8, 8, dtype=torch.bool), "iou_predictions": torch.zeros(0),
                 "low_res_logits": torch.zeros(0, 8, 8)}
        output_impact(empty, empty)
    with pytest.raises(ValueError, match="must be tensors"):
        output_impact(dict(fp, masks="not a tensor"), fp)

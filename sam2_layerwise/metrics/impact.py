"""Output impact: how far the quantized model's prediction moved from the full-precision one.

Inputs are the two `predictions.pt` dicts of a run (FP and Q): masks [M, H, W] bool (original-image pixels),
iou_predictions [M] float, low_res_logits [M, h, w] float (the decoder's 256x256 frame). The result holds
plain floats, ints, bools and None (for NaN / inf), ready for JSON.
"""

from __future__ import annotations

import math

import torch

PREDICTION_KEYS = ("masks", "iou_predictions", "low_res_logits")


def _number(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _tensors(side: str, pred: dict) -> list[torch.Tensor]:
    """masks, iou_predictions, low_res_logits of one predictions dict as tensors (numpy arrays accepted)."""
    missing = [key for key in PREDICTION_KEYS if key not in pred]
    if missing:
        raise ValueError(f"{side} predictions lack {', '.join(missing)} (expected a predictions.pt dict with "
                         f"{', '.join(PREDICTION_KEYS)})")
    try:
        masks, ious, logits = (torch.as_tensor(pred[key]) for key in PREDICTION_KEYS)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{side} predictions: {', '.join(PREDICTION_KEYS)} must be tensors ({e})") from None
    for key, t in zip(PREDICTION_KEYS, (masks, ious, logits)):
        if t.is_complex() or t.device.type != "cpu" or t.layout != torch.strided:
            raise ValueError(f"{side} predictions: {key} must be a real dense CPU tensor ({t.dtype}, {t.device})")
    if masks.dim() != 3 or ious.dim() != 1 or logits.dim() != 3:
        raise ValueError(f"{side} predictions: expected masks [M, H, W], iou_predictions [M] and low_res_logits "
                         f"[M, h, w], got {tuple(masks.shape)}, {tuple(ious.shape)} and {tuple(logits.shape)}")
    if not masks.shape[0] == ious.shape[0] == logits.shape[0]:
        raise ValueError(f"{side} predictions disagree on the number of masks: masks {tuple(masks.shape)}, "
                         f"iou_predictions {tuple(ious.shape)}, low_res_logits {tuple(logits.shape)}")
    if masks.shape[0] == 0:
        raise ValueError(f"{side} predictions hold no masks")
    return [masks, ious, logits]


def _check_pair(fp: list[torch.Tensor], q: list[torch.Tensor]) -> None:
    for key, a, b in zip(PREDICTION_KEYS, fp, q):
        if a.shape != b.shape:
            raise ValueError(f"FP and Q predictions differ in {key} shape: {tuple(a.shape)} vs {tuple(b.shape)} "
                             f"(were both models run on the same image and prompts?)")


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks [..., H, W] -> [...] fp64; two empty masks agree completely (1.0)."""
    inter = (a & b).sum((-2, -1)).double()
    union = (a | b).sum((-2, -1)).double()
    return torch.where(union == 0, torch.ones_like(inter), inter / union.clamp_min(1))


def output_impact(fp: dict, q: dict) -> dict:
    """Compare FP and Q predictions of the same image and prompts.

    Returns
      num_masks: M.
      masks: one dict per mask output i: index, iou (FP vs Q mask i; 1.0 when both are empty), area_fp and
        area_q (fraction of the image's pixels in the mask), area_change (Q − FP), pred_iou_fp, pred_iou_q,
        pred_iou_change (Q − FP).
      iou_mean, iou_min: over the mask outputs.
      chosen: the mask each model would pick (highest predicted IoU, the first on a tie): fp, q (indices),
        changed (bool), iou (FP's chosen mask vs Q's chosen mask).
      logits: max_abs_error and mean_abs_error of low_res_logits (Q − FP), sign_agreement (fraction of
        low-res pixels where logit > 0 agrees: the masks before upsampling).
    Raises ValueError naming the key when the dicts lack a key or differ in shape.
    """
    fp_t, q_t = _tensors("FP", fp), _tensors("Q", q)
    _check_pair(fp_t, q_t)
    masks_fp, masks_q = fp_t[0].bool(), q_t[0].bool()  # [M, H, W]
    pixels = masks_fp.shape[-2] * masks_fp.shape[-1]
    iou = _iou(masks_fp, masks_q)  # [M]
    area_fp = masks_fp.sum((-2, -1)).double() / pixels
    area_q = masks_q.sum((-2, -1)).double() / pixels
    pred_fp, pred_q = fp_t[1].double(), q_t[1].double()  # [M]
    per_mask = [{
        "index": i,
        "iou": _number(iou[i]),
        "area_fp": _number(area_fp[i]),
        "area_q": _number(area_q[i]),
        "area_change": _number(area_q[i] - area_fp[i]),
        "pred_iou_fp": _number(pred_fp[i]),
        "pred_iou_q": _number(pred_q[i]),
        "pred_iou_change": _number(pred_q[i] - pred_fp[i]),
    } for i in range(iou.shape[0])]

    # torch.argmax takes the first maximum; NaN scores count as lowest.
    chosen_fp = int(torch.nan_to_num(pred_fp, nan=-math.inf).argmax())
    chosen_q = int(torch.nan_to_num(pred_q, nan=-math.inf).argmax())

    logits_fp, logits_q = fp_t[2].double(), q_t[2].double()  # [M, h, w]
    err = (logits_q - logits_fp).abs()
    return {
        "num_masks": len(per_mask),
        "masks": per_mask,
        "iou_mean": _number(iou.mean()),
        "iou_min": _number(iou.min()),
        "chosen": {
            "fp": chosen_fp,
            "q": chosen_q,
            "changed": chosen_fp != chosen_q,
            "iou": _number(_iou(masks_fp[chosen_fp], masks_q[chosen_q])),
        },
        "logits": {
            "max_abs_error": _number(err.max()) if err.numel() else None,
            "mean_abs_error": _number(err.mean()) if err.numel() else None,
            "sign_agreement": _number(((logits_fp > 0) == (logits_q > 0)).double().mean()) if err.numel() else None,
        },
    }

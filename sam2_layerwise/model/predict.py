"""Run SAM 2's real image predictor on one image and one prompt set."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from sam2_layerwise.errors import ModelError
from sam2_layerwise.inputs import Prompts


@dataclass
class Prediction:
    """masks: [M, H, W] bool at original resolution; iou_predictions: [M]; low_res_logits: [M, 256', 256']."""

    masks: np.ndarray
    iou_predictions: np.ndarray
    low_res_logits: np.ndarray

    @property
    def best(self) -> int:
        return int(np.argmax(self.iou_predictions))


def make_predictor(model):
    """SAM2ImagePredictor with its feature sizes set for the model's image size (they are hard-coded for 1024)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    s = int(model.image_size)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor


def precision_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        if device.type != "cuda":
            raise ModelError("bf16 autocast needs a CUDA device; use fp32 on CPU", flag="--precision", value=precision)
        return torch.autocast("cuda", dtype=torch.bfloat16)
    raise ModelError("expected fp32 or bf16", flag="--precision", value=precision)


def prompt_arrays(prompts: Prompts):
    coords = np.array([[p.x, p.y] for p in prompts.points], dtype=np.float32) if prompts.points else None
    labels = np.array([p.label for p in prompts.points], dtype=np.int32) if prompts.points else None
    box = np.array(prompts.box, dtype=np.float32) if prompts.box else None
    return coords, labels, box


def set_image(predictor, image: np.ndarray) -> None:
    with torch.inference_mode():
        predictor.set_image(image)


def predict(predictor, prompts: Prompts, multimask: bool = True) -> Prediction:
    coords, labels, box = prompt_arrays(prompts)
    with torch.inference_mode():
        masks, ious, low = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                             multimask_output=multimask)
    return Prediction(masks=masks.astype(bool), iou_predictions=np.asarray(ious, dtype=np.float32),
                      low_res_logits=np.asarray(low, dtype=np.float32))


def run_plain(model, image: np.ndarray, prompts: Prompts, *, multimask: bool = True, precision: str = "fp32") -> Prediction:
    """Plain SAM 2, no capture: the reference for identity tests and benchmarks."""
    predictor = make_predictor(model)
    with precision_context(next(model.parameters()).device, precision):
        set_image(predictor, image)
        return predict(predictor, prompts, multimask)

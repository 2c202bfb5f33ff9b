"""The notebook API: the same capture the CLI writes, as objects, without files."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sam2_layerwise.capture import AttentionRecord, BlockRecord, CaptureOptions, CaptureSession, QueryLocation
from sam2_layerwise.geometry import DecoderTokenLayout, ImageFrame
from sam2_layerwise.inputs import Prompts
from sam2_layerwise.model.predict import Prediction, make_predictor, precision_context, predict, set_image


@dataclass
class ImageCapture:
    """Everything one image run captured. `attention` and `blocks` are in call order."""

    attention: list[AttentionRecord]
    blocks: list[BlockRecord]
    prediction: Prediction
    frame: ImageFrame
    prompts: Prompts
    options: CaptureOptions
    locations: list[QueryLocation]
    nonfinite: list[dict] = field(default_factory=list)

    def nonfinite_report(self) -> dict:
        """The summary's `nonfinite` section: where NaN/inf first appeared (module, tensor), in compute order.
        Non-finite values are a finding, not a crash: an aggressive quantization produces exactly these."""
        seen = list(self.nonfinite)
        for what, arr in (("low_res_logits", self.prediction.low_res_logits),
                          ("iou_predictions", self.prediction.iou_predictions)):
            if not np.isfinite(arr).all():
                seen.append({"module": "prediction", "call_index": 0, "tensor": what})
        return {"found": bool(seen), "first": seen[0] if seen else None, "count": len(seen), "where": seen[:50]}

    def record(self, layer_key: str, call_index: int = 0) -> AttentionRecord:
        for r in self.attention:
            if r.layer_key == layer_key and r.call_index == call_index:
                return r
        raise KeyError(f"no attention record for layer {layer_key!r}; captured: "
                       f"{', '.join(r.layer_key for r in self.attention[:6])}, ...")

    @property
    def max_module_error(self) -> float:
        return max((r.module_max_abs_err or 0.0) for r in self.attention) if self.attention else 0.0


def query_locations(prompts: Prompts) -> list[QueryLocation]:
    """Clicks first (in order), then the box centre, then the user's extra query points."""
    locs = [QueryLocation(f"click{i}", p.x, p.y) for i, p in enumerate(prompts.points)]
    if prompts.box:
        x0, y0, x1, y1 = prompts.box
        locs.append(QueryLocation("box_center", (x0 + x1) / 2, (y0 + y1) / 2))
    locs += [QueryLocation(f"query{i}", x, y) for i, (x, y) in enumerate(prompts.queries)]
    return locs


def decoder_layout(model: nn.Module, prompts: Prompts) -> DecoderTokenLayout:
    dec = model.sam_mask_decoder
    return DecoderTokenLayout(has_obj_score=bool(dec.pred_obj_scores), num_mask_tokens=int(dec.num_mask_tokens),
                              num_box_corners=2 if prompts.box else 0, num_points=len(prompts.points))


def capture_image(model: nn.Module, image: np.ndarray, prompts: Prompts, options: CaptureOptions | None = None,
                  *, multimask: bool = True, precision: str = "fp32", on_record=None) -> ImageCapture:
    """Run SAM2ImagePredictor (set_image + predict) on `image` (HWC uint8 RGB) with capture on.

    Masks are identical to `run_plain`: the float kernel is torch's own SDPA and hooks return nothing.
    `on_record(record)` is called after each attention record (progress bars).
    """
    options = options or CaptureOptions()
    h, w = image.shape[:2]
    frame = ImageFrame(orig_w=w, orig_h=h, image_size=int(model.image_size))
    locations = query_locations(prompts)
    predictor = make_predictor(model)
    device = next(model.parameters()).device
    with CaptureSession(model, options, frame, locations, on_record) as session, precision_context(device, precision):
        session.decoder_layout = decoder_layout(model, prompts)
        set_image(predictor, image)
        prediction = predict(predictor, prompts, multimask)
    return ImageCapture(attention=session.attention, blocks=session.blocks, prediction=prediction, frame=frame,
                        prompts=prompts, options=options, locations=locations, nonfinite=session.nonfinite)

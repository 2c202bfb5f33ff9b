"""Video capture as objects: SAM 2's real SAM2VideoPredictor tracks one object through the selected frames while
every attention module is captured, each record tagged with the frame it ran on and, for memory
cross-attention, the frames and object pointers its keys came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from sam2_layerwise.api import query_locations
from sam2_layerwise.capture import AttentionRecord, BlockRecord, CaptureOptions, CaptureSession, QueryLocation
from sam2_layerwise.capture.memory import MemoryLayout, MemoryTap
from sam2_layerwise.geometry import ImageFrame
from sam2_layerwise.inputs import Prompts
from sam2_layerwise.model.video import FramePrediction, VideoPrediction, track


@dataclass
class FrameCapture:
    """What one frame produced, handed to `capture_video(on_frame=...)` as soon as SAM 2 yields the frame."""

    index: int
    attention: list[AttentionRecord]
    blocks: list[BlockRecord]
    prediction: FramePrediction
    memory: list[MemoryLayout]


@dataclass
class VideoCapture:
    """Everything a video run captured. `attention` and `blocks` are in call order, each with `frame_index`."""

    attention: list[AttentionRecord]
    blocks: list[BlockRecord]
    prediction: VideoPrediction
    frame: ImageFrame
    prompts: Prompts
    prompt_frame: int
    options: CaptureOptions
    locations: list[QueryLocation]
    frames: list  # FrameInfo per selected frame
    memory: list[MemoryLayout] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)

    def records(self, frame: int, layer_key: str | None = None) -> list[AttentionRecord]:
        return [r for r in self.attention if r.frame_index == frame and (layer_key is None or r.layer_key == layer_key)]

    def record(self, layer_key: str, frame: int) -> AttentionRecord:
        found = self.records(frame, layer_key)
        if not found:
            raise KeyError(f"no attention record for layer {layer_key!r} on frame {frame}")
        return found[0]

    @property
    def max_module_error(self) -> float:
        return max((r.module_max_abs_err or 0.0) for r in self.attention) if self.attention else 0.0

    def nonfinite_report(self) -> dict:
        seen = list(self.nonfinite)
        for f in self.prediction.frames:
            if not np.isfinite(f.logits).all():
                seen.append({"module": "prediction", "call_index": f.index, "tensor": "low_res_logits", "frame": f.index})
        return {"found": bool(seen), "first": seen[0] if seen else None, "count": len(seen), "where": seen[:50]}


def capture_video(model: nn.Module, source, prompts: Prompts, options: CaptureOptions | None = None, *,
                  prompt_frame: int = 0, precision: str = "fp32", on_record=None, on_frame=None,
                  on_state=None) -> VideoCapture:
    """Track `prompts` (original pixels of selected frame `prompt_frame`) through `source` (frames.VideoSource)
    with SAM2VideoPredictor `model` (built with model.video.VIDEO_OVERRIDES) while capturing every attention call.

    Query places (clicks, box centre, `prompts.queries`) are the same pixels on every frame. Masks are identical
    to `model.video.track_plain`: the float kernel is torch's own SDPA and no hook changes a value.
    `on_frame(FrameCapture)` runs after each frame (write it, then drop what is heavy: records are kept);
    `on_state(inference_state)` once SAM 2's inference state exists (its output_dict is SAM 2's memory bank).
    """
    options = options or CaptureOptions()
    frame = ImageFrame(orig_w=source.width, orig_h=source.height, image_size=int(model.image_size))
    locations = query_locations(prompts)
    handed = {"attention": 0, "blocks": 0, "memory": 0}
    with CaptureSession(model, options, frame, locations, on_record) as session, \
            MemoryTap(model, session, source.frames) as tap:

        def frame_done(fp: FramePrediction) -> None:
            fc = FrameCapture(index=fp.index, attention=session.attention[handed["attention"]:],
                              blocks=session.blocks[handed["blocks"]:], prediction=fp,
                              memory=tap.layouts[handed["memory"]:])
            handed.update(attention=len(session.attention), blocks=len(session.blocks), memory=len(tap.layouts))
            if on_frame is not None:
                on_frame(fc)

        prediction = track(model, source, prompts, prompt_frame, precision=precision, on_frame=frame_done,
                           on_state=on_state)
    return VideoCapture(attention=session.attention, blocks=session.blocks, prediction=prediction, frame=frame,
                        prompts=prompts, prompt_frame=prompt_frame, options=options, locations=locations,
                        frames=list(source.frames), memory=tap.layouts, nonfinite=session.nonfinite)

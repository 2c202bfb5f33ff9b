"""Run SAM 2's real `SAM2VideoPredictor` on selected frames: one object, clicks/box on one frame, tracked
forward to the last frame and then back to the first. Nothing of SAM 2's tracking is re-implemented here; the
frames reach `init_state` through an in-memory loader instead of a JPEG folder.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sam2_layerwise.errors import ModelError
from sam2_layerwise.inputs import Prompts
from sam2_layerwise.model.predict import precision_context, prompt_arrays

# What `sam2.build_sam.build_sam2_video_predictor` sets, except hole filling: it needs SAM 2's CUDA extension,
# which this package is installed without (without it SAM 2 warns on every frame and skips the filling anyway).
VIDEO_OVERRIDES = {
    "model._target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
    "model.binarize_mask_from_pts_for_mem_enc": True,
    "model.fill_hole_area": 0,
}
OBJ_ID = 1
IMG_MEAN, IMG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def video_overrides(image_size: int | None = None) -> dict:
    return {**VIDEO_OVERRIDES, **({"model.image_size": image_size} if image_size else {})}


def check_video_model(model) -> None:
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    if not isinstance(model, SAM2VideoPredictor):
        raise ModelError(f"expected a SAM2VideoPredictor (build with model.video.VIDEO_OVERRIDES), got "
                         f"{type(model).__name__}", flag="--config")
    if getattr(model, "fill_hole_area", 0):
        model.fill_hole_area = 0  # needs SAM 2's CUDA extension, which is not built here


class FrameTensors:
    """SAM 2's `inference_state["images"]`, lazily: item i is selected frame i resized to image_size² and
    normalised exactly as `sam2.utils.misc._load_img_as_tensor` + `load_video_frames` do ([3, S, S] fp32).
    Only the frame being encoded is in memory (SAM 2 reads `images[frame_idx]` once per frame)."""

    def __init__(self, source, image_size: int):
        self.source, self.image_size = source, int(image_size)
        self._mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        s = self.image_size
        rgb = Image.fromarray(self.source.image(index)).resize((s, s))  # PIL's default resampling, as SAM 2
        img = torch.from_numpy(np.asarray(rgb) / 255.0).permute(2, 0, 1).float()  # [3, S, S]
        img -= self._mean
        img /= self._std
        return img


@contextlib.contextmanager
def _patched(obj, name: str, value):
    """Set `obj.name` for the duration (an instance attribute shadowing a method), then take it away again."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def init_state(predictor, source) -> dict:
    """`SAM2VideoPredictor.init_state` on our frames: its loader is swapped for `FrameTensors` during the call,
    and its warm-up encoding of frame 0 is skipped (the prompt frame is encoded when the clicks arrive)."""
    import sam2.sam2_video_predictor as svp

    def loader(video_path, image_size, offload_video_to_cpu, async_loading_frames=False, compute_device=None, **_):
        return FrameTensors(source, image_size), source.height, source.width

    original = svp.load_video_frames
    svp.load_video_frames = loader
    try:
        with _patched(predictor, "_get_image_feature", lambda *a, **k: None):
            return predictor.init_state(video_path=str(source.path))
    finally:
        svp.load_video_frames = original


_QUIET = {"depth": 0, "original": None}
_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_sam2_progress():
    """SAM 2 draws its own 'propagate in video' progress bar; ours says the same per frame. Counted, so two
    trackers that overlap in any order (compare --video's float half tracks in a thread of its own) leave
    SAM 2's own `tqdm` in place once both are done."""
    import sam2.sam2_video_predictor as svp

    with _QUIET_LOCK:
        if _QUIET["depth"] == 0:
            _QUIET["original"] = svp.tqdm
            svp.tqdm = lambda iterable, *a, **k: iterable
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                svp.tqdm = _QUIET["original"]


@dataclass
class FramePrediction:
    """SAM 2's output on one selected frame: `mask` [H, W] bool (original size), `logits` [H', W'] the low-res
    mask logits SAM 2 stored, `object_score` the object-score logit, `direction` forward/backward/prompt."""

    index: int
    mask: np.ndarray
    logits: np.ndarray
    object_score: float
    direction: str
    iou: float = float("nan")  # the decoder's predicted IoU of the mask SAM 2 kept on this frame


@dataclass
class VideoPrediction:
    frames: list[FramePrediction] = field(default_factory=list)

    def by_index(self) -> dict[int, FramePrediction]:
        return {f.index: f for f in self.frames}


def _frame_output(state: dict, index: int) -> dict:
    out = state["output_dict_per_obj"][0]
    return out["cond_frame_outputs"].get(index) or out["non_cond_frame_outputs"][index]


def track(predictor, source, prompts: Prompts, prompt_frame: int, *, precision: str = "fp32",
          on_frame=None, on_state=None) -> VideoPrediction:
    """Add the prompts on `prompt_frame` (selected index) and track through every selected frame: forward to
    the last, then backward to the first. `on_state(state)` is called once the inference state exists,
    `on_frame(FramePrediction)` after each frame SAM 2 yields (the prompt frame once)."""
    check_video_model(predictor)
    device = next(predictor.parameters()).device
    pred = VideoPrediction()
    coords, labels, box = prompt_arrays(prompts)
    ious: list[float] = []

    def decoder_iou(module, args, output):  # (masks, iou_pred [B, M], tokens, object score); SAM 2 keeps the best
        ious.append(float(output[1].float().amax(-1)[0]))

    hook = predictor.sam_mask_decoder.register_forward_hook(decoder_iou)
    with contextlib.ExitStack() as stack:
        stack.callback(hook.remove)
        _track(predictor, source, prompt_frame, coords, labels, box, precision, device, pred, ious, on_frame, on_state)
    return pred


def _track(predictor, source, prompt_frame, coords, labels, box, precision, device, pred, ious, on_frame, on_state):
    with torch.inference_mode(), precision_context(device, precision), _quiet_sam2_progress():
        state = init_state(predictor, source)
        if on_state is not None:
            on_state(state)
        predictor.add_new_points_or_box(state, frame_idx=prompt_frame, obj_id=OBJ_ID, points=coords, labels=labels,
                                        box=box)
        passes = [(False, "forward")] + ([(True, "backward")] if prompt_frame > 0 else [])
        for reverse, direction in passes:
            for idx, _obj_ids, video_res_masks in predictor.propagate_in_video(state, start_frame_idx=prompt_frame,
                                                                                reverse=reverse):
                if idx == prompt_frame and reverse:
                    continue  # the prompt frame is yielded by both passes; SAM 2 computes it once
                out = _frame_output(state, idx)
                fp = FramePrediction(
                    index=idx, mask=(video_res_masks[0, 0] > 0.0).cpu().numpy(),
                    logits=out["pred_masks"][0, 0].float().cpu().numpy(),
                    object_score=float(out["object_score_logits"].float().reshape(-1)[0]),
                    direction="prompt" if idx == prompt_frame else direction, iou=ious[-1] if ious else float("nan"))
                pred.frames.append(fp)
                if on_frame is not None:
                    on_frame(fp)


def track_plain(predictor, source, prompts: Prompts, prompt_frame: int, *, precision: str = "fp32") -> VideoPrediction:
    """Plain SAM 2 tracking, no capture: the reference for identity tests and benchmarks."""
    return track(predictor, source, prompts, prompt_frame, precision=precision)

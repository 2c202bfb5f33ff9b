"""Video capture: which frame every module call belongs to, and what SAM 2 put into each memory attention's keys.

Memory cross-attention keys are one concatenation: spatial memories of earlier frames (conditioning frames first,
then recent frames), then object-pointer tokens. Which frames those are depends on SAM 2's rules (closest
conditioning frames, temporal stride, pointer count, direction, frames already tracked), so it is read off what
SAM 2 actually did on that frame, never derived from the config:

1. `SAM2Base._prepare_memory_conditioned_features` is wrapped (an instance attribute, removed on exit). Its
   `output_dict` is handed on as a copy whose per-frame entries log each read of `maskmem_features` and
   `obj_ptr`: the order of those reads is the order SAM 2 concatenates them in.
2. A forward pre-hook on `memory_attention` receives the assembled `memory` and `num_obj_ptr_tokens` and checks
   the log against it: token counts must add up to the key count, and every segment's tokens must be exactly
   the logged frame's memory features / pointer (bit for bit). Only then are the segments used
   (`MemoryLayout.verified`); otherwise the records say why.

Ages: `age = current frame - memory frame` when tracking forward, the other way round when tracking backward,
so an age is always how many frames ago, in tracking order, that memory was made.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch

from sam2_layerwise.geometry import DecoderTokenLayout

log = logging.getLogger("sam2_layerwise")


@dataclass
class MemorySegment:
    """Keys [start, stop) of one memory cross-attention call that come from one place.

    kind: `memory` (a frame's spatial memory, grid_hw tokens row-major), `object_pointer` (one frame's object
    pointer split into `stop - start` tokens, no RoPE) or `no_memory` (SAM 2's dummy token on a first frame).
    frame: the selected-frame index the memory was made on; conditioning: it came from a prompted frame.
    """

    kind: str
    start: int
    stop: int
    frame: int | None = None
    conditioning: bool | None = None
    age: int | None = None
    grid_hw: tuple[int, int] | None = None
    source_index: int | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "no_memory":
            return "no_memory"
        return f"{'mem' if self.kind == 'memory' else 'ptr'}_f{self.frame}"

    def to_dict(self) -> dict:
        d = {"label": self.label, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}}
        d["tokens"] = self.stop - self.start
        return d


@dataclass
class MemoryLayout:
    """What SAM 2 assembled as memory on one frame (one memory-attention forward)."""

    frame: int
    grid_hw: tuple[int, int]
    keys: int
    pointer_tokens: int
    reverse: bool
    segments: list[MemorySegment] = field(default_factory=list)
    verified: bool = False
    problem: str | None = None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.segments]

    def to_dict(self) -> dict:
        return {"key_segments": [s.to_dict() for s in self.segments], "rope_keys": self.keys - self.pointer_tokens,
                "pointer_tokens": self.pointer_tokens, "direction": "backward" if self.reverse else "forward",
                "segmentation": {"verified": self.verified, "problem": self.problem,
                                 "source": "what SAM 2 read from output_dict while assembling the memory, checked "
                                           "token for token against the memory tensor memory_attention received"}}


class _Traced(dict):
    """One frame's entry of SAM 2's output_dict that logs reads of what memory is made of."""

    __slots__ = ("_frame", "_store", "_log")

    def __init__(self, out: dict, frame: int, store: str, reads: list):
        super().__init__(out)
        self._frame, self._store, self._log = frame, store, reads

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if key in ("maskmem_features", "obj_ptr"):
            self._log.append((key, self._frame, self._store, value))
        return value


def _traced_output_dict(output_dict: dict, reads: list) -> dict:
    proxy = dict(output_dict)
    for store in ("cond_frame_outputs", "non_cond_frame_outputs"):
        if isinstance(output_dict.get(store), dict):
            proxy[store] = {t: _Traced(o, t, store, reads) if isinstance(o, dict) else o
                            for t, o in output_dict[store].items()}
    return proxy


def decoder_layout_for(model, point_inputs) -> DecoderTokenLayout:
    """The decoder's tokens on one video frame, from the point inputs SAM 2 was given there: box corners
    (labels 2, 3) and clicks, or, on tracked frames, SAM 2's single empty point (label -1); a padding token
    always follows (SAM 2 passes boxes as points)."""
    dec = model.sam_mask_decoder
    if point_inputs is None:
        return DecoderTokenLayout(has_obj_score=bool(dec.pred_obj_scores), num_mask_tokens=int(dec.num_mask_tokens),
                                  num_box_corners=0, num_points=0, num_no_points=1)
    labels = point_inputs["point_labels"][0].tolist()
    corners = sum(1 for v in labels if v in (2, 3))
    return DecoderTokenLayout(has_obj_score=bool(dec.pred_obj_scores), num_mask_tokens=int(dec.num_mask_tokens),
                              num_box_corners=corners, num_points=len(labels) - corners)


class MemoryTap:
    """Installs the video bookkeeping on a SAM2VideoPredictor for a CaptureSession: `session.frame_index` while
    SAM 2 works on a frame, `session.decoder_layout` per frame, `session.memory_layout` while memory attention
    runs. Use as a context manager inside the session; everything is removed on exit.

    frames: FrameInfo per selected frame (names the source frame of each segment), optional.
    """

    def __init__(self, model, session, frames=None):
        self.model, self.session = model, session
        self.frames = frames
        self.layouts: list[MemoryLayout] = []
        self._handles: list = []
        self._attrs: list[str] = []
        self._pending: dict | None = None
        self._warned = False

    # -- install / remove ---------------------------------------------------------------------------------
    def __enter__(self):
        m = self.model
        for name in ("_get_image_feature", "_run_single_frame_inference", "_run_memory_encoder"):
            if hasattr(m, name):
                self._wrap(name, self._frame_wrapper(getattr(m, name), name))
        self._wrap("_prepare_memory_conditioned_features", self._prepare_wrapper(m._prepare_memory_conditioned_features))
        self._handles.append(m.memory_attention.register_forward_pre_hook(self._memory_pre, with_kwargs=True))
        self._handles.append(m.memory_attention.register_forward_hook(self._memory_post, always_call=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for name in self._attrs:
            vars(self.model).pop(name, None)
        self._handles, self._attrs = [], []
        return False

    def _wrap(self, name: str, fn) -> None:
        if name in vars(self.model):
            raise RuntimeError(f"{name} is already patched on this model (two captures at once?)")
        setattr(self.model, name, fn)
        self._attrs.append(name)

    # -- which frame ----------------------------------------------------------------------------------------
    def _frame_wrapper(self, original, name):
        sig = inspect.signature(original)

        def wrapper(*args, **kwargs):
            a = sig.bind(*args, **kwargs).arguments
            s = self.session
            previous = s.frame_index, s.decoder_layout
            s.frame_index = int(a["frame_idx"])
            if name == "_run_single_frame_inference":
                s.decoder_layout = decoder_layout_for(self.model, a.get("point_inputs"))
            try:
                return original(*args, **kwargs)
            finally:
                s.frame_index, s.decoder_layout = previous
        return wrapper

    # -- what memory ---------------------------------------------------------------------------------------
    def _prepare_wrapper(self, original):
        sig = inspect.signature(original)

        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            reads: list = []
            a["output_dict"] = _traced_output_dict(a["output_dict"], reads)
            h, w = a["feat_sizes"][-1]
            self._pending = {"frame": int(a["frame_idx"]), "reverse": bool(a.get("track_in_reverse")),
                             "init": bool(a["is_init_cond_frame"]), "grid": (int(h), int(w)), "reads": reads}
            self.session.memory_grid = (int(h), int(w))
            try:
                return original(*bound.args, **bound.kwargs)
            finally:
                self._pending = None
        return wrapper

    def _memory_pre(self, module, args, kwargs):
        params = list(inspect.signature(module.forward).parameters)
        a = dict(zip(params, args)) | kwargs
        memory, n_ptr = a["memory"], int(a.get("num_obj_ptr_tokens", 0) or 0)  # memory: [M, B, C] sequence-first
        p = self._pending
        if p is None:  # memory attention called outside SAM 2's frame preparation: nothing to segment by
            layout = MemoryLayout(frame=self.session.frame_index if self.session.frame_index is not None else -1,
                                  grid_hw=self.session.memory_grid or (0, 0), keys=int(memory.shape[0]),
                                  pointer_tokens=n_ptr, reverse=False,
                                  problem="memory attention ran outside _prepare_memory_conditioned_features")
        else:
            layout = self._segment(p, memory, n_ptr)
        if not layout.verified and not self._warned:
            log.warning("memory keys of frame %s could not be segmented by frame: %s", layout.frame, layout.problem)
            self._warned = True
        self.layouts.append(layout)
        self.session.memory_layout = layout

    def _memory_post(self, module, args, output):
        self.session.memory_layout = None

    def _info(self, frame: int) -> tuple[int | None, str | None]:
        if self.frames is not None and 0 <= frame < len(self.frames):
            f = self.frames[frame]
            return f.source_index, f.name
        return None, None

    def _segment(self, p: dict, memory: torch.Tensor, n_ptr: int) -> MemoryLayout:
        M, B, C = memory.shape
        layout = MemoryLayout(frame=p["frame"], grid_hw=p["grid"], keys=M, pointer_tokens=n_ptr, reverse=p["reverse"])
        sign = -1 if p["reverse"] else 1
        spatial = [(f, s, t) for key, f, s, t in p["reads"] if key == "maskmem_features"]
        pointers = [(f, s, t) for key, f, s, t in p["reads"] if key == "obj_ptr"]
        if not spatial and not pointers:
            if M == 1 and n_ptr == 0:
                layout.segments = [MemorySegment("no_memory", 0, 1, frame=None)]
                layout.verified = True
            else:
                layout.problem = f"SAM 2 read no memory entries, yet memory holds {M} tokens"
            return layout
        start = 0
        try:
            with torch.no_grad():
                for frame, store, feats in spatial:  # feats: [B, C_mem, h, w]
                    n = feats.shape[-2] * feats.shape[-1]
                    block = feats.to(memory.device).flatten(2).permute(2, 0, 1).to(memory.dtype)  # [h*w, B, C_mem]
                    if start + n > M or not torch.equal(memory[start:start + n], block):
                        raise ValueError(f"keys {start}:{start + n} are not frame {frame}'s memory features")
                    src, name = self._info(frame)
                    layout.segments.append(MemorySegment(
                        "memory", start, start + n, frame=frame, conditioning=store == "cond_frame_outputs",
                        age=(p["frame"] - frame) * sign, grid_hw=tuple(feats.shape[-2:]), source_index=src, name=name))
                    start += n
                if start != M - n_ptr:
                    raise ValueError(f"spatial memories hold {start} tokens, memory {M} with {n_ptr} pointer tokens")
                per = n_ptr // len(pointers) if pointers else 0
                if pointers and per * len(pointers) != n_ptr or (n_ptr and not pointers):
                    raise ValueError(f"{n_ptr} pointer tokens do not split over {len(pointers)} pointers")
                for frame, store, ptr in pointers:  # ptr: [B, C] split into `per` tokens of C / per
                    toks = ptr.to(memory.device).reshape(B, per, -1).permute(1, 0, 2).to(memory.dtype)  # [per, B, C_mem]
                    if not torch.equal(memory[start:start + per], toks):
                        raise ValueError(f"keys {start}:{start + per} are not frame {frame}'s object pointer")
                    src, name = self._info(frame)
                    layout.segments.append(MemorySegment(
                        "object_pointer", start, start + per, frame=frame, conditioning=store == "cond_frame_outputs",
                        age=(p["frame"] - frame) * sign, source_index=src, name=name))
                    start += per
        except (ValueError, RuntimeError) as exc:
            layout.segments, layout.problem = [], str(exc)
            return layout
        layout.verified = True
        return layout

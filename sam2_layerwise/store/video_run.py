"""Write a video capture as a run directory, frame by frame while SAM 2 tracks, so memory stays bounded.

Layout (docs/summary_schema.md, "Video runs"): the image layout, with every attention file stem carrying its frame
(`<layer>__frame0003`), plus

- `predictions.pt`: one file with a frame axis (selected-frame order 0..T-1): `masks` [T, H, W] bool,
  `iou_predictions` [T], `low_res_logits` [T, h, w], `object_score_logits` [T], `frame_indices`,
  `source_indices`, `directions`, `prompts`, `prompt_frame`;
- `prediction_images/frame_<i>__mask.png`, `frame_<i>__overlay.png`;
- `memory_charts/frame_<i>.png` (memory mass by frame age) and `memory_charts/mass_by_age.png`, when drawing.

Heavy parts of each record (probabilities, q/k/v, per-query statistics) are written as soon as their frame is done
and then dropped from memory; the summary is built from what stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from sam2_layerwise.capture.attention import pool_keys
from sam2_layerwise.capture.records import AttentionRecord
from sam2_layerwise.render.prediction import draw_prompts, label, mask_overlay
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_save_png, atomic_torch_save, atomic_write_json, link_or_copy
from sam2_layerwise.store.image_run import OutputOptions, key_block_hw
from sam2_layerwise.store.summary import build_summary

log = logging.getLogger("sam2_layerwise")

MEMORY_CHARTS = layout.MEMORY_CHARTS


def frame_tag(index: int) -> str:
    return f"frame_{index:04d}"


def pool_memory_keys(probs: torch.Tensor, segments: list[dict], max_tokens: int):
    """Memory cross-attention rows [..., Nk] with more keys than `max_tokens` in one frame's memory: each spatial
    segment is sum-pooled over f x f token cells on its own grid (rows still sum to 1), pointer tokens are kept.
    Returns (probs' [..., Nk'], pooling info with every segment's new [start, stop) and pooled grid, or None)."""
    if not any(s["kind"] == "memory" and s["tokens"] > max_tokens for s in segments):
        return probs, None
    parts, out_segs, start, factor = [], [], 0, 1
    for s in segments:
        part = probs[..., s["start"]:s["stop"]]
        info = None
        if s["kind"] == "memory":
            part, info = pool_keys(part, tuple(s["grid_hw"]), max_tokens)
            factor = max(factor, info["factor"] if info else 1)
        parts.append(part)
        out_segs.append({"label": s["label"], "start": start, "stop": start + part.shape[-1],
                         "pooled_hw": info["pooled_hw"] if info else s.get("grid_hw"),
                         "factor": info["factor"] if info else 1})
        start += part.shape[-1]
    return torch.cat(parts, -1).contiguous(), {
        "op": "sum", "factor": factor, "per_segment": True, "segments": out_segs,
        "note": f"each frame's memory keys summed over {factor}x{factor} token cells of its own grid; object-pointer "
                f"tokens kept; rows still sum to 1"}


def write_record_tensors(writer, record: AttentionRecord, opts: OutputOptions) -> None:
    """`attn_tensors/by_layer/<layer>/<stem>__attn.pt` (+ `__qkv.pt`) of one video record, linked into `all/`.
    Memory cross-attention maps are pooled per memory frame (`pool_memory_keys`) and carry `segment_mass`."""
    stem = layout.safe_name(record.file_stem)
    layer_dir = f"{layout.ATTN_TENSORS}/by_layer/{layout.safe_name(record.layer_key)}"
    payloads = {}
    if opts.save_attn:
        segs = record.geometry.get("key_segments") if record.geometry.get("keys") == "memory" else None
        if segs:
            pooled, pooling = pool_memory_keys(record.probs, segs, opts.max_tokens)
        else:
            pooled, pooling = pool_keys(record.probs, key_block_hw(record), opts.max_tokens)
        record.key_pooling = pooling
        payloads["attn"] = {
            "probs": pooled.contiguous(), "key_pooling": pooling,
            "queries": [q.to_dict() for q in record.queries], "query_stats": record.query_stats,
            "segment_mass": record.segment_mass,  # [G, heads, Nq or sampled queries, segments] or None
            "segment_mass_queries": ((record.memory_mass or {}).get("all_queries") or {}).get("sampled_queries"),
            "layer_key": record.layer_key, "name": record.name, "kind": record.kind, "geometry": record.geometry,
            "frame": record.frame_index,
        }
    if opts.save_qkv and record.qkv is not None:
        payloads["qkv"] = {**record.qkv, "queries": [q.to_dict() for q in record.queries], "frame": record.frame_index,
                           "layer_key": record.layer_key, "geometry": record.geometry,
                           "note": "q/k/v exactly as the attention kernel used them, [groups, heads, tokens, head_dim]"}
    if opts.save_full and record.full_qkv is not None:
        dtype = getattr(torch, opts.save_full)
        full = record.full_qkv
        payloads["full"] = {**{t: full[t].to(dtype) for t in ("q", "k", "v")}, "scale": full["scale"],
                            "tiled": full["tiled"], "dtype": opts.save_full,
                            "kernel_dtype": str(full["q"].dtype).replace("torch.", ""),
                            "probs_quantizer": full.get("probs_quantizer"), "layer_key": record.layer_key,
                            "geometry": record.geometry, "frame": record.frame_index}
    for what, payload in payloads.items():
        rel = f"{layer_dir}/{stem}__{what}.pt"
        atomic_torch_save(payload, writer.path(rel))
        all_rel = f"{layout.ATTN_TENSORS}/all/{stem}__{what}.pt"
        link_or_copy(writer.path(rel), writer.path(all_rel))
        record.files[what] = rel
        record.files[f"{what}_all"] = all_rel


def lighten(record: AttentionRecord, keep_probs: bool = False) -> None:
    """Drop what a written record no longer needs in memory (its summary entry stays complete)."""
    record.qkv = record.full_qkv = None
    record.query_stats = record.segment_mass = None
    if not keep_probs:
        record.probs = record.probs[:, :, :0]


def frame_prediction_images(image: np.ndarray, fp, prompts, frame_info, prompt_frame: int) -> dict:
    """`frame_<i>__mask.png` and `frame_<i>__overlay.png` of one frame (the clicks drawn on the prompt frame)."""
    tag = frame_tag(fp.index)
    from PIL import Image

    ov = mask_overlay(image, fp.mask)
    if fp.index == prompt_frame:
        ov = draw_prompts(ov, prompts)
    text = (f"frame {fp.index} ({frame_info.name}, {fp.direction})  IoU {fp.iou:.3f}  object score "
            f"{fp.object_score:+.2f}  area {fp.mask.mean() * 100:.1f}%")
    return {f"{tag}__mask.png": Image.fromarray(fp.mask.astype(np.uint8) * 255, "L"),
            f"{tag}__overlay.png": label(ov, text)}


@dataclass
class VideoRunSink:
    """Receives each frame of `api_video.capture_video(on_frame=...)` and writes it into the staging run.

    render: a callable(writer, frame_capture) -> {files} drawing the frame's pictures (render.video), or None.
    """

    writer: object
    source: object
    prompts: object
    prompt_frame: int
    opts: OutputOptions
    render: object = None
    keep_probs: bool = False
    frame_files: dict = field(default_factory=dict)  # frame index -> {what: [paths]}

    def __call__(self, fc) -> None:
        files = self.frame_files.setdefault(fc.index, {})
        if self.opts.prediction_images:
            image = self.source.image(fc.index)
            for name, img in frame_prediction_images(image, fc.prediction, self.prompts,
                                                     self.source.frames[fc.index], self.prompt_frame).items():
                rel = f"{layout.PREDICTION_IMAGES}/{name}"
                atomic_save_png(img, self.writer.path(rel), compress_level=1)
                files.setdefault("prediction_images", []).append(rel)
        if self.opts.save_attn or self.opts.save_qkv or self.opts.save_full:
            for record in fc.attention:
                write_record_tensors(self.writer, record, self.opts)
        if self.render is not None:
            for key, value in (self.render(self.writer, fc) or {}).items():
                files.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        for record in fc.attention:
            lighten(record, self.keep_probs)


def write_predictions(writer, cap) -> str:
    frames = sorted(cap.prediction.frames, key=lambda f: f.index)
    atomic_torch_save({
        "masks": torch.from_numpy(np.stack([f.mask for f in frames])),  # [T, H, W] bool, original size
        "iou_predictions": torch.tensor([f.iou for f in frames], dtype=torch.float32),  # [T]
        "low_res_logits": torch.from_numpy(np.stack([f.logits for f in frames])),  # [T, h, w]
        "object_score_logits": torch.tensor([f.object_score for f in frames], dtype=torch.float32),  # [T]
        "frame_indices": torch.tensor([f.index for f in frames]),
        "source_indices": torch.tensor([cap.frames[f.index].source_index for f in frames]),
        "directions": [f.direction for f in frames],
        "prompts": cap.prompts.to_dict(),
        "prompt_frame": cap.prompt_frame,
        "layout": "frame axis first, in selected-frame order (frame_indices); masks at the original size",
    }, writer.path(layout.PREDICTIONS))
    return layout.PREDICTIONS


def frames_section(cap, sink: VideoRunSink | None) -> dict:
    """The summary's `frames` section: per selected frame, where it came from, how it was tracked, what SAM 2's
    memory held there and the files written for it."""
    preds = cap.prediction.by_index()
    layouts = {}
    for lay in cap.memory:
        layouts.setdefault(lay.frame, lay)  # one per memory-attention forward; the layers share it
    counts: dict[int, int] = {}
    for r in cap.attention:
        counts[r.frame_index] = counts.get(r.frame_index, 0) + 1
    order = [f.index for f in cap.prediction.frames]
    out = []
    for info in cap.frames:
        fp = preds.get(info.index)
        lay = layouts.get(info.index)
        mem = None
        if lay is not None:
            mem = {"keys": lay.keys, "verified": lay.verified, "problem": lay.problem,
                   "memory_frames": [s.frame for s in lay.segments if s.kind == "memory"],
                   "conditioning_frames": [s.frame for s in lay.segments if s.kind == "memory" and s.conditioning],
                   "pointer_frames": [s.frame for s in lay.segments if s.kind == "object_pointer"],
                   "pointer_tokens": lay.pointer_tokens}
        out.append({**info.to_dict(), "tracked": fp is not None, "order": order.index(info.index) if fp else None,
                    "direction": fp.direction if fp else None, "iou_prediction": fp.iou if fp else None,
                    "object_score_logit": fp.object_score if fp else None,
                    "mask_area_fraction": float(fp.mask.mean()) if fp else None,
                    "attention_calls": counts.get(info.index, 0), "memory": mem,
                    "files": (sink.frame_files.get(info.index, {}) if sink else {})})
    return {"count": len(cap.frames), "prompt_frame": cap.prompt_frame,
            "prompt_source_index": cap.frames[cap.prompt_frame].source_index, "processing_order": order,
            "index": "selected-frame index: SAM 2's frame_idx; source_index is the frame's place in the input",
            "list": out}


def write_video_run(writer, cap, source, *, model_info: dict, opts: OutputOptions, command: list[str] | None,
                    sink: VideoRunSink | None, extra_summary: dict | None = None, before_summary=None,
                    image_info: dict | None = None) -> dict:
    """After tracking: `predictions.pt`, `before_summary(writer)` (run-level charts), then the summary."""
    from sam2_layerwise import __version__

    files: dict = {"predictions": write_predictions(writer, cap)}
    if opts.prediction_images:
        files["prediction_images"] = f"{layout.PREDICTION_IMAGES}/"
    if opts.save_attn or opts.save_qkv or opts.save_full:
        files["attn_tensors"] = f"{layout.ATTN_TENSORS}/"
    if before_summary is not None:
        files.update(before_summary(writer) or {})
    frames = sorted(cap.prediction.frames, key=lambda f: f.index)
    summary = build_summary(
        attention=cap.attention, blocks=cap.blocks, model=model_info,
        image=image_info or {"path": None, "width": source.width, "height": source.height,
                             "video": source.describe()["path"]},
        frame=cap.frame.to_dict(), prompts={**cap.prompts.to_dict(), "prompt_frame": cap.prompt_frame},
        capture_options=cap.options.to_dict(), output_options=opts.to_dict(),
        prediction={"file": layout.PREDICTIONS, "frames": len(frames), "layout": "frame axis (selected-frame order)",
                    "iou_predictions": [f.iou for f in frames], "best": None,
                    "mask_area_fraction": [float(f.mask.mean()) for f in frames]},
        files=files, command=command, tool_version=__version__,
        extra={"mode": "video", "video": source.describe(), "frames": frames_section(cap, sink),
               "query_locations": [loc.__dict__ for loc in cap.locations], "nonfinite": cap.nonfinite_report(),
               **(extra_summary or {})},
    )
    atomic_write_json(summary, writer.path(layout.SUMMARY))
    return summary

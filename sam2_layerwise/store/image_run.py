"""Write one image capture as a run directory (seed layout)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from sam2_layerwise.api import ImageCapture
from sam2_layerwise.capture.attention import pool_keys
from sam2_layerwise.capture.records import AttentionRecord
from sam2_layerwise.render.prediction import prediction_images
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_save_png, atomic_torch_save, atomic_write_json, link_or_copy
from sam2_layerwise.store.summary import build_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputOptions:
    """What goes into the run directory, beyond the summary and predictions."""

    save_attn: bool = False
    save_qkv: bool = False
    max_tokens: int = 4096
    prediction_images: bool = True
    save_full: str | None = None  # "float32" / "float16": q/k/v of every group (`__full.pt`, compare's full mode)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def key_block_hw(record: AttentionRecord) -> tuple[int, int] | None:
    """(rows, cols) of the key grid block the record's keys cover, when keys form a grid."""
    if not record.queries or record.queries[0].key_block is None:
        return None
    r0, r1, c0, c1 = record.queries[0].key_block
    return r1 - r0, c1 - c0


def write_attention_tensors(writer: layout.RunWriter, record: AttentionRecord, opts: OutputOptions) -> None:
    """`attn_tensors/by_layer/<layer>/<stem>__attn.pt` (+ `__qkv.pt`), hard-linked into `attn_tensors/all/`."""
    stem = layout.safe_name(record.file_stem)
    layer_dir = f"{layout.ATTN_TENSORS}/by_layer/{layout.safe_name(record.layer_key)}"
    payloads = {}
    if opts.save_attn:
        pooled, pooling = pool_keys(record.probs, key_block_hw(record), opts.max_tokens)
        record.key_pooling = pooling
        payloads["attn"] = {
            "probs": pooled.contiguous(),  # [n_selected, heads, keys'] fp32; rows sum to 1
            "key_pooling": pooling,
            "queries": [q.to_dict() for q in record.queries],
            "query_stats": record.query_stats,  # name -> [groups, heads, queries_per_group]
            "layer_key": record.layer_key, "name": record.name, "kind": record.kind, "geometry": record.geometry,
        }
    if opts.save_qkv and record.qkv is not None:
        payloads["qkv"] = {**record.qkv, "queries": [q.to_dict() for q in record.queries],
                           "layer_key": record.layer_key, "geometry": record.geometry,
                           "note": "q/k/v exactly as the attention kernel used them, [groups, heads, tokens, head_dim]"}
    if opts.save_full and record.full_qkv is not None:
        dtype = getattr(torch, opts.save_full)
        full = record.full_qkv
        payloads["full"] = {
            **{t: full[t].to(dtype) for t in ("q", "k", "v")},  # [G, heads, N, d], every group
            "scale": full["scale"], "tiled": full["tiled"], "dtype": opts.save_full,
            "kernel_dtype": str(full["q"].dtype).replace("torch.", ""),
            "probs_quantizer": full.get("probs_quantizer"),
            "layer_key": record.layer_key, "geometry": record.geometry,
            "note": ("q/k/v of every group exactly as the kernel used them" if opts.save_full == "float32" else
                     f"q/k/v of every group as the kernel used them, rounded to {opts.save_full} (inexact)")
                    + "; any query row is recomputed by capture.attention.attention_rows with probs_quantizer as "
                      "transform",
        }
    for what, payload in payloads.items():
        rel = f"{layer_dir}/{stem}__{what}.pt"
        atomic_torch_save(payload, writer.path(rel))
        all_rel = f"{layout.ATTN_TENSORS}/all/{stem}__{what}.pt"
        link_or_copy(writer.path(rel), writer.path(all_rel))
        record.files[what] = rel
        record.files[f"{what}_all"] = all_rel


def write_image_run(writer: layout.RunWriter, cap: ImageCapture, image: np.ndarray, *, model_info: dict,
                    image_info: dict, opts: OutputOptions, command: list[str] | None, extra_summary: dict | None = None,
                    before_summary=None, progress: bool = True) -> dict:
    """Write predictions, prediction images and attention tensors, call `before_summary(writer)` (renderers),
    then the summary. Returns the summary dict. `progress`: a progress bar over the tensors."""
    from sam2_layerwise import __version__

    pred = cap.prediction
    files: dict = {}
    atomic_torch_save({
        "masks": torch.from_numpy(pred.masks),  # [M, H, W] bool, original resolution
        "iou_predictions": torch.from_numpy(pred.iou_predictions),  # [M]
        "low_res_logits": torch.from_numpy(pred.low_res_logits),  # [M, 256, 256] (image_size / 4)
        "prompts": cap.prompts.to_dict(),
    }, writer.path(layout.PREDICTIONS))
    files["predictions"] = layout.PREDICTIONS
    # the pictures are encoded (zlib, outside the GIL) by a thread while the tensors are saved
    with ThreadPoolExecutor(1, thread_name_prefix="png") as encoder:
        encoded = []
        if opts.prediction_images:
            files["prediction_images"] = []
            for name, img in prediction_images(image, pred.masks, pred.iou_predictions, cap.prompts).items():
                rel = f"{layout.PREDICTION_IMAGES}/{name}"
                # level 1: ~4x faster than zlib's default, ~10% larger
                encoded.append(encoder.submit(atomic_save_png, img, writer.path(rel), compress_level=1))
                files["prediction_images"].append(rel)
        if opts.save_attn or opts.save_qkv:
            for record in tqdm(cap.attention, desc="saving tensors", unit="layer", leave=False,
                               disable=None if progress else True):
                write_attention_tensors(writer, record, opts)
            files["attn_tensors"] = f"{layout.ATTN_TENSORS}/"
        for done in encoded:
            done.result()
    if before_summary is not None:
        files.update(before_summary(writer) or {})
    summary = build_summary(
        attention=cap.attention, blocks=cap.blocks, model=model_info, image=image_info, frame=cap.frame.to_dict(),
        prompts=cap.prompts.to_dict(), capture_options=cap.options.to_dict(), output_options=opts.to_dict(),
        prediction={"file": layout.PREDICTIONS, "iou_predictions": pred.iou_predictions.tolist(), "best": pred.best,
                    "mask_area_fraction": [float(m.mean()) for m in pred.masks]},
        files=files, command=command, tool_version=__version__,
        extra={"query_locations": [loc.__dict__ for loc in cap.locations], "nonfinite": cap.nonfinite_report(),
               **(extra_summary or {})},
    )
    atomic_write_json(summary, writer.path(layout.SUMMARY))
    return summary

"""`layerwise_summary.json`: versioned, documented in docs/summary_schema.md."""

from __future__ import annotations

import datetime as _dt
import math

from sam2_layerwise.capture import native
from sam2_layerwise.capture.records import AttentionRecord, BlockRecord

SCHEMA = "sam2-layerwise/summary"
SCHEMA_VERSION = 1
FP32_TOLERANCE = 1e-4


def _clean(obj):
    """JSON-safe: tuples -> lists, NaN/inf -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def attention_entry(r: AttentionRecord) -> dict:
    G, h, nq, _ = r.q_shape
    return {
        "name": r.name,
        "layer_key": r.layer_key,
        "module_type": r.module_type,
        "kind": r.kind,
        "call_index": r.call_index,
        "file_stem": r.file_stem,
        "q_shape": r.q_shape, "k_shape": r.k_shape, "v_shape": r.v_shape,
        "heads": r.heads, "head_dim": r.head_dim, "scale": r.scale, "kernel_dtype": r.kernel_dtype,
        "groups": G, "queries_per_group": nq, "keys_per_group": r.k_shape[2], "query_count": G * nq,
        "geometry": r.geometry,
        "queries": [q.to_dict() for q in r.queries],
        "head_stats": r.head_stats,
        "selected_stats": r.selected_stats,
        "fidelity": {"kernel_max_abs_err": r.kernel_max_abs_err, "module_max_abs_err": r.module_max_abs_err,
                     "checked_queries": len(r.queries),
                     "method": "fp32 softmax(q k^T scale) of the selected queries times v, through the module's "
                               "output projection, against the module's real output rows"},
        "module_output": r.module_output,
        "quant": r.quant,
        "key_pooling": r.key_pooling,
        "files": r.files,
        **({"frame": r.frame_index, "frame_call": r.frame_call} if r.frame_index is not None else {}),
        **({"memory_mass": r.memory_mass} if r.memory_mass is not None else {}),
        **({"fast_attention": True} if r.fast_attention else {}),
    }


def block_entry(b: BlockRecord) -> dict:
    return {"name": b.name, "layer_key": b.layer_key, "module_type": b.module_type, "call_index": b.call_index,
            "inputs": b.inputs, "outputs": b.outputs, **({"frame": b.frame_index} if b.frame_index is not None else {})}


FAST_NOTE = ("--fast-attention: attention outputs were computed by this tool's kernel, not torch's fused kernel; they "
             "differ in the last bits, so masks may differ from plain SAM 2 in a few pixels")


def build_summary(*, attention, blocks, model: dict, image: dict, frame: dict, prompts: dict, capture_options: dict,
                  output_options: dict, prediction: dict, files: dict, command: list[str] | None, tool_version: str,
                  extra: dict | None = None) -> dict:
    errs = [r.module_max_abs_err for r in attention if r.module_max_abs_err is not None]
    kerrs = [r.kernel_max_abs_err for r in attention]
    unchecked = sum(not math.isfinite(e) for e in errs + kerrs)  # NaN/inf in the model: nothing to compare
    errs = [e for e in errs if math.isfinite(e)]
    kerrs = [e for e in kerrs if math.isfinite(e)]
    fp32 = all(r.kernel_dtype == "float32" for r in attention)
    worst = max(errs + kerrs, default=0.0)
    ok = (worst <= FP32_TOLERANCE and not unchecked) if fp32 else None
    fast = sum(r.fast_attention for r in attention)
    return _clean({
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "sam2-layerwise", "version": tool_version, "statistics_kernel": native.used()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": model,
        "image": image,
        "frame": frame,
        "prompts": prompts,
        "capture_options": capture_options,
        "output_options": output_options,
        "prediction": prediction,
        "fidelity": {"max_module_abs_err": max(errs, default=0.0), "max_kernel_abs_err": max(kerrs, default=0.0),
                     "fp32": fp32, "tolerance": FP32_TOLERANCE if fp32 else None, "ok": ok,
                     "non_finite_checks": unchecked,
                     **({"fast_attention_calls": fast, "masks_may_differ": True,
                         "note": FAST_NOTE} if fast else {})},
        "attention_count": len(attention),
        "attention": [attention_entry(r) for r in attention],
        "blocks": [block_entry(b) for b in blocks],
        "files": files,
        **(extra or {}),
    })

"""Capture a float SAM 2 and its quantized twin on the same input and write one compare run directory.

The models are loaded one after the other (peak memory: one model plus what is saved), see the same
preprocessed image and prompts, and select the same query tokens (checked). Each half is written in
`visualize`'s layout under `original/` and `quantized/` as soon as it is captured, into the staging folder of
one RunWriter, so the run appears whole (manifest last) or not at all.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sam2_layerwise.errors import CaptureError, LayerwiseError

log = logging.getLogger("sam2_layerwise")

FULL_DTYPES = {"fp32": "float32", "fp16": "float16"}

# The loaders name visualize's flags; compare's two models have their own.
QUANT_FLAGS = {"--adaptive-qat-config": "--config-quantized", "--config": "--config-original",
               "--checkpoint": "--checkpoint-quantized"}
FLOAT_FLAGS = {"--config": "--config-original", "--checkpoint": "--checkpoint-original"}


@contextlib.contextmanager
def renamed_flags(names: dict[str, str]):
    """Re-raise a LayerwiseError with the flag names compare uses (in the flag and in the message)."""
    try:
        yield
    except LayerwiseError as exc:
        if exc.flag not in names and not any(old in exc.detail for old in names):
            raise
        detail = exc.detail
        for old, new in names.items():
            detail = detail.replace(f"{old} ", f"{new} ")
        raise type(exc)(detail, flag=names.get(exc.flag, exc.flag), value=exc.value) from None


@dataclass
class ModelSpec:
    name: str  # "original" / "quantized"
    config: str
    checkpoint: str
    qcfg: object | None  # QuantConfig for the quantized half


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from sam2_layerwise import __version__

    try:
        sam2_version = version("sam2")
    except PackageNotFoundError:
        sam2_version = None
    return {"sam2_layerwise": __version__, "torch": torch.__version__, "sam2": sam2_version}


def _build(spec: ModelSpec, args):
    from sam2_layerwise.model import build_model
    from sam2_layerwise.quant import load_quantized_model

    overrides = {"model.image_size": args.image_size} if getattr(args, "image_size", None) else None
    if spec.qcfg is None:
        with renamed_flags(FLOAT_FLAGS):
            return build_model(spec.config, spec.checkpoint, device=args.device, overrides=overrides), None
    with renamed_flags(QUANT_FLAGS):
        return load_quantized_model(spec.config, spec.checkpoint, spec.qcfg, device=args.device,
                                    overrides=overrides)


def _selection(cap) -> list:
    return [(r.layer_key, r.call_index, [(q.label, q.group, q.index) for q in r.queries]) for r in cap.attention]


def _attach_probs_quantizers(cap, qm) -> None:
    """Full mode: each quantized record's probability quantizer travels with its q/k/v."""
    from sam2_layerwise.quant.apply import site_id

    for rec in cap.attention:
        fq = qm.quantizers.get(site_id(rec.name, "probs"))
        if rec.full_qkv is not None:
            rec.full_qkv["probs_quantizer"] = fq.to_payload() if fq is not None else None


def _kept(cap) -> dict:
    """What the float half leaves for the quantized half to be measured against: per call, the selected rows
    and the q/k/v of the groups holding them (in memory only; windows, or the whole grid of a global block)."""
    return {(r.layer_key, r.call_index): (r.probs, r.qkv, [q.group for q in r.queries]) for r in cap.attention}


def selected_errors(kept: dict, cap) -> dict:
    """Per quantized call (by file stem): relative error ||Q - FP|| / ||FP|| per head of q, k, v over the groups
    holding the selected queries, and of the attention output probs @ v over the selected rows."""
    from sam2_layerwise.metrics import relative_error

    out = {}
    for rec in cap.attention:
        fp_probs, fp_qkv, groups = kept[rec.layer_key, rec.call_index]
        if fp_qkv is None or rec.qkv is None or fp_qkv["q"].shape != rec.qkv["q"].shape:
            continue
        errs = {f"{n}_rel_err": relative_error(fp_qkv[n].float(), rec.qkv[n].float(), (0, 2, 3)).tolist()
                for n in ("q", "k", "v")}
        if groups:
            gi = [fp_qkv["groups"].index(g) for g in groups]
            of = torch.einsum("nhk,nhkd->nhd", fp_probs, fp_qkv["v"].float()[gi])  # [n, heads, d_v]
            oq = torch.einsum("nhk,nhkd->nhd", rec.probs, rec.qkv["v"].float()[gi])
            errs["out_rel_err"] = relative_error(of, oq, (0, 2)).tolist()
        out[rec.file_stem] = {**errs, "over": "q/k/v: the groups holding the selected queries; out: the selected rows"}
    return out


def _drop_whole_grid_qkv(cap, full: bool) -> None:
    """Saved q/k/v: none in full mode (the full tensors hold them); in light mode only windows (a few KiB each),
    not the whole grid of global blocks and the decoder (tens of MiB), which the errors above already measured."""
    for rec in cap.attention:
        if full or (rec.qkv is not None and rec.q_shape[0] == 1):
            rec.qkv = None


def compare_capture(specs: list[ModelSpec], image: np.ndarray, prompts, out_dir: Path, *, args) -> dict:
    """Capture each model in turn into `out_dir/<name>/`; write `manifest.json` last. Returns a small report."""
    from sam2_layerwise import layers as layer_sel
    from sam2_layerwise.api import capture_image
    from sam2_layerwise.capture import CaptureOptions
    from sam2_layerwise.cli.quantize import annotate_capture
    from sam2_layerwise.store import compare_run as cr
    from sam2_layerwise.store.atomic import atomic_write_json
    from sam2_layerwise.store.image_run import OutputOptions, write_image_run
    from sam2_layerwise.store.layout import RunWriter

    full = bool(args.save_full_attn)
    mode = "full" if full else "light"
    image_path = Path(args.image).resolve()
    image_info = {"path": str(image_path), "sha256": cr.sha256_file(image_path), "width": int(image.shape[1]),
                  "height": int(image.shape[0])}
    # Tensors of every selected query are saved whole (never key-pooled): generate compares them exactly.
    out_opts = OutputOptions(save_attn=True, save_qkv=True, max_tokens=1 << 62, prediction_images=True,
                             save_full=FULL_DTYPES[args.full_dtype] if full else None)
    models, selection, calls = {}, None, 0
    owned = (cr.MANIFEST, *cr.HALVES, cr.ANALYSIS)  # a new compare also drops the old run's analysis
    with RunWriter(out_dir, owned=owned, kind=cr.COMPARE_RUN) as writer:
        for spec in specs:
            loaded, qm = _build(spec, args)
            keys = layer_sel.attention_layer_keys(loaded.model, image_mode=True)
            chosen = layer_sel.select(keys, args.layers)
            options = CaptureOptions(max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk,
                                     all_query_stats=True, keep_qkv=True, keep_all_qkv=full,
                                     layers=None if args.layers is None else tuple(chosen))
            log.info("%s: %s (%s) on %s, %d attention modules", spec.name, loaded.config_path.name,
                     loaded.checkpoint_path, loaded.device, len(chosen))
            with tqdm(total=len(chosen), desc=f"capturing {spec.name}", unit="attn",
                      disable=True if args.quiet else None) as bar, \
                    (qm.monitoring() if qm else contextlib.nullcontext()):
                cap = capture_image(loaded.model, image, prompts, options, multimask=not args.single_mask,
                                    precision=args.precision, on_record=lambda r: bar.update(1))
            if selection is None:
                selection, kept = _selection(cap), _kept(cap)
            elif _selection(cap) != selection:
                raise CaptureError("the two models selected different query tokens (their architectures differ); "
                                   "compare needs the quantized twin of the original model",
                                   flag="--config-quantized", value=args.config_quantized)
            extra = {"compare": {"half": spec.name, "mode": mode}}
            if qm is not None:
                extra.update(annotate_capture(cap, qm))
                _attach_probs_quantizers(cap, qm)
                extra["compare"]["errors"] = selected_errors(kept, cap)
                del kept
            _drop_whole_grid_qkv(cap, full)
            write_image_run(writer.sub(spec.name), cap, image, model_info=loaded.describe(), image_info=image_info,
                            opts=out_opts, command=["sam2-layerwise", *getattr(args, "argv", [])],
                            extra_summary=extra)
            calls = len(cap.attention)
            ckpt = loaded.checkpoint_path
            models[spec.name] = {
                **loaded.describe(),
                "config_sha256": cr.sha256_file(loaded.config_path),
                "checkpoint_sha256": cr.sha256_file(ckpt) if ckpt else None,
                "quantized": qm is not None,
                "nonfinite": cap.nonfinite_report()["first"],
            }
            del cap, loaded, qm
            gc.collect()  # one model at a time
        qcfg = specs[-1].qcfg
        qpath = Path(args.config_quantized).expanduser()
        manifest = {
            "schema": cr.SCHEMA, "schema_version": cr.SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": ["sam2-layerwise", *getattr(args, "argv", [])],
            "versions": _versions(),
            "mode": mode,
            "full_dtype": FULL_DTYPES[args.full_dtype] if full else None,
            "halves": {name: f"{name}/" for name in cr.HALVES},
            "models": models,
            "quantization_config": {"path": str(qpath.resolve()), "sha256": cr.sha256_file(qpath),
                                    "text": qpath.read_text(errors="replace"),
                                    "base_config": getattr(qcfg, "base_config", None)},
            "image": image_info,
            "prompts": prompts.to_dict(),
            "capture_options": {"max_attn_queries": args.max_attn_queries, "stats_topk": args.stats_topk,
                                "layers": args.layers, "device": args.device, "precision": args.precision,
                                "single_mask": bool(args.single_mask), "image_size": args.image_size},
            "attention_calls": calls,
        }
        atomic_write_json(manifest, writer.path(cr.MANIFEST))
    return {"mode": mode, "attention_calls": calls}

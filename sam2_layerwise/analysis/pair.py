"""Capture a float SAM 2 and its quantized twin on the same input and write one compare run directory.

The models are loaded one after the other (peak memory: one model plus what is saved), see the same
preprocessed image and prompts, and select the same query tokens (checked). Each half is written in
`visualize`'s layout under `original/` and `quantized/` as soon as it is captured, into the staging folder of
one RunWriter, so the run appears whole (manifest last) or not at all.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
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


def _build(spec: ModelSpec, args, reuse=None):
    """The half's model; `reuse` (the float half's LoadedModel, done with) lends its modules to the quantized half
    when the architecture is the same (`build_model`'s `reuse`)."""
    from sam2_layerwise.model import build_model
    from sam2_layerwise.quant import load_quantized_model

    overrides = {"model.image_size": args.image_size} if getattr(args, "image_size", None) else None
    if spec.qcfg is None:
        with renamed_flags(FLOAT_FLAGS):
            return build_model(spec.config, spec.checkpoint, device=args.device, overrides=overrides), None
    with renamed_flags(QUANT_FLAGS):
        return load_quantized_model(spec.config, spec.checkpoint, spec.qcfg, device=args.device,
                                    overrides=overrides, reuse=reuse)


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


def output_options(full: bool, full_dtype: str = "fp32"):
    """What each half of a compare run saves. Tensors of every selected query are saved whole (never key-pooled):
    generate compares them exactly."""
    from sam2_layerwise.store.image_run import OutputOptions

    return OutputOptions(save_attn=True, save_qkv=True, max_tokens=1 << 62, prediction_images=True,
                         save_full=FULL_DTYPES[full_dtype] if full else None)


def image_info(path, image: np.ndarray, sha256: str | None = None) -> dict:
    from sam2_layerwise.store import compare_run as cr

    path = Path(path).resolve()
    return {"path": str(path), "sha256": sha256 or cr.sha256_file(path), "width": int(image.shape[1]),
            "height": int(image.shape[0])}


def model_entry(loaded, qm, cap, hashes: dict | None = None, sha=None) -> dict:
    """`manifest.json`'s `models.<half>`; `hashes` (config_sha256, checkpoint_sha256) when already known, else
    taken with `sha` (a `BackgroundHashes.get`; default `sha256_file`)."""
    from sam2_layerwise.store import compare_run as cr

    if hashes is None:
        sha = sha or cr.sha256_file
        ckpt = loaded.checkpoint_path
        hashes = {"config_sha256": sha(loaded.config_path), "checkpoint_sha256": sha(ckpt) if ckpt else None}
    return {**loaded.describe(), **hashes, "quantized": qm is not None, "nonfinite": cap.nonfinite_report()["first"]}


def write_half(writer, name: str, cap, image: np.ndarray, *, model_info: dict, image_info: dict, out_opts,
               command: list[str], mode: str, full: bool, qm=None, kept: dict | None = None,
               extra: dict | None = None, progress: bool = True) -> None:
    """One half (`original/` or `quantized/`) of a compare run, in visualize's layout. For the quantized half
    (`qm` given) the summary also gets the quantizers' report and `compare.errors` measured against `kept`
    (the original half's `_kept`). `progress`: whether its tensors get a progress bar (not when written in
    the background, under another bar)."""
    from sam2_layerwise.cli.quantize import annotate_capture
    from sam2_layerwise.store.image_run import write_image_run

    summary_extra = {"compare": {"half": name, "mode": mode}}
    if qm is not None:
        summary_extra.update(annotate_capture(cap, qm))
        _attach_probs_quantizers(cap, qm)
        summary_extra["compare"]["errors"] = selected_errors(kept, cap)
    summary_extra.update(extra or {})
    _drop_whole_grid_qkv(cap, full)
    write_image_run(writer.sub(name), cap, image, model_info=model_info, image_info=image_info, opts=out_opts,
                    command=command, extra_summary=summary_extra, progress=progress)


def compare_manifest(args, *, mode: str, models: dict, image_info: dict, prompts, calls: int, qcfg,
                     extra: dict | None = None, sha=None) -> dict:
    """`manifest.json` of a compare run (docs/compare.md): written last. `sha`: as in `model_entry`."""
    from sam2_layerwise.store import compare_run as cr

    sha = sha or cr.sha256_file
    full_dtype = getattr(args, "full_dtype", "fp32")
    qpath = Path(args.config_quantized).expanduser()
    return {
        "schema": cr.SCHEMA, "schema_version": cr.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["sam2-layerwise", *getattr(args, "argv", [])],
        "versions": _versions(),
        "mode": mode,
        "full_dtype": FULL_DTYPES[full_dtype] if mode == "full" else None,
        "halves": {name: f"{name}/" for name in cr.HALVES},
        "models": models,
        "quantization_config": {"path": str(qpath.resolve()), "sha256": sha(qpath),
                                "text": qpath.read_text(errors="replace"),
                                "base_config": getattr(qcfg, "base_config", None)},
        "image": image_info,
        "prompts": prompts.to_dict(),
        "capture_options": {"max_attn_queries": args.max_attn_queries, "stats_topk": args.stats_topk,
                            "layers": args.layers, "device": args.device, "precision": args.precision,
                            "single_mask": bool(args.single_mask), "image_size": args.image_size},
        "attention_calls": calls,
        **(extra or {}),
    }


def compare_capture(specs: list[ModelSpec], image: np.ndarray, prompts, out_dir: Path, *, args) -> dict:
    """Capture each model in turn into `out_dir/<name>/`; write `manifest.json` last. Returns a small report.

    With `args.attribute`, the quantized model is also run with one layer at a time restored to full
    precision (`analysis.attribute`) and `attribution.json` is written beside the halves."""
    from sam2_layerwise import layers as layer_sel
    from sam2_layerwise.api import capture_image
    from sam2_layerwise.capture import CaptureOptions
    from sam2_layerwise.store import compare_run as cr
    from sam2_layerwise.store.atomic import atomic_write_json
    from sam2_layerwise.store.layout import RunWriter

    from sam2_layerwise.store.hashing import BackgroundHashes

    full = bool(args.save_full_attn)
    mode = "full" if full else "light"
    attribute = getattr(args, "attribute", False)
    hashes = BackgroundHashes()  # the manifest's SHA-256s, taken while the models build and run
    hashes.start(args.image, args.config_quantized, specs[0].config, specs[0].checkpoint)
    info = None
    out_opts = output_options(full, args.full_dtype)
    command = ["sam2-layerwise", *getattr(args, "argv", [])]
    models, selection, calls, extra = {}, None, 0, {}
    fp_side = None  # attribution: what the float half leaves behind (state, prediction, block cache)
    owned = cr.owned_entries(out_dir, cr.MANIFEST, *cr.HALF_ENTRIES, cr.ANALYSIS, cr.ATTRIBUTION)  # and old analyses
    reuse = None  # the float half's model, lent to the quantized half (not with --attribute, which keeps both)
    pending = None  # the float half, written in the background
    # the pool is left (waiting for the writing) before the writer cleans up after a failure
    with RunWriter(out_dir, owned=owned, kind=cr.COMPARE_RUN) as writer, hashes, \
            ThreadPoolExecutor(1, thread_name_prefix="compare-write") as background:
        for spec in specs:
            hashes.start(spec.config, spec.checkpoint)
            loaded, qm = _build(spec, args, reuse=reuse)
            reused = reuse is not None and loaded.model is reuse.model
            reuse = None
            keys = layer_sel.attention_layer_keys(loaded.model, image_mode=True)
            chosen = layer_sel.select(keys, args.layers)
            options = CaptureOptions(max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk,
                                     all_query_stats=True, keep_qkv=True, keep_all_qkv=full,
                                     layers=None if args.layers is None else tuple(chosen))
            log.info("%s: %s (%s) on %s, %d attention modules", spec.name, loaded.config_path.name,
                     loaded.checkpoint_path, loaded.device, len(chosen))
            cache = None
            # the baseline attribution restarts from: the quantized run (restore), the float run (isolate)
            if attribute and (qm is None) == (getattr(args, "attribute_mode", "restore") == "isolate"):
                from sam2_layerwise.analysis.attribute import ForwardCache

                cache = ForwardCache(loaded.model)
            with tqdm(total=len(chosen), desc=f"capturing {spec.name}", unit="attn",
                      disable=True if args.quiet else None) as bar, \
                    (qm.monitoring() if qm else contextlib.nullcontext()), (cache or contextlib.nullcontext()):
                cap = capture_image(loaded.model, image, prompts, options, multimask=not args.single_mask,
                                    precision=args.precision, on_record=lambda r: bar.update(1))
            if selection is None:
                selection, kept = _selection(cap), _kept(cap)
            elif _selection(cap) != selection:
                raise CaptureError("the two models selected different query tokens (their architectures differ); "
                                   "compare needs the quantized twin of the original model",
                                   flag="--config-quantized", value=args.config_quantized)
            if attribute and qm is None:
                fp_side = {"state": {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()},
                           "prediction": cap.prediction, "cache": cache}
            elif attribute:
                extra["attribution"] = _attribute_one(loaded.model, qm, image, prompts, cap, cache, fp_side, args)
                atomic_write_json(extra["attribution"], writer.path(cr.ATTRIBUTION))
                fp_side = None
            info = info or image_info(args.image, image, hashes.get(args.image))
            if pending is not None:
                pending.result()  # the float half is on disk (or its error is raised here)
                pending = None
            job = functools.partial(write_half, writer, spec.name, cap, image, model_info=loaded.describe(),
                                    image_info=info, out_opts=out_opts, command=command, mode=mode, full=full,
                                    qm=qm, kept=kept if qm is not None else None, progress=spec is specs[-1])
            if spec is specs[-1]:
                job()
            else:  # written while the next model loads and runs (its files need nothing of the model)
                pending = background.submit(job)
            calls = len(cap.attention)
            models[spec.name] = model_entry(loaded, qm, cap, sha=hashes.get)
            if qm is None and not attribute:
                reuse = loaded
            del cap, loaded, qm, cache
            if spec is not specs[-1] and reuse is None:
                gc.collect()  # one model at a time (a SAM 2 model holds reference cycles: only gc frees it)
        log.debug("the quantized half %s the float half's modules", "reused" if reused else "built its own")
        manifest = compare_manifest(args, mode=mode, models=models, image_info=info, prompts=prompts, calls=calls,
                                    qcfg=specs[-1].qcfg,
                                    extra={"attribution": cr.ATTRIBUTION} if attribute else None, sha=hashes.get)
        atomic_write_json(manifest, writer.path(cr.MANIFEST))
    return {"mode": mode, "attention_calls": calls, "attribution": extra.get("attribution")}


def _attribute_one(model, qm, image, prompts, q_cap, q_cache, fp_side, args) -> dict:
    """compare --attribute: the float half's state and prediction against the quantized model in memory."""
    from sam2_layerwise.analysis.attribute import AttributionContext, attribution_report, attribute

    ctx = AttributionContext.for_models(model, qm, fp_state=fp_side["state"], image=image, prompts=prompts,
                                        multimask=not args.single_mask, precision=args.precision)
    ctx.set_baselines(fp_prediction=fp_side["prediction"], fp_cache=fp_side["cache"],
                      q_prediction=q_cap.prediction, q_cache=q_cache)
    mode = getattr(args, "attribute_mode", None) or "restore"
    rows = attribute(ctx, layers=getattr(args, "attribute_layers", None), mode=mode)
    return attribution_report(rows, ctx, mode)

"""`compare --video`: a float SAM 2 and its fake-quantized twin track the same frames from the same prompt; one
compare run directory holds both video captures (`original/`, `quantized/`, each a `visualize --video` run) and
`manifest.json`, so `generate` ranks every captured layer, memory attention included, call by call (one call per
frame) and measures the output impact frame by frame (predictions.pt has a frame axis).

Memory bounds: each half is written frame by frame while it tracks. What the float half leaves for the quantized
half to be measured against is only the selected query rows and the q/k/v of Hiera windows holding them (a few
KiB per call), never whole-grid q/k/v (global blocks, decoder, memory attention).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from sam2_layerwise.errors import CaptureError, InputError

log = logging.getLogger("sam2_layerwise")


def prepare(args):
    """Every input checked before a model is loaded: modes, quantization config against the original config,
    frames, prompts, output directory. Returns (qcfg, source, prompts, prompt_index, out_dir)."""
    from sam2_layerwise.cli.video import selection
    from sam2_layerwise.frames import open_video, resolve_prompt_frame
    from sam2_layerwise.inputs import parse_prompts
    from sam2_layerwise.store.layout import COMPARE_RUN, check_output_dir

    if args.full_dtype != "fp32" and not args.save_full_attn:
        raise InputError("only applies to --save-full-attn", flag="--full-dtype", value=args.full_dtype)
    if getattr(args, "attribute", False):
        raise InputError("is not available in video mode (it re-runs single images)", flag="--attribute")
    from sam2_layerwise.cli.compare import quant_config_and_base

    qcfg = quant_config_and_base(args)
    sel = selection(args)
    out_dir = check_output_dir(args.output_dir, "--output-dir", COMPARE_RUN)
    source = open_video(args.video, sel, max_pixels=args.max_pixels)
    try:
        prompt_index = resolve_prompt_frame(source, args.prompt_frame)
        prompts = parse_prompts(args.points, args.box, args.query_points, source.width, source.height)
    except BaseException:
        source.close()
        raise
    return qcfg, source, prompts, prompt_index, out_dir


def _build(spec, args):
    from sam2_layerwise.analysis.pair import FLOAT_FLAGS, QUANT_FLAGS, renamed_flags
    from sam2_layerwise.model import build_model
    from sam2_layerwise.model.video import video_overrides
    from sam2_layerwise.quant import load_quantized_model

    overrides = video_overrides(getattr(args, "image_size", None))
    if spec.qcfg is None:
        with renamed_flags(FLOAT_FLAGS):
            return build_model(spec.config, spec.checkpoint, device=args.device, overrides=overrides), None
    with renamed_flags(QUANT_FLAGS):
        return load_quantized_model(spec.config, spec.checkpoint, spec.qcfg, device=args.device, overrides=overrides)


def _keep(record) -> tuple:
    """What the float half keeps of one call: selected rows and, for Hiera windows, their q/k/v (small)."""
    qkv = record.qkv if record.qkv is not None and record.q_shape[0] > 1 else None
    return record.probs.clone(), qkv, [q.group for q in record.queries]


def compare_video(specs, source, prompts, prompt_index: int, out_dir: Path, *, args) -> dict:
    from sam2_layerwise import layers as layer_sel
    from sam2_layerwise.analysis.pair import FULL_DTYPES, _versions, selected_errors
    from sam2_layerwise.api_video import capture_video
    from sam2_layerwise.capture import CaptureOptions
    from sam2_layerwise.quant.apply import site_id
    from sam2_layerwise.store import compare_run as cr
    from sam2_layerwise.store.atomic import atomic_write_json
    from sam2_layerwise.store.image_run import OutputOptions
    from sam2_layerwise.store.layout import RunWriter
    from sam2_layerwise.store.video_run import VideoRunSink, write_video_run

    full = bool(args.save_full_attn)
    mode = "full" if full else "light"
    out_opts = OutputOptions(save_attn=True, save_qkv=True, max_tokens=1 << 62, prediction_images=True,
                             save_full=FULL_DTYPES[args.full_dtype] if full else None)
    video_info = {"path": None, "video": str(source.path), "sha256": source.sha256(), "width": source.width,
                  "height": source.height}
    models, selection, kept, calls = {}, None, {}, 0
    owned = (cr.MANIFEST, *cr.HALVES, cr.ANALYSIS)
    with RunWriter(out_dir, owned=owned, kind=cr.COMPARE_RUN) as writer:
        for spec in specs:
            loaded, qm = _build(spec, args)
            keys = layer_sel.attention_layer_keys(loaded.model)
            chosen = layer_sel.select(keys, args.layers)
            options = CaptureOptions(max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk,
                                     all_query_stats=True, keep_qkv=True, keep_all_qkv=full,
                                     layers=None if args.layers is None else tuple(chosen))
            log.info("%s: %s (%s) on %s, %d attention modules x %d frames", spec.name, loaded.config_path.name,
                     loaded.checkpoint_path, loaded.device, len(chosen), len(source))
            sink = VideoRunSink(writer.sub(spec.name), source, prompts, prompt_index, out_opts)
            errors: dict = {}

            def on_frame(fc, qm=qm, spec=spec, errors=errors, sink=sink):
                for r in fc.attention:
                    if qm is not None:
                        r.quant = qm.module_report(r.name)
                        if r.full_qkv is not None:
                            fq = qm.quantizers.get(site_id(r.name, "probs"))
                            r.full_qkv["probs_quantizer"] = fq.to_payload() if fq is not None else None
                if qm is None:
                    kept.update({(r.layer_key, r.call_index): _keep(r) for r in fc.attention})
                else:
                    errors.update(selected_errors(kept, SimpleNamespace(attention=[
                        r for r in fc.attention if (r.layer_key, r.call_index) in kept])))
                for r in fc.attention:  # light mode saves windows' q/k/v only; full mode saves every group
                    if full or (r.qkv is not None and r.q_shape[0] == 1):
                        r.qkv = None
                sink(fc)

            with (qm.monitoring() if qm else contextlib.nullcontext()):
                cap = capture_video(loaded.model, source, prompts, options, prompt_frame=prompt_index,
                                    precision=args.precision, on_frame=on_frame)
            sel = [(r.layer_key, r.call_index, r.frame_index, r.k_shape,
                    [(q.label, q.group, q.index) for q in r.queries]) for r in cap.attention]
            if selection is None:
                selection = sel
            elif sel != selection:
                raise CaptureError("the two models captured different calls, query tokens or memory keys (their "
                                   "architectures differ); compare needs the quantized twin of the original model",
                                   flag="--config-quantized", value=args.config_quantized)
            extra = {"compare": {"half": spec.name, "mode": mode}}
            if qm is not None:
                extra["quantization"] = qm.report()
                extra["compare"]["errors"] = errors
                extra["compare"]["errors_note"] = ("video mode: q/k/v errors for Hiera windows only (whole-grid q/k/v "
                                                   "are not kept across frames); probability rows for every call")
            write_video_run(writer.sub(spec.name), cap, source, model_info=loaded.describe(), opts=out_opts,
                            command=["sam2-layerwise", *getattr(args, "argv", [])], sink=sink, extra_summary=extra,
                            image_info=video_info)  # the halves name the same input: the video's fingerprint
            calls = len(cap.attention)
            ckpt = loaded.checkpoint_path
            models[spec.name] = {**loaded.describe(), "config_sha256": cr.sha256_file(loaded.config_path),
                                 "checkpoint_sha256": cr.sha256_file(ckpt) if ckpt else None,
                                 "quantized": qm is not None, "nonfinite": cap.nonfinite_report()["first"]}
            del cap, loaded, qm
            gc.collect()
        qpath = Path(args.config_quantized).expanduser()
        manifest = {
            "schema": cr.SCHEMA, "schema_version": cr.SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": ["sam2-layerwise", *getattr(args, "argv", [])], "versions": _versions(),
            "mode": mode, "full_dtype": FULL_DTYPES[args.full_dtype] if full else None,
            "halves": {name: f"{name}/" for name in cr.HALVES}, "models": models,
            "quantization_config": {"path": str(qpath.resolve()), "sha256": cr.sha256_file(qpath),
                                    "text": qpath.read_text(errors="replace"),
                                    "base_config": getattr(specs[-1].qcfg, "base_config", None)},
            "image": video_info, "video": source.describe(), "prompt_frame": prompt_index,
            "prompts": {**prompts.to_dict(), "prompt_frame": prompt_index},
            "capture_options": {"max_attn_queries": args.max_attn_queries, "stats_topk": args.stats_topk,
                                "layers": args.layers, "device": args.device, "precision": args.precision,
                                "single_mask": bool(args.single_mask), "image_size": args.image_size},
            "attention_calls": calls,
        }
        atomic_write_json(manifest, writer.path(cr.MANIFEST))
    return {"mode": mode, "attention_calls": calls}


def run(args) -> int:
    from sam2_layerwise.analysis.pair import ModelSpec
    from sam2_layerwise.cli.common import setup_logging

    setup_logging(args.quiet)
    qcfg, source, prompts, prompt_index, out_dir = prepare(args)
    with source:
        t0 = time.perf_counter()
        specs = [ModelSpec("original", args.config_original, args.checkpoint_original, None),
                 ModelSpec("quantized", args.config_original, args.checkpoint_quantized, qcfg)]
        result = compare_video(specs, source, prompts, prompt_index, out_dir, args=args)
    log.info("compare --video (%s mode) wrote %s in %.1f s: original/ and quantized/ (%d attention calls each over "
             "%d frames), manifest.json", result["mode"], out_dir, time.perf_counter() - t0, result["attention_calls"],
             len(source))
    log.info("next: sam2-layerwise generate --run_dir %s", out_dir)
    return 0

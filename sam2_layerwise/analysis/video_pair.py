"""`compare --video`: a float SAM 2 and its fake-quantized twin track the same frames from the same prompt; one
compare run directory holds both video captures (`original/`, `quantized/`, each a `visualize --video` run) and
`manifest.json`, so `generate` ranks every captured layer, memory attention included, call by call (one call per
frame) and measures the output impact frame by frame (predictions.pt has a frame axis).

Memory bounds: both models are held and track in lockstep (`FloatHalf`), one frame at a time each; every
quantized attention call is measured against the float half's same call (q/k/v and attention-output errors, as
in image mode) as soon as it is computed, then both calls' whole-grid q/k/v are dropped. What is kept across
frames is what each half writes anyway; the extra over one model at a time is the second model and one frame of
the float half's whole-grid q/k/v (README, video section).
"""

from __future__ import annotations

import datetime as _dt
import logging
import queue
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

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


class FloatHalf:
    """The float half tracking in a thread of its own, in step with the quantized half: it computes a frame, hands
    it over and waits until the quantized half has computed the same frame. Only one model runs at any moment
    (the capture routes each module's SDPA through a process-wide swap), and what the float half keeps for the
    quantized half to be measured against is one frame's records, whole-grid q/k/v included, never more.

    `track(on_frame)` runs the float capture (`api_video.capture_video`) and returns its VideoCapture."""

    def __init__(self, track):
        self._handed: queue.Queue = queue.Queue()
        self._go = threading.Semaphore(0)
        self._stopping = False
        self._thread = threading.Thread(target=self._main, args=(track,), name="sam2lw-float-half", daemon=True)

    def _main(self, track) -> None:
        try:
            cap = track(self._on_frame)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._handed.put(("error", exc))
        else:
            self._handed.put(("done", cap))

    def _on_frame(self, fc) -> None:
        self._handed.put(("frame", fc))
        self._go.acquire()
        if self._stopping:
            raise _Stopped("the quantized half stopped")

    def start(self) -> None:
        self._thread.start()

    def next(self):
        """The float half's next FrameCapture, or its VideoCapture once it has tracked every frame."""
        kind, value = self._handed.get()
        if kind == "error":
            raise value
        return value

    def resume(self) -> None:
        """Let the float half compute its next frame (the caller then waits for it with `next`)."""
        self._go.release()

    def stop(self) -> None:
        """Unwind the float half wherever it waits (after an error on the quantized side) and join it."""
        if self._thread.is_alive():
            self._stopping = True
            self._go.release()
            self._thread.join()


class _Stopped(Exception):
    pass


def _calls(records) -> list:
    """What both halves must have captured alike on a frame: calls, memory keys and query tokens."""
    return [(r.layer_key, r.call_index, r.frame_index, r.k_shape, [(q.label, q.group, q.index) for q in r.queries])
            for r in records]


def compare_video(specs, source, prompts, prompt_index: int, out_dir: Path, *, args) -> dict:
    """Both models track the same frames in lockstep (`FloatHalf`): each quantized attention call is measured
    against the float half's same call as soon as it is computed (`analysis.pair.selected_errors`: q/k/v over
    the groups holding the selected queries, the whole grid for global blocks, the decoder and memory attention;
    the attention output over the selected rows), then the whole-grid q/k/v of both are dropped."""
    from sam2_layerwise import layers as layer_sel
    from sam2_layerwise.analysis.pair import FULL_DTYPES, _drop_whole_grid_qkv, _kept, _versions, selected_errors
    from sam2_layerwise.api_video import FrameCapture, capture_video
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
    video_info = {"path": None, "video": source.describe()["path"], "sha256": source.sha256(), "width": source.width,
                  "height": source.height}
    command = ["sam2-layerwise", *getattr(args, "argv", [])]
    owned = cr.owned_entries(out_dir, cr.MANIFEST, *cr.HALF_ENTRIES, cr.ANALYSIS)
    with RunWriter(out_dir, owned=owned, kind=cr.COMPARE_RUN) as writer:
        halves = {}
        for spec in specs:  # both models are held: they track side by side
            loaded, qm = _build(spec, args)
            chosen = layer_sel.select(layer_sel.attention_layer_keys(loaded.model), args.layers)
            options = CaptureOptions(max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk,
                                     all_query_stats=True, keep_qkv=True, keep_all_qkv=full,
                                     layers=None if args.layers is None else tuple(chosen))
            log.info("%s: %s (%s) on %s, %d attention modules x %d frames", spec.name, loaded.config_path.name,
                     loaded.checkpoint_path, loaded.device, len(chosen), len(source))
            halves[spec.name] = SimpleNamespace(loaded=loaded, qm=qm, options=options, cap=None,
                                                sink=VideoRunSink(writer.sub(spec.name), source, prompts, prompt_index,
                                                                  out_opts))
        fp, q = halves["original"], halves["quantized"]
        errors: dict = {}
        step = {"frame": None, "kept": {}}  # the float half's frame the quantized half is computing

        def track_float(on_frame):
            return capture_video(fp.loaded.model, source, prompts, fp.options, prompt_frame=prompt_index,
                                 precision=args.precision, on_frame=on_frame)

        def mismatch(what: str) -> CaptureError:
            return CaptureError(f"the two models captured different {what} (their architectures differ); compare "
                                "needs the quantized twin of the original model", flag="--config-quantized",
                                value=args.config_quantized)

        def take(got) -> None:
            if isinstance(got, FrameCapture):
                step["frame"], step["kept"] = got, {(r.layer_key, r.call_index): r for r in got.attention}
            else:  # the float half's VideoCapture: it has tracked every frame
                fp.cap, step["frame"], step["kept"] = got, None, {}

        def on_record(rec) -> None:  # a quantized call, just computed: measured against the float half's
            fr = step["kept"].get((rec.layer_key, rec.call_index))
            if fr is None:
                raise mismatch(f"attention calls (no float call {rec.layer_key} #{rec.call_index})")
            q_t = (rec.qkv or {}).get("q")  # measured in fp32 even inside a bf16 autocast region
            with torch.autocast(q_t.device.type if q_t is not None else "cpu", enabled=False):
                errors.update(selected_errors(_kept(SimpleNamespace(attention=[fr])),
                                              SimpleNamespace(attention=[rec])))
            _drop_whole_grid_qkv(SimpleNamespace(attention=[rec, fr]), full)

        def on_frame(fc) -> None:
            fc_fp = step["frame"]
            if fc_fp is None or fc_fp.index != fc.index or _calls(fc_fp.attention) != _calls(fc.attention):
                raise mismatch("frames, calls, query tokens or memory keys")
            for r in fc.attention:
                r.quant = q.qm.module_report(r.name)
                if r.full_qkv is not None:
                    fq = q.qm.quantizers.get(site_id(r.name, "probs"))
                    r.full_qkv["probs_quantizer"] = fq.to_payload() if fq is not None else None
            fp.sink(fc_fp)
            q.sink(fc)
            float_half.resume()
            take(float_half.next())

        float_half = FloatHalf(track_float)
        float_half.start()
        try:
            take(float_half.next())
            if fp.cap is not None:
                raise CaptureError("the float model tracked no frame", flag="--video", value=str(source.path))
            with q.qm.monitoring():
                q.cap = capture_video(q.loaded.model, source, prompts, q.options, prompt_frame=prompt_index,
                                      precision=args.precision, on_frame=on_frame, on_record=on_record)
            if fp.cap is None:
                raise mismatch("frames (the float model tracked more)")
        finally:
            float_half.stop()
        models = {}
        for name, h in halves.items():
            extra = {"compare": {"half": name, "mode": mode}}
            if h.qm is not None:
                extra["quantization"] = h.qm.report()
                extra["compare"]["errors"] = errors
                extra["compare"]["errors_note"] = ERRORS_NOTE
            write_video_run(writer.sub(name), h.cap, source, model_info=h.loaded.describe(), opts=out_opts,
                            command=command, sink=h.sink, extra_summary=extra,
                            image_info=video_info)  # the halves name the same input: the video's fingerprint
            ckpt = h.loaded.checkpoint_path
            models[name] = {**h.loaded.describe(), "config_sha256": cr.sha256_file(h.loaded.config_path),
                            "checkpoint_sha256": cr.sha256_file(ckpt) if ckpt else None,
                            "quantized": h.qm is not None, "nonfinite": h.cap.nonfinite_report()["first"]}
        calls = len(q.cap.attention)
        qpath = Path(args.config_quantized).expanduser()
        manifest = {
            "schema": cr.SCHEMA, "schema_version": cr.SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "versions": _versions(),
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


ERRORS_NOTE = ("video mode: both models track in lockstep, frame by frame, and every call is measured as in image "
               "mode: q/k/v over the groups holding the selected queries (windows; the whole grid for global "
               "blocks, the decoder and memory attention), the attention output over the selected rows")


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

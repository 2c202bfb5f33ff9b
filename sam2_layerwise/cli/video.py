"""`sam2-layerwise visualize --video`: SAM 2's video predictor tracks one object through a directory of frames
or a video file while every attention module is captured on every frame (memory attention included)."""

from __future__ import annotations

import contextlib
import logging
import time

from sam2_layerwise.cli.common import nonnegative_int, positive_int, setup_logging
from sam2_layerwise.errors import InputError

log = logging.getLogger("sam2_layerwise")

VIDEO_FLAGS = ("--prompt-frame", "--max-frames", "--frame-stride", "--frames", "--memory-mass")


def add_video_arguments(p) -> None:
    g = p.add_argument_group("video mode (instead of --image)")
    g.add_argument("--video", default=None, metavar="PATH",
                   help="a directory of JPEG/PNG frames (any names, natural order) or a video file (mp4, mov, webm, "
                        "avi, ...): SAM2VideoPredictor tracks the clicked object and memory attention is captured")
    g.add_argument("--prompt-frame", type=nonnegative_int, default=None, metavar="N",
                   help="source frame number (from 0) the --points/--box are on (default: the first selected frame)")
    g.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                   help="track at most N frames (the first N of the selection)")
    g.add_argument("--frame-stride", type=positive_int, default=1, metavar="S",
                   help="take every S-th source frame (default 1)")
    g.add_argument("--frames", default=None, metavar="A:B",
                   help="source frames A to B, inclusive (A:, :B and a single A work too)")
    g.add_argument("--memory-mass", choices=["sampled", "all", "selected"], default=None,
                   help="memory attention's mass per memory frame and object pointer beyond the selected queries: "
                        "all (default: every query, tile by tile), sampled (every 4th token per row and column, "
                        "1/16 of the queries: cheaper), selected (none beyond them); --query-stats all implies all")


def video_mode(args) -> bool:
    """Whether the command line asks for video mode; --video and --image together, or a video-only flag without
    --video, are mistakes named here (before anything is read)."""
    video = getattr(args, "video", None)
    if video is not None and getattr(args, "image", None) is not None:
        raise InputError(f"give either --image or --video, not both (--image {args.image})", flag="--video",
                         value=video)
    if video is None:
        for flag in VIDEO_FLAGS:
            value = getattr(args, flag[2:].replace("-", "_"), None)
            if value is not None and not (flag == "--frame-stride" and value == 1):
                raise InputError("only applies with --video", flag=flag, value=value)
        if getattr(args, "image", None) is None:
            raise InputError("missing: give --image PATH (one photograph) or --video PATH (frames or a video file)",
                             flag="--image")
    return video is not None


def selection(args):
    from sam2_layerwise.frames import FrameSelection, parse_frame_range

    start, stop = parse_frame_range(args.frames)
    return FrameSelection(start=start, stop=stop, stride=args.frame_stride, max_frames=args.max_frames)


def prepare(args):
    """Every input checked before a model is loaded or anything written: flags, frames (each selected one
    decoded once), prompts on the prompt frame, output directory. Returns (source, prompts, prompt_index, out_dir)."""
    from sam2_layerwise.cli.quantize import load_qat_flag
    from sam2_layerwise.cli.render import check_render_args
    from sam2_layerwise.frames import open_video, resolve_prompt_frame
    from sam2_layerwise.inputs import parse_prompts
    from sam2_layerwise.store.layout import check_output_dir

    if getattr(args, "single_mask", False):
        raise InputError("is not available with --video (in video mode SAM 2 chooses between one and three masks "
                         "itself)", flag="--single-mask")
    check_render_args(args)
    args.qat_config = load_qat_flag(args)
    sel = selection(args)
    out_dir = check_output_dir(args.output_dir)
    source = open_video(args.video, sel, max_pixels=args.max_pixels)
    try:
        prompt_index = resolve_prompt_frame(source, args.prompt_frame)
        prompts = parse_prompts(args.points, args.box, args.query_points, source.width, source.height)
    except BaseException:
        source.close()
        raise
    return source, prompts, prompt_index, out_dir


def capture_options(args, chosen, plan, **extra):
    from sam2_layerwise.capture import CaptureOptions

    every = args.query_stats == "all"
    return CaptureOptions(max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk,
                          all_query_stats=every, keep_qkv=args.save_qkv or plan.active or getattr(args, "viewer", False),
                          memory_mass="all" if every else (getattr(args, "memory_mass", None) or "all"),
                          layers=None if args.layers is None else tuple(chosen),
                          fast_attention=bool(getattr(args, "fast_attention", False)), **extra)


def run(args) -> int:
    from tqdm import tqdm

    from sam2_layerwise import layers as layer_sel
    from sam2_layerwise.api_video import capture_video
    from sam2_layerwise.cli.quantize import annotate_capture, build_for_capture
    from sam2_layerwise.cli.render import render_plan
    from sam2_layerwise.cli.visualize import _timed, report_run
    from sam2_layerwise.geometry import ImageFrame
    from sam2_layerwise.model.video import video_overrides
    from sam2_layerwise.render.video import VideoRenderer
    from sam2_layerwise.store.image_run import OutputOptions
    from sam2_layerwise.store.layout import RunWriter
    from sam2_layerwise.store.video_run import VideoRunSink, write_video_run
    from sam2_layerwise.viewer.export import VideoCaptureViewer

    setup_logging(args.quiet)
    source, prompts, prompt_index, out_dir = prepare(args)
    with source:
        t0 = time.perf_counter()
        loaded, quant = build_for_capture(args, args.qat_config, video_overrides(args.image_size))
        keys = layer_sel.attention_layer_keys(loaded.model)
        chosen = layer_sel.select(keys, args.layers)
        plan = render_plan(args)
        options = capture_options(args, chosen, plan)
        log.info("model: %s (%s) on %s; video %s: %d frames (%dx%d), clicks on frame %d (%s); capturing %d attention "
                 "modules per frame", loaded.config_path.name,
                 "RANDOM WEIGHTS" if loaded.random_init else loaded.checkpoint_path, loaded.device, source.path,
                 len(source), source.width, source.height, prompt_index, source.frames[prompt_index].name, len(chosen))
        opts = OutputOptions(save_attn=args.save_attn, save_qkv=args.save_qkv, max_tokens=args.max_tokens)
        timing: dict = {}
        with RunWriter(out_dir) as writer:
            renderer = VideoRenderer(plan, source, prompts, prompt_index, image_size=int(loaded.model.image_size)) \
                if plan.active else None
            viewer = VideoCaptureViewer(writer, ImageFrame(source.width, source.height, int(loaded.model.image_size)),
                                        prompts, qkv_saved=args.save_qkv) if getattr(args, "viewer", False) else None

            def pictures(w, fc) -> dict:  # each frame's pictures and viewer maps, before the sink lightens it
                files = renderer.frame(w, fc) if renderer else {}
                if viewer:
                    viewer.on_frame(w, fc)
                return files

            def finish(w) -> dict:
                files = renderer.finish(w) if renderer else {}
                if viewer:
                    files.update(_timed(timing, "viewer", lambda: viewer.finish(cap, source, out_dir.name)))
                    log.info("viewer: %s (opens from disk)%s", out_dir / files["viewer"],
                             f"; clicks where q/k were saved: sam2-layerwise view {out_dir}" if args.save_qkv else
                             " (with --save-qkv, 'sam2-layerwise view' also answers clicks on the photograph)")
                return files

            sink = VideoRunSink(writer, source, prompts, prompt_index, opts,
                                render=pictures if renderer or viewer else None)
            with tqdm(total=len(source), desc="tracking", unit="frame", disable=True if args.quiet else None) as bar, \
                    (quant.monitoring() if quant else contextlib.nullcontext()):

                def on_frame(fc):
                    if quant is not None:
                        for r in fc.attention:
                            r.quant = quant.module_report(r.name)
                    sink(fc)
                    bar.update(1)

                cap = capture_video(loaded.model, source, prompts, options, prompt_frame=prompt_index,
                                    precision=args.precision, on_frame=on_frame)
            t_capture = time.perf_counter() - t0
            timing["load_and_capture"] = round(t_capture, 3)
            summary = write_video_run(
                writer, cap, source, model_info=loaded.describe(), opts=opts,
                command=["sam2-layerwise", *getattr(args, "argv", [])], sink=sink,
                extra_summary={"timing_s": timing, **({"render": plan.to_dict()} if plan.active else {}),
                               **annotate_capture(cap, quant)},
                before_summary=finish)
    report_run(summary, cap, t_capture, writer, out_dir, loaded.random_init)
    mem = [f for f in summary["frames"]["list"] if f.get("memory")]
    log.info("memory attention on %d of %d frames; keys segmented by frame%s", len(mem), len(source),
             "" if all(f["memory"]["verified"] for f in mem) else " (NOT on every frame: see frames[].memory.problem)")
    return 0

"""`sam2-layerwise visualize`: the seed's visualize_layerwise.py."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from sam2_layerwise.cli.common import (add_model_flags, image_size, nonnegative_int, positive_int, setup_logging,
                                       user_path)
from sam2_layerwise.cli.quantize import add_qat_flag, annotate_capture, build_for_capture, load_qat_flag
from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS

log = logging.getLogger("sam2_layerwise")

RUNS_MODELS = True  # main() sets the allocator for tensors (sam2_layerwise/allocator.py)
EXAMPLES = """examples:
  # the seed's command: b+ checkpoint, one foreground click, tensors and q/k/v saved
  sam2-layerwise visualize --config configs/sam2/sam2_hiera_b+.yaml --checkpoint checkpoints/sam2_hiera_base_plus.pt \\
      --image photo.jpg --points 320 240 1 --output-dir sam2_logs/layerwise_debug \\
      --save-attn --save-qkv --max-attn-queries 2 --max-tokens 512
  # official tiny model by id, a click and a box, only the decoder layers
  sam2-layerwise visualize --checkpoint sam2.1_hiera_tiny --image photo.jpg --points 100 80 1 --box 40 30 200 160 \\
      --layers 'sam_mask_decoder*'
  # random weights on purpose (no checkpoint), the bundled cat
  sam2-layerwise visualize --config configs/sam2.1/sam2.1_hiera_t.yaml --random-init \\
      --image examples/images/chelsea.png --points 220 150 1
  # faster all-query statistics, opting out of bit-identical masks (the summary records it)
  sam2-layerwise visualize --checkpoint sam2.1_hiera_base_plus --image photo.jpg --points 320 240 1 --fast-attention
  # video: track the clicked object through a folder of frames (or an mp4), memory attention drawn on its frames
  sam2-layerwise visualize --checkpoint sam2.1_hiera_tiny --video frames/ --prompt-frame 0 --points 320 240 1 \\
      --max-frames 8 --render-attn-overlay --output-dir sam2_logs/video_debug"""


def add_arguments(p) -> None:
    add_model_flags(p)
    add_qat_flag(p)
    p.add_argument("--image", default=None, type=user_path, help="image file (any format Pillow reads); or --video")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse an image with more pixels than this, before decoding it (default %(default)s = 2**27)")
    p.add_argument("--points", nargs="+", action="extend", default=[], metavar="X_Y_LABEL",
                   help="clicks as x y label triples in original-image pixels (label 1 foreground, 0 background); "
                        "repeated --points add clicks")
    p.add_argument("--box", nargs="+", default=None, metavar="X0_Y0_X1_Y1",
                   help="box prompt x0 y0 x1 y1 in pixels (one box)")
    p.add_argument("--query-points", nargs="+", action="extend", default=[], metavar="X_Y",
                   help="extra places (x y pairs, pixels) whose tokens are inspected after the clicks; repeated "
                        "--query-points add places")
    p.add_argument("--output-dir", default="sam2_logs/layerwise_debug", help="run directory (default %(default)s)")
    p.add_argument("--save-attn", action="store_true", help="save attention maps of the selected queries")
    p.add_argument("--save-qkv", action="store_true", help="save q/k/v as the attention kernel saw them")
    p.add_argument("--max-attn-queries", type=positive_int, default=4,
                   help="selected query tokens per attention call, clicks first (default %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=4096,
                   help="cap on the key dimension of saved/rendered maps; larger maps are sum-pooled over spatial "
                        "blocks so they stay distributions (default %(default)s)")
    p.add_argument("--layers", default=None, help="only these layers: names, globs, comma lists, ranges "
                                                  "(image_encoder_trunk_blocks_0:11)")
    p.add_argument("--query-stats", choices=["all", "selected"], default=None,
                   help="per-head statistics over every query (image default) or only the selected ones (faster; "
                        "video default, where memory attention's mass per memory frame still covers every query)")
    p.add_argument("--stats-topk", type=nonnegative_int, default=5, help="k of the top-k mass statistic (default 5)")
    p.add_argument("--single-mask", action="store_true", help="multimask_output=False (default: three masks)")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="override the config's image_size (a multiple of 32 that fits the Hiera windows, at most 4096)")
    p.add_argument("--fast-attention", action="store_true",
                   help="opt-in speed: float attention outputs come from this tool's statistics kernel (one q·kᵀ per "
                        "call instead of two; CPU, fp32). They differ from torch's in the last bits, so masks may "
                        "differ from plain SAM 2 in a few pixels; the summary says so. Default: torch computes every "
                        "output and masks are bit-identical")
    p.add_argument("--viewer", action="store_true",
                   help="write the browser viewer into the run (viewer/index.html; 'sam2-layerwise view' serves it)")
    add_render_arguments(p)
    from sam2_layerwise.cli.video import add_video_arguments

    add_video_arguments(p)


def add_render_arguments(p) -> None:
    p.add_argument("--render-attn", action="store_true",
                   help="write attention images (attn_images/): each selected query's head-mean map on its key grid")
    p.add_argument("--render-attn-overlay", action="store_true",
                   help="write attention overlays on the photograph (attn_overlays/), and attention images")
    p.add_argument("--render-attn-heads", action="store_true", help="also draw one map per head")
    p.add_argument("--attn-overlay-only", action="store_true", help="write overlays only (no attention images)")
    p.add_argument("--cmap", default="plasma", help="matplotlib colormap name (default %(default)s)")
    p.add_argument("--topk-attn", type=nonnegative_int, default=0, metavar="K", help="write top-k lists (0 = off)")
    p.add_argument("--topk-symlink", action="store_true", help="also link the top-k images under attn_topk/<kind>/")


def prepare(args):
    """Validate every input before anything is loaded or written. Returns (image, prompts, out_dir)."""
    from sam2_layerwise.cli.render import check_render_args
    from sam2_layerwise.cli.video import video_mode
    from sam2_layerwise.inputs import load_image, parse_prompts
    from sam2_layerwise.store.layout import check_output_dir

    video_mode(args)
    check_render_args(args)
    args.qat_config = load_qat_flag(args)
    out_dir = check_output_dir(args.output_dir)
    image = load_image(args.image, max_pixels=args.max_pixels)
    h, w = image.shape[:2]
    prompts = parse_prompts(args.points, args.box, args.query_points, w, h)
    return image, prompts, out_dir


def run(args) -> int:
    from tqdm import tqdm

    from sam2_layerwise import layers as layer_sel
    from sam2_layerwise.api import capture_image
    from sam2_layerwise.capture import CaptureOptions
    from sam2_layerwise.cli.render import render_plan
    from sam2_layerwise.render.run import render_capture
    from sam2_layerwise.store.image_run import OutputOptions, write_image_run
    from sam2_layerwise.store.layout import RunWriter

    from sam2_layerwise.cli import video

    if video.video_mode(args):
        return video.run(args)
    setup_logging(args.quiet)
    args.query_stats = args.query_stats or "all"
    image, prompts, out_dir = prepare(args)
    t0 = time.perf_counter()
    overrides = {"model.image_size": args.image_size} if args.image_size else None
    loaded, quant = build_for_capture(args, args.qat_config, overrides)
    keys = layer_sel.attention_layer_keys(loaded.model, image_mode=True)
    chosen = layer_sel.select(keys, args.layers)
    plan = render_plan(args)
    # q/k are kept in memory when drawing: decoder image->token maps need every image query's attention
    options = CaptureOptions(max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk,
                             all_query_stats=args.query_stats == "all",
                             keep_qkv=args.save_qkv or plan.active or getattr(args, "viewer", False),
                             layers=None if args.layers is None else tuple(chosen),
                             fast_attention=bool(getattr(args, "fast_attention", False)))
    log.info("model: %s (%s, %.1f M parameters) on %s; capturing %d attention modules",
             loaded.config_path.name, "RANDOM WEIGHTS" if loaded.random_init else loaded.checkpoint_path,
             sum(p.numel() for p in loaded.model.parameters()) / 1e6, loaded.device, len(chosen))

    with tqdm(total=len(chosen), desc="capturing", unit="attn", disable=None if not args.quiet else True) as bar, \
            (quant.monitoring() if quant else contextlib.nullcontext()):
        cap = capture_image(loaded.model, image, prompts, options, multimask=not args.single_mask,
                            precision=args.precision, on_record=lambda r: bar.update(1))
    t_capture = time.perf_counter() - t0

    opts = OutputOptions(save_attn=args.save_attn, save_qkv=args.save_qkv, max_tokens=args.max_tokens)
    h, w = image.shape[:2]
    timing = {"load_and_capture": round(t_capture, 3)}
    with RunWriter(out_dir) as writer:
        summary = write_image_run(
            writer, cap, image, model_info=loaded.describe(),
            image_info={"path": str(Path(args.image).resolve()), "width": w, "height": h},
            opts=opts, command=["sam2-layerwise", *getattr(args, "argv", [])],
            extra_summary={"timing_s": timing, **({"render": plan.to_dict()} if plan.active else {}),
                           **annotate_capture(cap, quant)},
            before_summary=lambda w: {**(_timed(timing, "render", lambda: render_capture(w, cap, image, plan)) or {}),
                                      **(_timed(timing, "viewer", lambda: _viewer(w, cap, image, args, out_dir))
                                         if getattr(args, "viewer", False) else {})},
        )
    report_run(summary, cap, t_capture, writer, out_dir, loaded.random_init)
    return 0


def report_run(summary: dict, cap, seconds: float, writer, out_dir, random_init: bool) -> None:
    """The last words of a capture: fidelity, non-finite findings, what was written where. Reads only
    plain values, so nothing here can fail once the run is in place."""
    fid = summary["fidelity"]
    worst = max(fid["max_module_abs_err"] or 0.0, fid["max_kernel_abs_err"] or 0.0)
    verdict = ("ok" if fid["ok"] else "n/a outside fp32" if fid["ok"] is None else
               "not checkable where values are non-finite" if fid.get("non_finite_checks") else "ABOVE 1e-4")
    log.info("captured %d attention calls and %d block outputs in %.1f s; worst fidelity error %.2e (%s)",
             len(cap.attention), len(cap.blocks), seconds, worst, verdict)
    if fid.get("fast_attention_calls"):
        log.warning("--fast-attention: %d attention outputs came from this tool's kernel, not torch's; masks may "
                    "differ from plain SAM 2 in a few pixels (recorded in the summary's 'fidelity')",
                    fid["fast_attention_calls"])
    nf = summary.get("nonfinite") or {}
    if nf.get("found"):
        first = nf["first"]
        log.warning("non-finite values (NaN/inf): first in %s (%s), %d places in all; recorded in the summary's "
                     "'nonfinite' section", first["module"], first["tensor"], nf["count"])
    log.info("wrote %d files to %s (summary: %s)", len(writer.written), out_dir, out_dir / "layerwise_summary.json")
    if random_init:
        log.warning("note: RANDOM WEIGHTS were used (--random-init)")


def _viewer(writer, cap, image, args, out_dir) -> dict:
    """visualize --viewer: the browser viewer of this capture in viewer/ (from the records in memory)."""
    from sam2_layerwise.viewer.export import write_capture_viewer

    files = write_capture_viewer(writer, cap, image, qkv_saved=args.save_qkv, title=Path(out_dir).name)
    log.info("viewer: %s (opens from disk)%s", Path(out_dir) / files["viewer"],
             f"; click in the saved windows with: sam2-layerwise view {out_dir}" if args.save_qkv else
             " (with --save-qkv, 'sam2-layerwise view' also answers clicks in the saved windows)")
    return files


def _timed(timing: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    timing[key] = round(time.perf_counter() - t0, 3)
    return out


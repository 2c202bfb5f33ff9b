"""`sam2-layerwise render`: draw a saved run again without the model, and the rendering flags both commands share."""

from __future__ import annotations

import logging

from sam2_layerwise.cli.common import positive_int, setup_logging, user_path
from sam2_layerwise.errors import InputError
from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS, parse_query_points

log = logging.getLogger("sam2_layerwise")

EXAMPLES = """examples:
  # a run captured with --save-attn --save-qkv, drawn again in another colormap with overlays and a top-10
  sam2-layerwise render --run-dir sam2_logs/layerwise_debug --cmap viridis --render-attn-overlay --topk-attn 10
  # more query places, recomputed from the saved q/k (only where their window was saved)
  sam2-layerwise render --run-dir sam2_logs/layerwise_debug --query-points 120 80 300 200 --max-attn-queries 6"""


def add_arguments(p) -> None:
    from sam2_layerwise.cli.visualize import add_render_arguments

    p.add_argument("--run-dir", required=True, help="a run directory written by 'sam2-layerwise visualize'")
    p.add_argument("--image", default=None, type=user_path, help="the photograph, when it moved since the run (default: the path "
                                                 "recorded in the summary)")
    p.add_argument("--video", default=None, help="a video run's frames folder or video file, when it moved since the "
                                                 "run (default: the path recorded in the summary)")
    p.add_argument("--max-attn-queries", type=positive_int, default=None,
                   help="queries per attention call (default: the saved ones plus --query-points)")
    p.add_argument("--max-tokens", type=positive_int, default=4096,
                   help="cap on the key dimension drawn; larger maps are sum-pooled (default %(default)s)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse a photograph with more pixels than this, before decoding it (default %(default)s)")
    p.add_argument("--query-points", nargs="+", action="extend", default=[], metavar="X_Y",
                   help="extra query places (x y pairs, original pixels) recomputed from the saved q/k; repeated "
                        "--query-points add places")
    add_render_arguments(p)


def check_render_args(args) -> None:
    """Validate the rendering flags before anything is loaded or written."""
    from sam2_layerwise.render.colors import check_cmap

    check_cmap(args.cmap)
    if args.topk_symlink and not args.topk_attn:
        raise InputError("needs --topk-attn K (K > 0)", flag="--topk-symlink")
    if args.attn_overlay_only and args.render_attn:
        raise InputError("asks for attention images, which --attn-overlay-only leaves out; give one of the two",
                         flag="--render-attn")


def render_plan(args, *, default_images: bool = False):
    """The RenderPlan the flags ask for.

    Overlays: `--render-attn-overlay` or `--attn-overlay-only`. Attention images: `--render-attn`,
    `--render-attn-overlay` or `--topk-attn K` (or `default_images`), never with `--attn-overlay-only`.
    """
    from sam2_layerwise.render.attention import RenderOptions
    from sam2_layerwise.render.maps import MapOptions
    from sam2_layerwise.render.run import RenderPlan

    overlays = bool(args.render_attn_overlay or args.attn_overlay_only)
    images = not args.attn_overlay_only and bool(
        args.render_attn or args.render_attn_overlay or args.topk_attn or args.render_attn_heads or default_images)
    return RenderPlan(draw=RenderOptions(images=images, overlays=overlays, cmap=args.cmap),
                      maps=MapOptions(max_queries=args.max_attn_queries, per_head=args.render_attn_heads,
                                      max_tokens=args.max_tokens),
                      topk=args.topk_attn, topk_symlink=args.topk_symlink)


def run(args) -> int:
    from sam2_layerwise.render.saved import load_photo, open_run, rerender

    setup_logging(args.quiet)
    check_render_args(args)
    saved = open_run(args.run_dir)
    extra = parse_query_points(args.query_points, saved.frame.orig_w, saved.frame.orig_h)
    plan = render_plan(args, default_images=True)
    if saved.summary.get("mode") == "video":
        from sam2_layerwise.render.video import rerender_video

        if args.image is not None:
            raise InputError("this is a video run; its frames are given with --video", flag="--image", value=args.image)
        summary = rerender_video(saved, plan, video=args.video, max_pixels=args.max_pixels, extra_points=extra)
    else:
        if args.video is not None:
            raise InputError("only applies to a video run (visualize --video)", flag="--video", value=args.video)
        photo = load_photo(saved, args.image, args.max_pixels) if plan.draw.overlays or args.image else None  # only overlays need the photograph
        summary = rerender(saved, photo, plan, extra_points=extra)
    files = summary.get("files", {})
    log.info("drew %s in %s%s", ", ".join(k for k in ("attn_images", "attn_overlays", "attn_topk") if k in files)
             or "nothing", saved.run_dir, "" if summary["render"]["skipped_calls_without_tensors"] == 0 else
             f" ({summary['render']['skipped_calls_without_tensors']} calls had no saved tensors)")
    return 0

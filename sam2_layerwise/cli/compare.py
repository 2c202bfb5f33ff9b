"""`sam2-layerwise compare`: the seed's compare_quantization.py. Capture a float SAM 2 and its fake-quantized
twin on the same image, prompts and query tokens; write one run directory with both (docs/compare.md)."""

from __future__ import annotations

import logging
import time

from sam2_layerwise.cli.common import Parser, device_name, positive_int, setup_logging
from sam2_layerwise.errors import InputError, ModelError

log = logging.getLogger("sam2_layerwise")

RUNS_MODELS = True  # main() sets the allocator for tensors (sam2_layerwise/allocator.py)
EXAMPLES = """examples:
  # the seed's light-mode command (selected query rows and per-head statistics of both models)
  sam2-layerwise compare --config-quantized examples/quantization/w8a8.yaml \\
      --config-original configs/sam2.1/sam2.1_hiera_b+.yaml --checkpoint-original checkpoints/sam2.1_hiera_base_plus.pt \\
      --checkpoint-quantized w8a8_b+.pt --image photo.jpg --points 320 240 1 \\
      --output-dir sam2_logs/interactive_viz/run_latest --save-raw
  # full mode: q/k/v of every group, so any query row of any layer can be recomputed later (large; see README)
  sam2-layerwise compare ... --save-full-attn --full-dtype fp16
  # then the analysis
  sam2-layerwise generate --run_dir sam2_logs/interactive_viz/run_latest --layers "image_encoder_trunk_blocks_0:23" --heads all"""

# visualize flags compare takes over unchanged (same names, same parsing)
BORROWED = ("--image", "--points", "--box", "--query-points", "--max-attn-queries", "--layers", "--stats-topk",
            "--single-mask", "--image-size", "--max-pixels",
            "--video", "--prompt-frame", "--max-frames", "--frame-stride", "--frames")  # compare --video


def add_arguments(p) -> None:
    from sam2_layerwise.cli import visualize

    p.add_argument("--config-original", metavar="NAME_OR_YAML", default=None,
                   help="SAM 2 config of the float model (default: the quantization config's base_config)")
    p.add_argument("--checkpoint-original", required=True, metavar="PT_OR_MODEL_ID",
                   help="float SAM 2 checkpoint (.pt) or official model id")
    p.add_argument("--config-quantized", required=True, metavar="YAML",
                   help="quantization config (docs/quantization.md) of the quantized model")
    p.add_argument("--checkpoint-quantized", required=True, metavar="PT",
                   help="quantized checkpoint (QAT, or 'sam2-layerwise quantize')")
    p.add_argument("--output-dir", default="sam2_logs/interactive_viz/run_latest",
                   help="the compare run directory (default %(default)s)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save-raw", action="store_true",
                      help="light mode: selected query rows, their statistics and per-head statistics over every query")
    mode.add_argument("--save-full-attn", action="store_true",
                      help="full mode: also q/k/v of every group, so any query row can be recomputed exactly later")
    p.add_argument("--full-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="dtype of full mode's q/k/v: fp32 (exact, default) or fp16 (half the disk, inexact)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default) or bf16 autocast (CUDA only)")
    p.add_argument("--attribute", action="store_true",
                   help="counterfactual attribution: run the quantized model with each layer in turn restored to "
                        "full precision and record the change of mask IoU against the float model (attribution.json)")
    p.add_argument("--attribute-mode", choices=["restore", "isolate"], default=None,
                   help="restore (default): only that layer in full precision; isolate: only that layer quantized")
    p.add_argument("--attribute-layers", default=None, metavar="LAYERS",
                   help="units to attribute (names, globs, ranges); default every Hiera block, decoder attention "
                        "layer and other quantized component")
    donor = Parser(add_help=False)  # its actions refuse a second value, as compare's own do
    visualize.add_arguments(donor)
    for action in donor._actions:
        if any(o in BORROWED for o in action.option_strings):
            if "--stats-topk" in action.option_strings:  # generate compares both models' top-k mass: k >= 1
                action.type, action.help = positive_int, "k of the top-k mass statistic, 1 or more (default 5)"
            p._add_action(action)


def _same_config(a: str, b: str) -> bool:
    from sam2_layerwise.model.loading import resolve_config

    pa, pb = resolve_config(a), resolve_config(b)
    return pa.resolve() == pb.resolve() or pa.read_bytes() == pb.read_bytes()


def quant_config_and_base(args):
    """`--config-quantized` read and checked; `--config-original` defaults to its base_config, and one that
    disagrees with it is an error (compare and sweep)."""
    from sam2_layerwise.analysis.pair import QUANT_FLAGS, renamed_flags
    from sam2_layerwise.quant import load_quant_config
    from sam2_layerwise.quant.checkpoint import resolve_base_config

    with renamed_flags(QUANT_FLAGS):
        qcfg = load_quant_config(args.config_quantized)
    base = resolve_base_config(qcfg)
    if args.config_original is None:
        if base is None:
            raise ModelError("missing, and the quantization config names no base_config", flag="--config-original")
        args.config_original = base
    elif base is not None and not _same_config(args.config_original, base):
        raise ModelError(f"disagrees with the quantization config's base_config ({qcfg.base_config})",
                         flag="--config-original", value=args.config_original)
    return qcfg


def prepare(args):
    """Everything checked before a model is loaded: flags, quantization config, image, prompts, output."""
    from sam2_layerwise.inputs import load_image, parse_prompts
    from sam2_layerwise.store.layout import COMPARE_RUN, check_output_dir

    if args.full_dtype != "fp32" and not args.save_full_attn:
        raise InputError("only applies to --save-full-attn", flag="--full-dtype", value=args.full_dtype)
    for flag, value in (("--attribute-mode", args.attribute_mode), ("--attribute-layers", args.attribute_layers)):
        if value is not None and not args.attribute:
            raise InputError("only applies with --attribute", flag=flag, value=value)
    if args.attribute_layers is not None:
        from sam2_layerwise.layers import expand

        expand(args.attribute_layers, "--attribute-layers")
    args.attribute_mode = args.attribute_mode or "restore"
    qcfg = quant_config_and_base(args)
    out_dir = check_output_dir(args.output_dir, "--output-dir", COMPARE_RUN)
    image = load_image(args.image, max_pixels=args.max_pixels)
    h, w = image.shape[:2]
    prompts = parse_prompts(args.points, args.box, args.query_points, w, h)
    return qcfg, image, prompts, out_dir


def run(args) -> int:
    from sam2_layerwise.cli.video import video_mode

    if video_mode(args):  # both models track the same frames (analysis.video_pair)
        from sam2_layerwise.analysis.video_pair import run as run_video

        return run_video(args)
    from sam2_layerwise.analysis.pair import ModelSpec, compare_capture

    setup_logging(args.quiet)
    qcfg, image, prompts, out_dir = prepare(args)
    t0 = time.perf_counter()
    specs = [ModelSpec("original", args.config_original, args.checkpoint_original, None),
             ModelSpec("quantized", args.config_original, args.checkpoint_quantized, qcfg)]
    result = compare_capture(specs, image, prompts, out_dir, args=args)
    log.info("compare (%s mode) wrote %s in %.1f s: original/ and quantized/ (%d attention calls each), "
             "manifest.json", result["mode"], out_dir, time.perf_counter() - t0, result["attention_calls"])
    log.info("next: sam2-layerwise generate --run_dir %s", out_dir)
    return 0



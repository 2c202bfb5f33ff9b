"""`sam2-layerwise sweep`: compare a float SAM 2 and its quantized twin over many images; Parquet tables, an
aggregated ranking, optional counterfactual attribution; resumable; local or on Ray (docs/sweep.md)."""

from __future__ import annotations

import argparse

from sam2_layerwise.cli.common import Parser, positive_int, seed_int

RUNS_MODELS = True  # main() sets the allocator for tensors (sam2_layerwise/allocator.py)
EXAMPLES = """examples:
  # every image of a folder, one click in the middle of each
  sam2-layerwise sweep --config-original configs/sam2.1/sam2.1_hiera_b+.yaml \\
      --checkpoint-original sam2.1_hiera_base_plus.pt --config-quantized examples/quantization/w8a8.yaml \\
      --checkpoint-quantized w8a8_b+.pt --inputs photos/ --auto-prompts grid:2 --output-dir sweeps/w8a8
  # a manifest (image, points, box, mask columns) with causal per-layer attribution of the Hiera blocks
  sam2-layerwise sweep ... --inputs items.csv --attribute --attribute-layers 'image_encoder_trunk_blocks_*'
  # the same on a Ray cluster, one GPU per worker
  sam2-layerwise sweep ... --engine ray --ray-address auto --num-gpus-per-worker 1 --device cuda"""

# compare's flags for the two models and the capture, taken over unchanged (same names, same parsing)
BORROWED_COMPARE = ("--config-original", "--checkpoint-original", "--config-quantized", "--checkpoint-quantized",
                    "--device", "--precision", "--max-attn-queries", "--layers", "--stats-topk", "--single-mask",
                    "--image-size", "--max-pixels")


def _gpus(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number") from None
    if not 0 <= v <= 1024:
        raise argparse.ArgumentTypeError("must be between 0 and 1024")
    return v


def _cpus(text: str) -> float:
    v = _gpus(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return v


def add_arguments(p) -> None:
    from sam2_layerwise.cli import compare

    donor = Parser(add_help=False)  # its actions refuse a second value, as sweep's own do
    compare.add_arguments(donor)
    for action in donor._actions:
        if any(o in BORROWED_COMPARE for o in action.option_strings):
            p._add_action(action)
    p.add_argument("--inputs", required=True, metavar="DIR_OR_MANIFEST",
                   help="a directory (every image in it, not recursive) or a manifest .csv / .jsonl with columns "
                        "image, points ('x y label ...'), optional box ('x0 y0 x1 y1') and mask (ground truth); "
                        "relative paths resolve against the manifest's folder")
    p.add_argument("--auto-prompts", default="center", metavar="center|grid:N|random:N",
                   help="prompts for images without any (a directory, or manifest rows without points and box): "
                        "center (one click in the middle), grid:N (N x N clicks, one item each), random:N (N random "
                        "clicks, one item each; --seed) (default %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of --auto-prompts random:N (default 0)")
    p.add_argument("--output-dir", default="sam2_logs/sweep",
                   help="the sweep directory; rerunning over it resumes (default %(default)s)")
    p.add_argument("--query-stats", choices=["all", "selected"], default="selected",
                   help="per-head statistics over every query too (all: generate's all_queries_* columns, about "
                        "1.4x the capture time) or the selected queries only (default, fastest)")
    p.add_argument("--topk", type=positive_int, default=None, metavar="K",
                   help="k of the top-k metrics (default: --stats-topk)")
    p.add_argument("--rank", type=positive_int, default=20, metavar="N", help="rows of the ranked list (default 20)")
    p.add_argument("--keep-runs", action="store_true",
                   help="also write each item's compare run (light mode) under OUTPUT/runs/ (generate works on them)")
    p.add_argument("--attribute", action="store_true",
                   help="counterfactual attribution: per layer, the quantized model with that layer restored to full "
                        "precision, and the change of mask IoU against the FP model")
    p.add_argument("--attribute-mode", choices=["restore", "isolate"], default=None,
                   help="restore (default): only that layer in full precision; isolate: only that layer quantized")
    p.add_argument("--attribute-layers", default=None, metavar="LAYERS",
                   help="which units to attribute: names, globs, comma lists, ranges (image_encoder_trunk_blocks_0:11);"
                        " default every Hiera block, decoder attention layer and other quantized component")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default: this process, a progress bar) or ray (one worker per Ray actor)")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="join this Ray cluster (auto: the one running here); default: start a local Ray instance")
    p.add_argument("--num-workers", type=positive_int, default=None, metavar="N",
                   help="Ray workers (actors), each loading both models once (default: as many as the CPUs/GPUs "
                        "allow)")
    p.add_argument("--num-cpus-per-worker", type=_cpus, default=1.0, metavar="N",
                   help="CPUs per Ray worker, also its torch threads (default 1)")
    p.add_argument("--num-gpus-per-worker", type=_gpus, default=0.0, metavar="N",
                   help="GPUs per Ray worker (default 0; use with --device cuda on a GPU cluster)")


def run(args) -> int:
    from sam2_layerwise.cli.common import setup_logging
    from sam2_layerwise.sweep.run import run_sweep

    setup_logging(args.quiet)
    report = run_sweep(args)
    return 0 if report["failed"] == 0 else EXIT_FAILED_ITEMS


EXIT_FAILED_ITEMS = 3

"""`sam2-layerwise generate`: the seed's `python -m visualization.interactive_viz.generate`. Metrics of a compare
run per layer and head, the output impact, tables, a ranking and plots, written inside the run directory."""

from __future__ import annotations

import contextlib
import logging
import time

from sam2_layerwise.cli.common import positive_int, setup_logging
from sam2_layerwise.errors import InputError
from sam2_layerwise.threads import one_thread

log = logging.getLogger("sam2_layerwise")

EXAMPLES = """examples:
  # the seed's command: every Hiera block of b+ (24 blocks), every head
  sam2-layerwise generate --run_dir sam2_logs/interactive_viz/run_latest --layers "image_encoder_trunk_blocks_0:23" --heads all
  # the decoder only, heads 0 to 3, top-10 metrics, into analysis_decoder/
  sam2-layerwise generate --run-dir RUN --layers 'sam_mask_decoder*' --heads 0:3 --topk 10 --output analysis_decoder"""



def add_arguments(p) -> None:
    p.add_argument("--run_dir", "--run-dir", dest="run_dir", required=True, help="a run directory written by compare")
    p.add_argument("--layers", default=None, help="layer keys, globs, comma lists, inclusive ranges "
                                                  "(image_encoder_trunk_blocks_0:23); default all captured")
    p.add_argument("--heads", default="all", help="all (default), a list 0,3,5 or an inclusive range 0:3")
    p.add_argument("--topk", type=positive_int, default=None, metavar="K",
                   help="k of the top-k metrics (default: the capture's --stats-topk)")
    p.add_argument("--rank", type=positive_int, default=20, metavar="N", help="rows of the ranked list (default 20)")
    p.add_argument("--output", default="analysis", metavar="NAME",
                   help="folder inside the run directory for the analysis (default %(default)s)")


def check_output_name(name: str) -> str:
    from sam2_layerwise.store import compare_run as cr
    from sam2_layerwise.store.layout import safe_name

    clean = name.strip().rstrip("/")
    if not clean or safe_name(clean) != clean or clean in (".", ".."):
        raise InputError("must be one plain folder name inside the run ([A-Za-z0-9._-])", flag="--output", value=name)
    if clean in (cr.MANIFEST, *cr.HALVES, cr.ATTRIBUTION):
        raise InputError("is the name of the compare run's own data; give another folder name", flag="--output",
                         value=name)
    return clean


def check_output_entry(run_dir, name: str, shown: str) -> None:
    """The analysis replaces `run_dir/name` only when it is new, an empty folder or an analysis `generate` wrote
    (its metrics.json): a file or folder of the user's is never replaced."""
    from sam2_layerwise.store.compare_run import is_analysis

    target = run_dir / name
    if target.is_symlink():
        raise InputError("is a link inside the run; give another folder name", flag="--output", value=shown)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not is_analysis(target):
        raise InputError(f"{target} exists and is not an analysis written by generate; give another folder name so "
                         f"nothing of yours is replaced", flag="--output", value=shown)


def run(args) -> int:
    from tqdm import tqdm

    from sam2_layerwise.analysis.generate import GenerateOptions, analyse, write_analysis
    from sam2_layerwise.store.compare_run import COMPARE_RUN, open_compare_run
    from sam2_layerwise.store.layout import RunWriter
    from sam2_layerwise.viewer.export import write_compare_viewer

    setup_logging(args.quiet)
    opts = GenerateOptions(layers=args.layers, heads=args.heads, topk=args.topk, rank=args.rank,
                           output=check_output_name(args.output))
    run_ = open_compare_run(args.run_dir)
    check_output_entry(run_.run_dir, opts.output, args.output)
    writer = RunWriter(run_.run_dir, owned=(opts.output,), kind=COMPARE_RUN, flag="--run_dir")
    t0 = time.perf_counter()
    # Light mode's tensors are small (a few rows per layer), as are the tables, plots and the viewer's maps in
    # both modes: there each parallel region costs more than it saves, 10-50x more on busy cores. Full mode
    # measures tiles of 2^20 scores, which threads do speed up.
    with tqdm(desc=f"measuring ({run_.mode} mode)", unit="layer", disable=True if args.quiet else None) as bar, \
            (one_thread() if run_.mode == "light" else contextlib.nullcontext()):
        result = analyse(run_, opts, on_layer=lambda pair: bar.update(1))
    with writer, one_thread():
        metrics = write_analysis(run_, result, opts, writer, ["sam2-layerwise", *getattr(args, "argv", [])])
        write_compare_viewer(run_, result, writer, opts.output)  # the browser viewer: OUTPUT/index.html
    files = metrics["files"]
    imp = metrics["output_impact"]
    log.info("measured %d layers x heads (%s) in %.1f s; wrote %s/ in %s: metrics.json, metrics_heads.csv, "
             "metrics_queries.csv, ranking.txt, %d plots", len(metrics["heads"]), result["heads"][0]["scope"],
             time.perf_counter() - t0, opts.output, run_.run_dir, len(files["plots"]))
    log.info("output impact: mask IoU FP vs Q %s; chosen mask %s -> %s%s", [m["iou"] for m in imp["masks"]],
             imp["chosen"]["fp"], imp["chosen"]["q"], " (changed)" if imp["chosen"]["changed"] else "")
    log.info("most changed heads (mean JS):")
    for r in metrics["ranking"][:5]:
        lost = f" ({r['js_undefined']} of {r['n_queries']} rows no distribution)" if r.get("js_undefined") else ""
        log.info("  %d. %s head %d  JS %s%s  q/k/v err %s/%s/%s", r["rank"], r["layer_key"], r["head"],
                 _fmt(r["js_mean"]), lost, _fmt(r["q_rel_err"]), _fmt(r["k_rel_err"]), _fmt(r["v_rel_err"]))
    log.info("viewer: %s (opens from disk); click anywhere with: sam2-layerwise view %s%s",
             run_.run_dir / opts.output / "index.html", run_.run_dir,
             f" --page {opts.output}" if opts.output != "analysis" else "")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"

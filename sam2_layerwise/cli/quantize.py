"""`sam2-layerwise quantize`: post-training calibration of a float SAM 2 checkpoint into a quantized checkpoint,
and the `--adaptive-qat-config` plumbing `visualize` shares."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sam2_layerwise.cli.common import device_name, image_size, positive_int, seed_int, setup_logging
from sam2_layerwise.errors import InputError
from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS

log = logging.getLogger("sam2_layerwise")

RUNS_MODELS = True  # main() sets the allocator for tensors (sam2_layerwise/allocator.py)
EXAMPLES = """examples:
  # W8A8 from the official b+ checkpoint, calibrated on a folder of photographs
  sam2-layerwise quantize --config configs/sam2.1/sam2.1_hiera_b+.yaml --checkpoint checkpoints/sam2.1_hiera_base_plus.pt \\
      --adaptive-qat-config examples/quantization/w8a8.yaml --calib-images photos/ --output w8a8_b+.pt
  # then look at it exactly like a QAT checkpoint
  sam2-layerwise visualize --config configs/sam2.1/sam2.1_hiera_b+.yaml --checkpoint w8a8_b+.pt \\
      --adaptive-qat-config examples/quantization/w8a8.yaml --image photo.jpg --points 320 240 1"""

# -- shared with visualize ------------------------------------------------------------------------------------
QAT_HELP = ("run the fake-quantized model this quantization config describes (docs/quantization.md); "
            "--checkpoint then holds its learned scales (from QAT or 'sam2-layerwise quantize')")


def add_qat_flag(p, required: bool = False, help: str = QAT_HELP) -> None:
    p.add_argument("--adaptive-qat-config", metavar="YAML", required=required, default=None, help=help)


def load_qat_flag(args):
    """The validated `--adaptive-qat-config` (or None); fails before anything is loaded or written."""
    from sam2_layerwise.quant import load_quant_config

    path = getattr(args, "adaptive_qat_config", None)
    return load_quant_config(path) if path else None


def build_for_capture(args, qcfg, overrides=None):
    """(LoadedModel, QuantizedModel or None) for `visualize`: the float model, or the quantized one."""
    from sam2_layerwise.model import build_model

    if qcfg is None:
        loaded = build_model(args.config, args.checkpoint, random_init=args.random_init, device=args.device,
                             seed=args.seed, overrides=overrides)
        return loaded, None
    from sam2_layerwise.quant import load_quantized_model

    loaded, qm = load_quantized_model(args.config, args.checkpoint, qcfg, device=args.device, seed=args.seed,
                                      random_init=args.random_init, overrides=overrides)
    log.info("quantized: %d quantizers (bits %s), %d sites left in float, from %s", len(qm.sites),
             ", ".join(f"{b}: {n}" for b, n in sorted(qm.bits_histogram().items())), len(qm.floats), qcfg.source)
    return loaded, qm


def annotate_capture(cap, qm) -> dict:
    """Put each attention record's quantizers into `record.quant`; return the summary's `quantization` section."""
    if qm is None:
        return {}
    reports = qm.site_reports()  # each quantizer's once, for every record and the section
    for rec in cap.attention:
        rec.quant = qm.module_report(rec.name, reports)
    return {"quantization": qm.report(reports)}


# -- the quantize command -------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--config", metavar="NAME_OR_YAML", default=None,
                   help="SAM 2 config (default: the quantization config's base_config, or the official id's)")
    p.add_argument("--checkpoint", required=True, metavar="PT_OR_MODEL_ID",
                   help="the FLOAT SAM 2 checkpoint to quantize (.pt or official model id)")
    add_qat_flag(p, required=True, help="the quantization config to calibrate (docs/quantization.md); its "
                                        "base_config is used when --config is omitted")
    p.add_argument("--calib-images", nargs="+", action="extend", required=True, metavar="PATH",
                   help="calibration images: files and/or directories (their images, sorted by name); repeated "
                        "--calib-images add up")
    p.add_argument("--output", required=True, help="where to write the quantized checkpoint (.pt)")
    p.add_argument("--max-calib-images", type=positive_int, default=64,
                   help="use at most this many images, in order (default %(default)s)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse calibration images with more pixels than this, before decoding them "
                        "(default %(default)s = 2**27)")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="override the config's image_size (a multiple of 32, at most 4096)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the percentile/MSE samples (default 0; 0 <= seed < 2**63)")


def calibration_files(entries: list[str], limit: int) -> list[Path]:
    """Files as given; directories expand to their images (`inputs.image_files`: by suffix, sorted by name)."""
    from sam2_layerwise.inputs import IMAGE_SUFFIXES, image_files

    files: list[Path] = []
    for e in entries:
        p = Path(e).expanduser()
        if p.is_dir():
            found = image_files(p, "--calib-images", e)
            if not found:
                raise InputError(f"directory holds no images ({', '.join(IMAGE_SUFFIXES[:5])}, ...)",
                                 flag="--calib-images", value=e)
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise InputError("no such file or directory", flag="--calib-images", value=e)
    return files[:limit]


def run(args) -> int:
    from sam2_layerwise.inputs import load_image
    from sam2_layerwise.model import build_model
    from sam2_layerwise.quant import calibrate_model, save_quantized_checkpoint
    from sam2_layerwise.quant.calibrate import calibration_plan
    from sam2_layerwise.quant.checkpoint import resolve_base_config
    from sam2_layerwise.store.layout import check_output_file

    setup_logging(args.quiet)
    qcfg = load_qat_flag(args)
    files = calibration_files(args.calib_images, args.max_calib_images)
    out = check_output_file(args.output, "--output", inputs={  # before calibration, not after it
        "--checkpoint": args.checkpoint, "--config": args.config, "--adaptive-qat-config": args.adaptive_qat_config,
        "--calib-images": files})
    parent = out.parent
    images = [load_image(f, flag="--calib-images", max_pixels=args.max_pixels) for f in files]

    t0 = time.perf_counter()
    overrides = {"model.image_size": args.image_size} if args.image_size else None
    loaded = build_model(args.config or resolve_base_config(qcfg), args.checkpoint, device=args.device,
                         overrides=overrides)
    calibration_plan(loaded.model, qcfg)  # config mistakes that need the model surface before any work
    log.info("calibrating %s on %d images (%s)", loaded.config_path.name, len(images), qcfg.source)
    qm = calibrate_model(loaded.model, qcfg, images, seed=args.seed,
                         on_image=lambda n: log.info("  image %d/%d: %s", n + 1, len(images), files[n].name))
    calibration = {"method": "post-training calibration (sam2-layerwise quantize)",
                   "images": [str(f) for f in files], "prompts": "centre click; central box with the previous mask",
                   "float_checkpoint": str(args.checkpoint), "config": str(loaded.config_path), "seed": args.seed,
                   "image_size": int(loaded.model.image_size)}
    parent.mkdir(parents=True, exist_ok=True)
    save_quantized_checkpoint(qm, out, calibration)
    hist = qm.bits_histogram()
    log.info("wrote %s: %d quantizers (bits %s), %d sites in float, in %.1f s", out, len(qm.sites),
             ", ".join(f"{b}: {n}" for b, n in sorted(hist.items())), len(qm.floats), time.perf_counter() - t0)
    return 0

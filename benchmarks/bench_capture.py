"""Capture overhead against plain SAM 2, in one run.

Times `SAM2ImagePredictor.set_image` + `predict` with plain SAM 2 and with capture (default: statistics over
every query + selected queries; and `--query-stats selected`), interleaved, on the b+ architecture at 1024 with
random weights saved and loaded as a real SAM 2 checkpoint. The opt-in `--fast-attention` mode is timed too, with the
mask pixels it flips against plain SAM 2 (every other mode must flip none). Peak memory is measured in fresh child processes:
the kernel's resident-set high-water mark (VmHWM) is reset after the model is loaded (/proc/self/clear_refs),
so the peak is that of the run alone. Prints ratios against plain SAM 2.

    .venv/bin/python benchmarks/bench_capture.py [--config configs/sam2.1/sam2.1_hiera_b+.yaml] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "images" / "coffee.png"
MODES = {
    "plain": None,
    "capture (all-query stats)": {"all_query_stats": True},
    "capture (selected queries)": {"all_query_stats": False},
    "capture (--fast-attention)": {"all_query_stats": True, "fast_attention": True},
}


def _setup(config, checkpoint):
    from sam2_layerwise import build_model, load_image, parse_prompts

    model = build_model(config, str(checkpoint), device="cpu").model
    image = load_image(IMAGE)
    prompts = parse_prompts([320, 240, 1], None, None, image.shape[1], image.shape[0])
    return model, image, prompts


def _run(mode, model, image, prompts):
    from sam2_layerwise import CaptureOptions, capture_image, run_plain

    t = time.perf_counter()
    if MODES[mode] is None:
        masks = run_plain(model, image, prompts).masks
    else:
        masks = capture_image(model, image, prompts, CaptureOptions(max_attn_queries=2, **MODES[mode])).prediction.masks
    return time.perf_counter() - t, masks


def _vm(field: str) -> float:
    """A /proc/self/status memory field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode, config, checkpoint):
    import gc

    model, image, prompts = _setup(config, checkpoint)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _vm("VmRSS")
    seconds, _ = _run(mode, model, image, prompts)
    peak = _vm("VmHWM")
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mib": peak - before, "before_mib": before}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_b+.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.child:
        return child(args.child, args.config, args.checkpoint)

    from sam2_layerwise.model import build_model, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "random.pt"
        save_checkpoint(build_model(args.config, random_init=True, device="cpu").model, ckpt)
        print(f"model: {args.config}, random weights saved and loaded as a SAM 2 checkpoint; image {IMAGE.name}; "
              f"torch threads {torch.get_num_threads()}", flush=True)

        peaks = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", args.config,
                                  "--checkpoint", str(ckpt)], capture_output=True, text=True, check=True)
            peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]

        model, image, prompts = _setup(args.config, ckpt)
        _run("plain", model, image, prompts)  # warm-up
        times = {m: [] for m in MODES}
        flipped = {m: 0 for m in MODES}
        plain_masks = _run("plain", model, image, prompts)[1]
        order = list(MODES)
        for r in range(args.repeats):
            # interleaved, so drift hits every mode alike, and in an order that rotates each round: whichever mode
            # runs right after another pays for what that one left behind (freed memory to fault in again)
            for mode in order[r % len(order):] + order[:r % len(order)]:
                seconds, masks = _run(mode, model, image, prompts)
                times[mode].append(seconds)
                flipped[mode] = max(flipped[mode], int((masks != plain_masks).sum()))

    # This shared 2-core VM adds +-15% noise to single runs: report the median over repeats of each run's time
    # divided by the plain run just before it (paired, so slow phases hit both sides alike).
    print(f"\n{'mode':30s} {'median s':>9s} {'ratio':>7s} {'ratios (each repeat)':>28s} {'run peak MiB':>13s} "
          f"{'extra MiB':>10s} {'mask px flipped':>16s}")
    for mode in MODES:
        ratios = [t / p for t, p in zip(times[mode], times["plain"])]
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{mode:30s} {statistics.median(times[mode]):9.2f} {statistics.median(ratios):7.3f} {shown:>28s} "
              f"{peaks[mode]:13.0f} {peaks[mode] - peaks['plain']:10.0f} {flipped[mode]:16d}")
    print(f"mask px flipped: the most pixels differing from plain SAM 2's masks in one repeat, of {plain_masks.size} "
          f"({plain_masks.shape[0]} masks); only --fast-attention (opt-in) may flip any")
    from sam2_layerwise.capture import native

    print(f"\nall-query statistics path: {native.path_name()} ({native.MODE_ENV}={native.mode()})")
    print("targets: default capture <= 1.20 x plain on b+ (<= 1.25 x on t); extra peak memory <= 300 MiB")


if __name__ == "__main__":
    main()

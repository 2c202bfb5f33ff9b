"""Video capture overhead against plain SAM2VideoPredictor on the same frames, in one run.

Tracks one click through N frames cut from a real photograph (a crop sliding across coffee.png) with plain
SAM 2 (`model.video.track_plain`) and with capture in several modes, interleaved, on the t (default) or b+
architecture at 1024 with random weights saved and loaded as a SAM 2 checkpoint. The first frame is excluded
from the per-frame time (it carries the prompt; SAM 2's memory starts there); the ratio is the median over
repeats of each capture run's per-frame time divided by the plain run's just before it. Peak memory is measured
in fresh child processes: the resident-set high-water mark (VmHWM) is reset after the model is loaded, so the
peak is that of tracking alone.

    .venv/bin/python benchmarks/bench_video.py [--config configs/sam2.1/sam2.1_hiera_t.yaml] [--frames 8] [--repeats 3]
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "images" / "coffee.png"
MODES = {
    "plain SAM2VideoPredictor": None,
    "capture, default (memory mass over every query)": {"all_query_stats": False, "memory_mass": "all"},
    "capture, --memory-mass sampled (1/16 of the queries)": {"all_query_stats": False, "memory_mass": "sampled"},
    "capture, --memory-mass selected": {"all_query_stats": False, "memory_mass": "selected"},
    "capture, --query-stats all": {"all_query_stats": True, "memory_mass": "all"},
}
PLAIN = next(iter(MODES))


class _Frames:
    """A VideoSource stand-in: `n` crops sliding across the photograph (512 x 340 each)."""

    def __init__(self, n: int):
        from sam2_layerwise.frames import FrameInfo
        from sam2_layerwise.inputs import load_image

        photo = load_image(IMAGE)
        self._frames = [np.ascontiguousarray(photo[6 * i:6 * i + 340, 10 * i:10 * i + 512]) for i in range(n)]
        self.frames = [FrameInfo(i, i, f"crop {i}") for i in range(n)]
        self.width, self.height, self.path = 512, 340, IMAGE

    def __len__(self):
        return len(self._frames)

    def image(self, i):
        return self._frames[i]


def _setup(config, checkpoint, n):
    from sam2_layerwise import build_model, parse_prompts
    from sam2_layerwise.model.video import video_overrides

    model = build_model(config, str(checkpoint), device="cpu", overrides=video_overrides()).model
    source = _Frames(n)
    prompts = parse_prompts([250, 170, 1], None, None, source.width, source.height)
    return model, source, prompts


def _run(mode, model, source, prompts) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds per frame (between SAM 2's yields), in tracking order. CPU time (this process,
    all threads) is the steadier measure on a machine shared with other jobs."""
    from sam2_layerwise.api_video import capture_video
    from sam2_layerwise.capture import CaptureOptions
    from sam2_layerwise.model.video import track

    stamps, cpu = [time.perf_counter()], [time.process_time()]

    def tick(*_):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    if MODES[mode] is None:
        track(model, source, prompts, 0, on_frame=tick)
    else:
        capture_video(model, source, prompts, CaptureOptions(max_attn_queries=4, **MODES[mode]), prompt_frame=0,
                      on_frame=tick)
    return [b - a for a, b in zip(stamps, stamps[1:])], [b - a for a, b in zip(cpu, cpu[1:])]


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode, config, checkpoint, n):
    import gc

    model, source, prompts = _setup(config, checkpoint, n)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _vm("VmRSS")
    seconds = sum(_run(mode, model, source, prompts)[0])
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mib": _vm("VmHWM") - before}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    ap.add_argument("--frames", type=int, default=8, help="frames tracked (8: the memory bank is full, 7 frames)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default=None, help="comma list of mode numbers to run (0 = plain, always run)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.modes:
        keep = {0, *(int(x) for x in args.modes.split(","))}
        for i, m in enumerate(list(MODES)):
            if i not in keep:
                del MODES[m]
    if args.child:
        return child(args.child, args.config, args.checkpoint, args.frames)

    from sam2_layerwise.model import build_model, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "random.pt"
        save_checkpoint(build_model(args.config, random_init=True, device="cpu").model, ckpt)
        print(f"model: {args.config}, random weights saved and loaded as a SAM 2 checkpoint; {args.frames} frames of "
              f"512x340 from {IMAGE.name}; torch threads {torch.get_num_threads()}", flush=True)
        peaks = {}
        if not args.no_memory:
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", args.config,
                                      "--checkpoint", str(ckpt), "--frames", str(args.frames)],
                                     capture_output=True, text=True, check=True)
                peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
                print(f"  peak memory {mode}: {peaks[mode]:.0f} MiB", flush=True)
        model, source, prompts = _setup(args.config, ckpt, args.frames)
        _run(PLAIN, model, source, prompts)  # warm-up
        times = {m: [] for m in MODES}
        cpus = {m: [] for m in MODES}
        for r in range(args.repeats):
            for mode in MODES:  # interleaved, so drift hits every mode alike
                wall, cpu = _run(mode, model, source, prompts)
                times[mode].append(sum(wall[1:]) / (len(wall) - 1))  # tracked frames only
                cpus[mode].append(sum(cpu[1:]) / (len(cpu) - 1))
                print(f"  repeat {r}: {mode}: {times[mode][-1]:.2f} s/frame ({cpus[mode][-1]:.2f} CPU s)", flush=True)

    print(f"\n{'mode':52s} {'s/frame':>8s} {'ratio':>6s} {'wall ratios':>16s} {'CPU ratio':>10s} "
          f"{'extra peak MiB':>15s}")
    for mode in MODES:
        ratios = [t / p for t, p in zip(times[mode], times[PLAIN])]
        cpu_ratios = [t / p for t, p in zip(cpus[mode], cpus[PLAIN])]
        extra = f"{peaks[mode] - peaks[PLAIN]:15.0f}" if peaks else f"{'-':>15s}"
        print(f"{mode:52s} {statistics.median(times[mode]):8.2f} {statistics.median(ratios):6.3f} "
              f"{' '.join(f'{r:.2f}' for r in ratios):>16s} {statistics.median(cpu_ratios):10.3f} {extra}")
    print("\ntargets (issue 9): default capture <= 1.15 x plain per frame; extra peak memory <= 300 MiB")


if __name__ == "__main__":
    main()

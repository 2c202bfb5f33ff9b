"""sweep's cost, printed as ratios: per item against plain SAM 2, attribution's restart against naive reruns,
the Ray engine against the local one.

On the chosen architecture at its image size, random weights saved as a real SAM 2 checkpoint and a W8A8
checkpoint calibrated from it by `sam2-layerwise quantize` (one photograph); items cut from the bundled photos:

1. per item, light metrics (`SweepWorker.run`: image and prompts, float and quantized capture of the selected
   queries, q/k/v errors, generate's metrics, output impact) against plain SAM 2 on the same item: a plain
   float forward (set_image + predict) plus a plain fake-quantized forward, interleaved, median of the ratios;
2. `--attribute` over every Hiera block (restore mode) with the restart from the cached block inputs against
   naive full reruns of the same restorations (the same rows, bit for bit: checked);
3. (`--ray`) the whole sweep on the Ray engine with 2 workers against the local engine: wall time per item
   once running, and the start-up (Ray, actors, models) on its own.

    .venv/bin/python benchmarks/bench_sweep.py [--config configs/sam2.1/sam2.1_hiera_t.yaml] [--items 4]
        [--repeats 2] [--ray] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [REPO / "examples" / "images" / "coffee.png", REPO / "examples" / "images" / "chelsea.png"]
QCFG = REPO / "examples" / "quantization" / "w8a8.yaml"


def cli(*args) -> None:
    from sam2_layerwise.cli.main import main

    code = main([*map(str, args), "-q"])
    if code != 0:
        raise SystemExit(f"{args[0]} failed with exit {code}")


def make_items(d: Path, n: int) -> Path:
    """n images cut from the bundled photographs (crops and resizes, PNG and JPEG)."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    for i in range(n):
        im = photos[i % 2]
        w, h = im.size
        if i // 2 % 2:
            im = im.crop((w // 8, h // 8, w - w // 8, h - h // 8))
        im.save(d / f"item{i}.{'jpg' if i % 3 == 2 else 'png'}", quality=92)
    return d


def args_for(config, fp_ckpt, q_ckpt, inputs, out, *extra):
    from sam2_layerwise.cli.main import build_parser

    argv = ["sweep", "--config-original", str(config), "--checkpoint-original", str(fp_ckpt), "--config-quantized",
            str(QCFG), "--checkpoint-quantized", str(q_ckpt), "--inputs", str(inputs), "--output-dir", str(out),
            "--device", "cpu", "-q", *map(str, extra)]
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args


def per_item(worker, items, repeats: int) -> dict:
    import dataclasses

    from sam2_layerwise.inputs import load_image, parse_prompts
    from sam2_layerwise.model.predict import run_plain

    ratios, sweep_s, plain_s = [], [], []
    worker.run(items[0])  # warm-up
    for _ in range(repeats):
        for item in items:
            image = load_image(item.image)
            prompts = parse_prompts(list(item.points), None, None, image.shape[1], image.shape[0])
            ctx = dataclasses.replace(worker.base, image=image, prompts=prompts, _predictors={})
            t0 = time.perf_counter()
            with ctx.float_model():
                run_plain(worker.model, image, prompts)
            run_plain(worker.model, image, prompts)
            t1 = time.perf_counter()
            result = worker.run(item)
            t2 = time.perf_counter()
            assert result["status"] == "ok", result["error"]
            plain_s.append(t1 - t0)
            sweep_s.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
    return {"plain_fp_plus_q_s": statistics.median(plain_s), "sweep_item_s": statistics.median(sweep_s),
            "ratio_median": statistics.median(ratios), "ratios": ratios}


def attribution(worker, items, repeats: int) -> dict:
    import dataclasses

    import numpy as np

    from sam2_layerwise.analysis.attribute import ForwardCache, attribute
    from sam2_layerwise.api import capture_image
    from sam2_layerwise.inputs import load_image, parse_prompts

    fast_s, naive_s, ratios = [], [], []
    for item in items[:max(1, repeats)]:
        image = load_image(item.image)
        prompts = parse_prompts(list(item.points), None, None, image.shape[1], image.shape[0])
        ctx = dataclasses.replace(worker.base, image=image, prompts=prompts, _predictors={})
        with ctx.float_model():
            fp = capture_image(worker.model, image, prompts, worker.options).prediction
        with ForwardCache(worker.model) as qc:
            q = capture_image(worker.model, image, prompts, worker.options).prediction
        ctx.set_baselines(fp_prediction=fp, q_prediction=q, q_cache=qc)
        t0 = time.perf_counter()
        fast = attribute(ctx, "image_encoder_trunk_blocks_*", "restore")
        t1 = time.perf_counter()
        naive = attribute(ctx, "image_encoder_trunk_blocks_*", "restore", naive=True)
        t2 = time.perf_counter()
        same = all(a["iou"] == b["iou"] and a["logit_mean_abs_error"] == b["logit_mean_abs_error"]
                   or (np.isnan(a["iou"]) and np.isnan(b["iou"])) for a, b in zip(fast, naive))
        assert same, "restart and naive rerun disagree"
        fast_s.append(t1 - t0)
        naive_s.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return {"blocks": len(fast), "restart_s": statistics.median(fast_s), "naive_s": statistics.median(naive_s),
            "ratio_median": statistics.median(ratios), "ratios": ratios, "identical_rows": True}


def engines(config, fp_ckpt, q_ckpt, inputs, work: Path, n: int, ray_workers: int = 2) -> dict:
    """The same sweep on the local engine and on Ray with `ray_workers` workers (a local Ray instance started
    for it)."""
    import pandas as pd

    from sam2_layerwise.sweep.run import run_sweep

    out = {}
    for engine, extra, workers in (("local", (), 1),
                                   ("ray", ("--engine", "ray", "--num-workers", ray_workers), ray_workers)):
        t0 = time.perf_counter()
        report = run_sweep(args_for(config, fp_ckpt, q_ckpt, inputs, work / engine, *extra))
        wall = time.perf_counter() - t0
        items = pd.read_parquet(work / engine / "items.parquet")
        busy = float(items["seconds_total"].sum())
        out[engine] = {"wall_s": wall, "ok": report["ok"], "item_s_mean": busy / n,
                       # what is not item work: loading models, starting Ray and actors, tables, aggregation
                       "fixed_s": wall - busy / workers}
    out["ray_over_local_wall"] = out["ray"]["wall_s"] / out["local"]["wall_s"]
    out["ray_over_local_item"] = out["ray"]["item_s_mean"] / out["local"]["item_s_mean"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also the Ray engine (--ray-workers, default 2)")
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--only-engines", action="store_true", help="skip the per-item and attribution parts")
    ap.add_argument("--skip-attribution", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from sam2_layerwise.sweep.inputs import AutoPrompts, plan_items, read_inputs
    from sam2_layerwise.sweep.run import _models, _spec, identity_of
    from sam2_layerwise.sweep.worker import SweepWorker

    torch.manual_seed(0)
    results = {"config": a.config, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp_ckpt, q_ckpt = work / "random.pt", work / "w8a8.pt"
        t = time.perf_counter()
        cli("init-checkpoint", "--config", a.config, "--output", fp_ckpt)
        cli("quantize", "--config", a.config, "--checkpoint", fp_ckpt, "--adaptive-qat-config", QCFG,
            "--calib-images", PHOTOS[0], "--output", q_ckpt, "--device", "cpu")
        results["setup_s"] = time.perf_counter() - t
        inputs = make_items(work / "items", a.items)
        args = args_for(a.config, fp_ckpt, q_ckpt, inputs, work / "unused")
        _, hashes = _models(args)
        worker = SweepWorker(_spec(args, hashes, None, None))
        items = plan_items(read_inputs(str(inputs))[1], AutoPrompts.parse("center"),
                           json.dumps(identity_of(args, hashes)["models"]))
        if not a.only_engines:
            r = results["per_item"] = per_item(worker, items, a.repeats)
            print(f"per item (light metrics): sweep {r['sweep_item_s']:.2f} s vs plain FP + Q "
                  f"{r['plain_fp_plus_q_s']:.2f} s: ratio {r['ratio_median']:.3f} (target <= 1.15)", flush=True)
        if not a.skip_attribution and not a.only_engines:
            results["attribution"] = attribution(worker, items, a.repeats)
            r = results["attribution"]
            print(f"--attribute over {r['blocks']} Hiera blocks: restart {r['restart_s']:.1f} s vs naive reruns "
                  f"{r['naive_s']:.1f} s: ratio {r['ratio_median']:.3f} (target <= 0.6), rows identical", flush=True)
        del worker
        if a.ray:
            results["engines"] = engines(a.config, fp_ckpt, q_ckpt, inputs, work / "engines", a.items, a.ray_workers)
            e = results["engines"]
            print(f"engines over {a.items} items: local {e['local']['wall_s']:.1f} s wall, Ray ({a.ray_workers} "
                  f"workers) {e['ray']['wall_s']:.1f} s ({e['ray_over_local_wall']:.2f} x); one item: local "
                  f"{e['local']['item_s_mean']:.2f} s ({torch.get_num_threads()} threads), Ray "
                  f"{e['ray']['item_s_mean']:.2f} s (1 thread per worker, {e['ray_over_local_item']:.2f} x); fixed "
                  f"costs: local {e['local']['fixed_s']:.1f} s, Ray {e['ray']['fixed_s']:.1f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

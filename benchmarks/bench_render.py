"""Rendering cost against the capture it draws.

Captures the b+ architecture at 1024 (random weights) once, with what `visualize` keeps when it draws
(2 queries per layer, q/k/v kept for decoder image->token maps), then times drawing every layer's maps:
attention images and overlays on a photograph larger than the overlay cap, plus the top-k lists, written
through the staging writer exactly as the CLI does. Prints the ratio to the capture time (target <= 0.3).

    .venv/bin/python benchmarks/bench_render.py [--config configs/sam2.1/sam2.1_hiera_b+.yaml] [--photo 1536x1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "images" / "coffee.png"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_b+.yaml")
    ap.add_argument("--photo", default="1536x1024", help="photograph size WxH (coffee.png resized)")
    ap.add_argument("--queries", type=int, default=2)
    args = ap.parse_args()

    from sam2_layerwise import CaptureOptions, build_model, capture_image, load_image, parse_prompts
    from sam2_layerwise.render.attention import RenderOptions
    from sam2_layerwise.render.maps import MapOptions
    from sam2_layerwise.render.run import RenderPlan, render_capture
    from sam2_layerwise.store.layout import RunWriter

    w, h = (int(v) for v in args.photo.lower().split("x"))
    photo = np.asarray(Image.fromarray(load_image(IMAGE)).resize((w, h), Image.BILINEAR))
    prompts = parse_prompts([w * 0.53, h * 0.6, 1], None, [w * 0.2, h * 0.25], w, h)  # a click and a query point
    model = build_model(args.config, random_init=True, device="cpu").model
    print(f"model: {args.config} (random weights), photo {w}x{h}, {args.queries} queries per layer, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    options = CaptureOptions(max_attn_queries=args.queries, keep_qkv=True)
    capture_image(model, photo, prompts, options)  # warm-up
    t0 = time.perf_counter()
    cap = capture_image(model, photo, prompts, options)
    t_capture = time.perf_counter() - t0

    plan = RenderPlan(RenderOptions(images=True, overlays=True), MapOptions(max_queries=args.queries), topk=10,
                      topk_symlink=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        with RunWriter(out) as writer:
            render_capture(writer, cap, photo, plan)
        t_render = time.perf_counter() - t0
        images = len(list((out / "attn_images" / "all").glob("*.png")))
        overlays = len(list((out / "attn_overlays" / "all").glob("*.png")))
        size = sum(p.stat().st_size for p in out.rglob("*.png") if not p.is_symlink()) / 2**20

    print(f"capture {t_capture:.2f} s ({len(cap.attention)} attention calls); render {t_render:.2f} s "
          f"({images} attention images, {overlays} overlays, {size:.0f} MiB with hard links counted twice)")
    print(f"render / capture = {t_render / t_capture:.3f}  (target <= 0.3)")


if __name__ == "__main__":
    main()

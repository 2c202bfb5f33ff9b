"""compare and generate against plain SAM 2, in one run, plus the disk each mode takes.

On the chosen architecture at its image size with random weights saved as a real SAM 2 checkpoint and a W8A8
checkpoint calibrated from it by `sam2-layerwise quantize` (one photograph), each timed run in a fresh process
(imports excluded; the order of the three turns every repeat):

- plain: SAM 2's own `build_sam2` + SAM2ImagePredictor for the float model, then the same for the fake-quantized
  model (build_sam2's model given the quantized checkpoint's weights and quantizers), one after the other (what a
  user would run without this tool); also both through this tool's loader, which skips the random
  initialisation the checkpoints overwrite, as a second reference; and that again with the allocator settings
  the CLI gives its own model-running processes (`sam2_layerwise/allocator.py`), which measures the capture's
  own cost apart from what those settings save;
- `compare --save-raw` (a fresh process each repeat, as above) and `compare --save-full-attn` (in-process), the
  same image and click;
- `generate` on the light run (all layers and heads) and on the full run, against one plain float forward;
  generate's peak memory (VmHWM) above what it held before, in a fresh process;
- the size of each run directory.

    .venv/bin/python benchmarks/bench_compare.py [--config configs/sam2.1/sam2.1_hiera_b+.yaml] [--repeats 1]
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

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "images" / "coffee.png"
QCFG = REPO / "examples" / "quantization" / "w8a8.yaml"
POINTS = ["320", "240", "1"]


def cli(*args) -> float:
    from sam2_layerwise.cli.main import main

    t = time.perf_counter()
    code = main([*args, "-q"])
    if code != 0:
        raise SystemExit(f"{args[0]} failed with exit {code}")
    return time.perf_counter() - t


def plain_pair(config, fp_ckpt, q_ckpt, loader: str = "sam2") -> tuple[float, float]:
    """(float + quantized plain runs including loading, one plain float forward), one model after the other.

    loader "sam2": SAM 2 as its own package builds it, `sam2.build_sam.build_sam2` (hydra, random initialisation,
    then the checkpoint), for both models; the second takes the quantized checkpoint's weights and fake quantizers
    (`load_quantized_model` on the model build_sam2 made). loader "tool": both through this tool's loader, which
    skips the random initialisation a checkpoint overwrites (`model.loading.skip_init`)."""
    import gc

    import torch
    from sam2.build_sam import build_sam2

    from sam2_layerwise import build_model, load_image, parse_prompts, run_plain
    from sam2_layerwise.model.loading import LoadedModel, resolve_config
    from sam2_layerwise.quant import load_quant_config, load_quantized_model

    image = load_image(IMAGE)
    prompts = parse_prompts([float(v) for v in POINTS], None, None, image.shape[1], image.shape[0])
    t0 = time.perf_counter()
    if loader == "sam2":
        model = build_sam2(config, str(fp_ckpt), device="cpu")
    else:
        model = build_model(config, str(fp_ckpt), device="cpu").model
    t1 = time.perf_counter()
    run_plain(model, image, prompts)
    forward = time.perf_counter() - t1
    del model
    gc.collect()
    reuse = None
    if loader == "sam2":
        reuse = LoadedModel(model=build_sam2(config, None, device="cpu"), config_path=resolve_config(config),
                            checkpoint_path=None, device=torch.device("cpu"), random_init=True)
    loaded, _ = load_quantized_model(config, str(q_ckpt), load_quant_config(QCFG), device="cpu", reuse=reuse)
    run_plain(loaded.model, image, prompts)
    total = time.perf_counter() - t0
    del loaded, reuse
    gc.collect()
    return total, forward


def du(path: Path) -> int:
    """Bytes on disk of the files under `path`, hard links (attn_tensors/all/) counted once."""
    seen = {}
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            seen[st.st_dev, st.st_ino] = st.st_size
    return sum(seen.values())


PLAIN_KINDS = {"plain-sam2": "sam2", "plain-tool": "tool", "plain-tool-tuned": "tool"}


def child_run(kind: str, config: str, fp: str, q: str, out: str) -> None:
    """In a fresh process (a clean heap: runs in one process change each other's page faults by ±0.3 s): one timed
    run, imports first and not timed. `kind`: plain-sam2 / plain-tool (`plain_pair`) or compare (`--save-raw`)."""
    import sam2.build_sam  # noqa: F401  (imports are not the run)
    import sam2.sam2_image_predictor  # noqa: F401

    import sam2_layerwise.analysis.pair  # noqa: F401
    import sam2_layerwise.cli.main  # noqa: F401
    import sam2_layerwise.quant  # noqa: F401

    if kind.endswith("-tuned"):
        from sam2_layerwise.allocator import tune_for_tensors

        tune_for_tensors()  # as main() does for compare
    if kind == "compare":
        seconds, forward = cli(*compare_args(config, fp, q), "--output-dir", out, "--save-raw"), None
    else:
        seconds, forward = plain_pair(config, Path(fp), Path(q), PLAIN_KINDS[kind])
    print(json.dumps({"seconds": seconds, "forward": forward}))


def compare_args(config, fp, q) -> list[str]:
    return ["compare", "--config-original", config, "--checkpoint-original", str(fp), "--config-quantized", str(QCFG),
            "--checkpoint-quantized", str(q), "--image", str(IMAGE), "--points", *POINTS]


def in_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_generate(run_dir: str) -> None:
    """In a fresh process: generate's time and its peak resident memory above the start."""
    import torch

    torch.set_num_threads(torch.get_num_threads())

    def vm(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    import sam2_layerwise.analysis.generate  # noqa: F401  (imports are not the run)
    import sam2_layerwise.cli.main  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")
    before = vm("VmRSS")
    seconds = cli("generate", "--run_dir", run_dir)
    print(json.dumps({"seconds": seconds, "peak_mib": vm("VmHWM") - before}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_b+.yaml")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--light-only", action="store_true", help="only the paired plain / compare --save-raw runs")
    ap.add_argument("--child-generate", help=argparse.SUPPRESS)
    ap.add_argument("--child-run", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_generate:
        return child_generate(args.child_generate)
    if args.child_run:
        return child_run(*args.child_run)

    with tempfile.TemporaryDirectory(prefix="bench_compare_") as tmp:
        tmp = Path(tmp)
        fp, q = tmp / "float.pt", tmp / "w8a8.pt"
        cli("init-checkpoint", "--config", args.config, "--output", str(fp), "--seed", "1")
        t_quant = cli("quantize", "--config", args.config, "--checkpoint", str(fp), "--adaptive-qat-config",
                      str(QCFG), "--calib-images", str(IMAGE), "--output", str(q))
        print(f"architecture {args.config}, {Path(IMAGE).name}, random weights; W8A8 calibrated in {t_quant:.1f} s",
              flush=True)
        base = compare_args(args.config, fp, q)
        kinds = ("plain-sam2", "plain-tool", "plain-tool-tuned", "compare")
        times = {kind: [] for kind in kinds}
        forward_s = []
        for i in range(args.repeats):  # each run in its own process; the order turns by one every repeat
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                got = in_child("--child-run", kind, args.config, str(fp), str(q), str(tmp / "light"))
                times[kind].append(got["seconds"])
                if kind == "plain-sam2":
                    forward_s.append(got["forward"])
        plain_s, tool_s, light_s = times["plain-sam2"], times["plain-tool"], times["compare"]
        tuned_s = times["plain-tool-tuned"]
        ratios = [c / p for c, p in zip(light_s, plain_s)]
        tool_ratios = [c / p for c, p in zip(light_s, tool_s)]
        tuned_ratios = [c / p for c, p in zip(light_s, tuned_s)]
        print(f"plain float + quantized (SAM 2's build_sam2 + predictor, each): {statistics.median(plain_s):.1f} s "
              f"(one plain float forward {statistics.median(forward_s):.1f} s); through this tool's loader "
              f"(no random initialisation): {statistics.median(tool_s):.1f} s")
        print(f"compare --save-raw: {statistics.median(light_s):.1f} s -> {statistics.median(ratios):.2f} x plain "
              f"(target <= 1.1); each repeat: {' '.join(f'{r:.2f}' for r in ratios)}")
        print(f"  against plain runs through this tool's loader: {statistics.median(tool_ratios):.2f} x; each repeat: "
              f"{' '.join(f'{r:.2f}' for r in tool_ratios)}", flush=True)
        print(f"  against those with compare's allocator settings as well (the capture's own cost): "
              f"{statistics.median(tuned_ratios):.2f} x; each repeat: {' '.join(f'{r:.2f}' for r in tuned_ratios)}")
        print(f"  medians: {statistics.median(light_s) / statistics.median(plain_s):.2f} x build_sam2, "
              f"{statistics.median(light_s) / statistics.median(tool_s):.2f} x this tool's loader, "
              f"{statistics.median(light_s) / statistics.median(tuned_s):.2f} x with compare's allocator settings",
              flush=True)
        if args.light_only:
            return
        full_s = cli(*base, "--output-dir", str(tmp / "full"), "--save-full-attn")
        full16_s = cli(*base, "--output-dir", str(tmp / "full16"), "--save-full-attn", "--full-dtype", "fp16")
        gens = {}
        for name in ("light", "full"):
            out = subprocess.run([sys.executable, __file__, "--child-generate", str(tmp / name)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            gens[name] = json.loads(out)
        forward = statistics.median(forward_s)
        print(f"compare --save-full-attn: {full_s:.1f} s (fp16: {full16_s:.1f} s)")
        print(f"generate, light run (all layers and heads): {gens['light']['seconds']:.2f} s (target <= 3 s), "
              f"peak +{gens['light']['peak_mib']:.0f} MiB")
        print(f"generate, full run: {gens['full']['seconds']:.1f} s -> {gens['full']['seconds'] / forward:.2f} x one "
              f"plain forward (target <= 4), peak +{gens['full']['peak_mib']:.0f} MiB (target <= 1024)")
        for name in ("light", "full", "full16"):
            halves = {h: du(tmp / name / h) for h in ("original", "quantized")}
            print(f"disk {name}: {du(tmp / name) / 2**20:.1f} MiB in all (original {halves['original'] / 2**20:.1f}, "
                  f"quantized {halves['quantized'] / 2**20:.1f}, analysis {du(tmp / name / 'analysis') / 2**20:.1f})")


if __name__ == "__main__":
    main()

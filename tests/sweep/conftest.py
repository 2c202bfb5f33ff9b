"""Sweep fixtures: six items cut from the real photographs (crops and resizes, PNG and JPEG), the tiny model's
quantized checkpoints made by the real `quantize` command (`quant_checkpoints`, tests/conftest.py), and a
helper that runs a sweep through the CLI's own parser."""

from __future__ import annotations

import pytest
from PIL import Image

from sam2_layerwise.cli.main import build_parser, main
from tests.conftest import CHELSEA, COFFEE, TINY_CONFIG


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A directory of six images from chelsea.png and coffee.png (different sizes, aspect ratios and formats)."""
    d = tmp_path_factory.mktemp("photos")
    cat, cup = Image.open(CHELSEA).convert("RGB"), Image.open(COFFEE).convert("RGB")
    cat.save(d / "a_cat.png")
    cup.resize((300, 200)).save(d / "b_cup_small.jpg", quality=92)
    cat.crop((60, 20, 380, 280)).save(d / "c_cat_crop.png")
    cup.crop((150, 50, 550, 390)).save(d / "d_cup_crop.jpg", quality=90)
    cat.resize((160, 240)).save(d / "e_cat_tall.png")  # aspect ratio changed
    cup.crop((0, 0, 256, 256)).save(d / "f_cup_square.png")
    return d


def sweep_cmd(tiny_checkpoint, quant, name: str, inputs, out, *extra) -> list[str]:
    cfg, ckpt = quant[name]
    return ["sweep", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
            "--config-quantized", str(cfg), "--checkpoint-quantized", str(ckpt), "--inputs", str(inputs),
            "--output-dir", str(out), "-q", *map(str, extra)]


def run_api(argv: list[str], **kw) -> dict:
    """The sweep through the CLI's parser and `run_sweep` (returns its counts: total, ok, failed, skipped, ran)."""
    from sam2_layerwise.store.layout import COMMITTED
    from sam2_layerwise.sweep.run import run_sweep

    args = build_parser().parse_args(argv)
    args.argv = argv
    COMMITTED.clear()
    return run_sweep(args, **kw)


@pytest.fixture
def sweep(tiny_checkpoint, quant_checkpoints):
    """sweep(name, inputs, out, *extra) -> exit status of `sam2-layerwise sweep`."""
    def go(name, inputs, out, *extra):
        return main(sweep_cmd(tiny_checkpoint, quant_checkpoints, name, inputs, out, *extra))
    return go


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model's tensors are small: one intra-op thread is faster than two (and much faster on busy
    cores, where a parallel region waits for a core). Module scope, so the module's own fixtures run with it
    too; restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

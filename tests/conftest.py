"""Shared fixtures: the tiny SAM 2.1-shaped model (saved and loaded as a real SAM 2 checkpoint) and real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sam2_layerwise.inputs import load_image
from sam2_layerwise.model import build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "sam2_layerwise" / "configs" / "sam2_tiny_test.yaml")
CHELSEA = REPO / "examples" / "images" / "chelsea.png"  # 451 x 300, non-square
COFFEE = REPO / "examples" / "images" / "coffee.png"  # 600 x 400

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Seeded random weights for the tiny config, written in SAM 2's own format ({"model": state_dict})."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pt"
    save_checkpoint(build_model(TINY_CONFIG, random_init=True, seed=0, device="cpu").model, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model


@pytest.fixture(scope="session")
def tiny160_model(tiny_checkpoint):
    """The tiny model at 160 px: stage-3 and stage-4 grids (10, 5) are padded to whole windows."""
    return build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu", overrides={"model.image_size": 160}).model


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return load_image(CHELSEA)


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    return load_image(COFFEE)


@pytest.fixture(scope="session")
def quant_checkpoints(tmp_path_factory, tiny_checkpoint):
    """name -> (quantization config, calibrated checkpoint) for passthrough, w8a8 and w4a8_mixed (log2 probs),
    made by the real `quantize` command on coffee.png (compare, generate and sweep tests)."""
    from sam2_layerwise.cli.main import main

    d = tmp_path_factory.mktemp("qckpt")
    out = {}
    for name in ("passthrough", "w8a8", "w4a8_mixed"):
        cfg = REPO / "examples" / "quantization" / f"{name}.yaml"
        ckpt = d / f"{name}.pt"
        assert main(["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint),
                     "--adaptive-qat-config", str(cfg), "--calib-images", str(COFFEE), "--output", str(ckpt),
                     "-q"]) == 0
        out[name] = (cfg, ckpt)
    return out


@pytest.fixture
def compiled(monkeypatch):
    """The compiled statistics kernel, forced on (skips where no compiler can build it)."""
    from sam2_layerwise.capture import native

    monkeypatch.setenv(native.MODE_ENV, "compiled")
    try:
        native.kernel()
    except native.KernelUnavailable as exc:
        pytest.skip(f"no compiler here: {exc}")

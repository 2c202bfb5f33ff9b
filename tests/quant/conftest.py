"""Fixtures of the quantization tests: a private tiny model (quantizers are installed on it and removed again,
so the session's shared `tiny_model` is never touched) and configs derived from the shipped examples."""

from __future__ import annotations

import copy

import pytest
import yaml

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts
from sam2_layerwise.model import build_model
from sam2_layerwise.quant import parse_config
from tests.conftest import TINY_CONFIG
from tests.quant.helpers import EXAMPLES


@pytest.fixture(scope="module")
def qmodel(tiny_checkpoint):
    """A tiny model of this module's own, loaded from the session's checkpoint."""
    return build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model


@pytest.fixture(scope="session")
def prompts(chelsea):
    return parse_prompts([220, 150, 1, 60, 40, 0], None, None, chelsea.shape[1], chelsea.shape[0])


def example_raw(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


@pytest.fixture(scope="session")
def w8a8_cfg():
    return parse_config(example_raw("w8a8"), "w8a8.yaml")


@pytest.fixture(scope="session")
def w4a8_cfg():
    """w8a8 with 4-bit weights everywhere (activations and q/k/v stay 8-bit)."""
    raw = copy.deepcopy(example_raw("w8a8"))
    raw["defaults"]["weight"]["bits"] = 4
    return parse_config(raw, "w4a8.yaml")


@pytest.fixture(scope="session")
def mixed_cfg():
    return parse_config(example_raw("w4a8_mixed"), "w4a8_mixed.yaml")


@pytest.fixture(scope="module")
def float_capture(qmodel, chelsea, prompts):
    return capture_image(qmodel, chelsea, prompts, CaptureOptions(keep_qkv=True, max_attn_queries=3))

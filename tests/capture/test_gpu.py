"""CUDA checks (skipped without a GPU): fp32 capture on the device, and bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2_layerwise import CaptureOptions, build_model, capture_image, parse_prompts, run_plain
from tests.conftest import TINY_CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda_model(tiny_checkpoint):
    return build_model(TINY_CONFIG, str(tiny_checkpoint), device="cuda").model


def test_cuda_fp32_capture_is_faithful(cuda_model, chelsea):
    prompts = parse_prompts([220, 150, 1], None, None, chelsea.shape[1], chelsea.shape[0])
    plain = run_plain(cuda_model, chelsea, prompts)
    cap = capture_image(cuda_model, chelsea, prompts, CaptureOptions(keep_qkv=True))
    assert np.array_equal(plain.masks, cap.prediction.masks)
    for r in cap.attention:
        assert r.kernel_dtype == "float32" and r.module_max_abs_err <= 1e-4, r.layer_key


def test_bf16_autocast_capture_records_bf16_kernels(cuda_model, chelsea):
    prompts = parse_prompts([220, 150, 1], None, None, chelsea.shape[1], chelsea.shape[0])
    plain = run_plain(cuda_model, chelsea, prompts, precision="bf16")
    cap = capture_image(cuda_model, chelsea, prompts, precision="bf16")
    assert np.array_equal(plain.masks, cap.prediction.masks)
    assert {r.kernel_dtype for r in cap.attention} == {"bfloat16"}
    for r in cap.attention:
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(r.probs.shape[:-1]), atol=1e-4, rtol=0)
        assert r.module_max_abs_err < 0.1, r.layer_key  # bf16 kernel vs fp32 recomputation

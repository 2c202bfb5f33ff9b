"""Quantized capture on CUDA (skipped without a GPU): the same quantizers, calibrated on the device, stay faithful,
and a checkpoint calibrated on the CPU runs on the GPU with close outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2_layerwise import CaptureOptions, build_model, capture_image, run_plain
from sam2_layerwise.quant import calibrate_model, load_quantized_model, save_quantized_checkpoint
from tests.conftest import TINY_CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_quantized_capture(tiny_checkpoint, mixed_cfg, chelsea, coffee, prompts, tmp_path):
    cpu = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model
    qm = calibrate_model(cpu, mixed_cfg, [chelsea, coffee])
    cpu_out = run_plain(cpu, chelsea, prompts)
    path = save_quantized_checkpoint(qm, tmp_path / "mixed.pt")
    qm.remove()

    loaded, qm_cuda = load_quantized_model(TINY_CONFIG, str(path), mixed_cfg, device="cuda")
    assert all(fq.scale is None or fq.scale.is_cuda for fq in qm_cuda.quantizers.values())
    plain = run_plain(loaded.model, chelsea, prompts)
    cap = capture_image(loaded.model, chelsea, prompts, CaptureOptions(keep_qkv=True))
    assert np.array_equal(plain.masks, cap.prediction.masks)
    for r in cap.attention:
        assert r.kernel_max_abs_err <= 1e-4 and r.module_max_abs_err <= 1e-4, r.layer_key
    # different kernels, same quantizers: close to the CPU model (a few codes may round the other way)
    assert np.abs(plain.low_res_logits - cpu_out.low_res_logits).mean() < 0.05
    qm_cuda.remove()

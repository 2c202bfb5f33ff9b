"""The fake-quantized model tracks too: its quantizers stay installed through SAM2VideoPredictor, memory attention
records hold the quantized probabilities the kernel multiplied with v, and capture changes no mask."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sam2_layerwise.api_video import capture_video
from sam2_layerwise.capture import CaptureOptions
from sam2_layerwise.cli.main import main
from sam2_layerwise.frames import FrameSelection, open_video
from sam2_layerwise.inputs import parse_prompts
from sam2_layerwise.model import build_model
from sam2_layerwise.model.video import track_plain, video_overrides
from sam2_layerwise.quant import parse_config
from sam2_layerwise.quant.apply import quantize_model
from tests.conftest import TINY_CONFIG
from tests.video.conftest import H, W

# 8-bit weights everywhere (scales from the weights), memory attention's softmax quantized to log2 4-bit codes
# (no calibration needed): the quantized kernel computes memory attention itself, tile by tile.
RAW = {
    "format": "sam2-layerwise/quant-config", "version": 1, "name": "video_w8_log2mem",
    "defaults": {"weight": {"kind": "uniform", "bits": 8, "symmetric": True, "granularity": "per_channel",
                            "calibration": "minmax"}},
    "rules": [{"match": "memory_attention.layers.*.cross_attn_image",
               "attention": {"probs": {"kind": "log2", "bits": 4}}}],
}


@pytest.fixture(scope="module")
def qcfg_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("qcfg") / "video_w8_log2mem.yaml"
    p.write_text(yaml.safe_dump(RAW))
    return p


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, qcfg_path):
    model = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu", overrides=video_overrides()).model
    qm = quantize_model(model, parse_config(RAW, str(qcfg_path)))
    yield model, qm
    qm.remove()


def test_quantized_model_tracks_and_is_captured_exactly(quantized, frames_dir):
    model, qm = quantized
    prompts = parse_prompts([230, 150, 1], None, None, W, H)
    with open_video(frames_dir, FrameSelection(max_frames=3)) as src:
        plain = track_plain(model, src, prompts, 0)
        cap = capture_video(model, src, prompts, CaptureOptions(max_attn_queries=1), prompt_frame=0)
    assert [f.index for f in cap.prediction.frames] == [0, 1, 2]
    for a, b in zip(plain.frames, cap.prediction.frames):
        assert (a.mask == b.mask).all() and (a.logits == b.logits).all()
    cross = [r for r in cap.attention if r.kind == "memory_cross"]
    assert {r.frame_index for r in cross} == {1, 2}
    for r in cross:
        assert r.geometry["segmentation"]["verified"]
        assert r.module_max_abs_err <= 1e-4 and r.kernel_max_abs_err <= 1e-4
        p = r.probs[r.probs > 0]  # log2 codes: every kept probability is a power of two
        assert torch.equal(p, torch.exp2(torch.round(torch.log2(p))))
        assert qm.module_report(r.name)["kernel"]["probs"]["kind"] == "log2"


def test_cli_quantized_video(tmp_path, tiny_checkpoint, qcfg_path, frames_dir):
    out = tmp_path / "qrun"
    code = main(["visualize", "--config", TINY_CONFIG, "--random-init", "--device", "cpu", "--video", str(frames_dir),
                 "--max-frames", "3", "--points", "230", "150", "1", "--adaptive-qat-config", str(qcfg_path),
                 "--layers", "memory_attention*", "--output-dir", str(out), "-q"])
    assert code == 0
    s = json.loads((out / "layerwise_summary.json").read_text())
    assert s["quantization"] and s["fidelity"]["ok"]
    cross = [e for e in s["attention"] if e["kind"] == "memory_cross"]
    assert cross and all(e["quant"]["kernel"]["probs"]["kind"] == "log2" for e in cross)

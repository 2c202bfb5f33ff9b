"""`--fast-attention` in video mode (see tests/capture/test_fast_attention.py for the kernel itself)."""

from __future__ import annotations

import json

from sam2_layerwise.cli.main import main
from tests.conftest import TINY_CONFIG


def test_video_run_with_fast_attention(compiled, tmp_path, tiny_checkpoint, frames_dir):
    """Video mode too: memory self- and cross-attention (RoPE, object pointers) take their outputs from the kernel,
    the run tracks every frame, its memory mass still comes from the statistics kernel, and the summary says so."""
    out = tmp_path / "video"
    assert main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                 "--video", str(frames_dir), "--points", "230", "150", "1", "--output-dir", str(out),
                 "--fast-attention", "-q"]) == 0
    s = json.loads((out / "layerwise_summary.json").read_text())
    assert s["mode"] == "video" and all(f["tracked"] for f in s["frames"]["list"])
    kinds = {e["kind"] for e in s["attention"] if e.get("fast_attention")}
    assert {"memory_self", "memory_cross", "hiera_global"} <= kinds
    assert s["fidelity"]["masks_may_differ"] and s["fidelity"]["fast_attention_calls"] == len(s["attention"])
    assert s["fidelity"]["max_module_abs_err"] <= 1e-4
    cross = [e for e in s["attention"] if e["kind"] == "memory_cross"]
    assert cross and all(e.get("memory_mass") for e in cross)

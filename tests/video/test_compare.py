"""`compare --video`: both models track the same frames; `generate` then ranks memory-attention layers too."""

from __future__ import annotations

import json

import pytest
import yaml

from sam2_layerwise.cli.main import main
from tests.conftest import COFFEE, TINY_CONFIG
from tests.video.test_quantized import RAW


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, tiny_checkpoint, frames_dir):
    root = tmp_path_factory.mktemp("vcompare")
    qcfg = root / "video_q.yaml"
    qcfg.write_text(yaml.safe_dump(RAW))
    out = root / "run"
    # weights are quantized from the float weights and log2 probabilities need no scales: the float checkpoint
    # is this config's quantized checkpoint too
    code = main(["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
                 "--config-quantized", str(qcfg), "--checkpoint-quantized", str(tiny_checkpoint), "--device", "cpu",
                 "--video", str(frames_dir), "--max-frames", "3", "--points", "230", "150", "1", "--save-raw",
                 "--layers", "memory_attention*,image_encoder_trunk_blocks_0", "--output-dir", str(out), "-q"])
    assert code == 0
    return out, qcfg


def test_compare_video_halves(compare_run):
    out, _ = compare_run
    m = json.loads((out / "manifest.json").read_text())
    assert m["video"]["frames"] == 3 and m["prompt_frame"] == 0
    halves = {h: json.loads((out / h / "layerwise_summary.json").read_text()) for h in ("original", "quantized")}
    for s in halves.values():
        assert s["mode"] == "video" and s["frames"]["count"] == 3 and s["image"]["sha256"] == m["image"]["sha256"]
    a, b = (halves[h]["attention"] for h in ("original", "quantized"))
    assert [(e["layer_key"], e["frame"], e["k_shape"]) for e in a] == [(e["layer_key"], e["frame"], e["k_shape"])
                                                                        for e in b]
    cross = [e for e in b if e["kind"] == "memory_cross"]
    assert {e["frame"] for e in cross} == {1, 2} and all(e["quant"]["kernel"]["probs"]["kind"] == "log2" for e in cross)
    assert halves["quantized"]["compare"]["errors"]  # windowed Hiera calls: q/k/v and output errors


def test_generate_ranks_memory_attention(compare_run, capsys):
    out, _ = compare_run
    code = main(["generate", "--run_dir", str(out), "--heads", "all", "-q"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "analysis" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "memory_attention_layers_1_cross_attn_image" in text
    ranking = (out / "analysis" / "ranking.txt").read_text()
    assert "memory_attention" in ranking


def test_compare_video_bad_inputs(compare_run, tmp_path, tiny_checkpoint, frames_dir, capsys):
    _, qcfg = compare_run
    base = ["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
            "--config-quantized", str(qcfg), "--checkpoint-quantized", str(tiny_checkpoint), "--device", "cpu",
            "--points", "230", "150", "1", "--save-raw", "--output-dir", str(tmp_path / "out")]
    for extra, needles in ((["--video", str(frames_dir), "--image", str(COFFEE)], ["--video", "--image"]),
                           (["--video", str(frames_dir), "--prompt-frame", "8"], ["--prompt-frame 8", "out of range"]),
                           ([], ["--image", "--video"])):
        code = main([*base, *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert code == 2 and len(err) == 1 and all(n in err[0] for n in needles), err
        assert not (tmp_path / "out").exists()

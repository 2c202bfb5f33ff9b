"""`compare --video`: both models track the same frames; `generate` then ranks memory-attention layers too."""

from __future__ import annotations

import csv
import json
import math

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


# -- q/k/v and output errors of every call, memory attention included (both models track in lockstep) ----------
W8A8_MEMORY = {  # 8-bit weights everywhere; 8-bit inputs and q/k/v in memory attention, which images cannot calibrate
    "format": "sam2-layerwise/quant-config", "version": 1, "name": "w8a8_memory",
    "defaults": {"weight": {"kind": "uniform", "bits": 8, "symmetric": True, "granularity": "per_channel",
                            "calibration": "minmax"}},
    "rules": [{"match": "memory_attention",
               "activation": {"kind": "uniform", "bits": 8, "symmetric": True, "calibration": "minmax"},
               "attention": {"q": {"bits": 8, "symmetric": True}, "k": {"bits": 8, "symmetric": True},
                             "v": {"bits": 8, "symmetric": True}}}],
}
ERROR_NAMES = ("q_rel_err", "k_rel_err", "v_rel_err", "out_rel_err")


def _video_compare(root, name, qcfg, qckpt, ckpt, frames_dir):
    out = root / name
    assert main(["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(ckpt),
                 "--config-quantized", str(qcfg), "--checkpoint-quantized", str(qckpt), "--device", "cpu",
                 "--video", str(frames_dir), "--max-frames", "4", "--prompt-frame", "1", "--points", "230", "150",
                 "1", "--save-raw", "--output-dir", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, tiny_checkpoint, frames_dir):
    """compare --video with the passthrough config and with W8A8 on memory attention (its input and q/k/v scales
    set by hand: a fixed 8-bit grid of step 0.05), clicks on frame 1: tracked forward to 3, then back to 0."""
    from sam2_layerwise.model import build_model
    from sam2_layerwise.model.video import video_overrides
    from sam2_layerwise.quant import parse_config
    from sam2_layerwise.quant.apply import plan, quantize_model
    from sam2_layerwise.quant.checkpoint import save_quantized_checkpoint
    from tests.conftest import REPO

    root = tmp_path_factory.mktemp("verrors")
    qcfg = root / "w8a8_memory.yaml"
    qcfg.write_text(yaml.safe_dump(W8A8_MEMORY))
    parsed = parse_config(W8A8_MEMORY, str(qcfg))
    model = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu", overrides=video_overrides()).model
    sites, _ = plan(model, parsed)
    params = {qid: {"scale": 0.05, "zero_point": 0.0} for qid, s in sites.items() if s.params_from_data}
    assert any(qid.startswith("memory_attention") for qid in params)
    qckpt = save_quantized_checkpoint(quantize_model(model, parsed, params), root / "w8a8_memory.pt")
    passthrough = REPO / "examples" / "quantization" / "passthrough.yaml"
    return {"passthrough": _video_compare(root, "passthrough", passthrough, tiny_checkpoint, tiny_checkpoint,
                                          frames_dir),
            "w8a8": _video_compare(root, "w8a8", qcfg, qckpt, tiny_checkpoint, frames_dir)}


def _memory_errors(run) -> tuple[dict, list[dict], dict]:
    s = json.loads((run / "quantized" / "layerwise_summary.json").read_text())
    mem = [e for e in s["attention"] if e["kind"].startswith("memory")]
    assert set(s["compare"]["errors"]) == {e["file_stem"] for e in s["attention"]}  # every call, every kind
    return s["compare"]["errors"], mem, s["frames"]


@pytest.mark.parametrize("which", ["passthrough", "w8a8"])
def test_memory_attention_errors_on_every_tracked_frame(error_runs, which):
    errors, mem, frames = _memory_errors(error_runs[which])
    with_memory = {f["index"] for f in frames["list"] if f["memory"]}
    assert with_memory == {0, 2, 3}  # every tracked frame but the prompted one, both directions
    layers = {e["layer_key"] for e in mem}
    assert len(layers) == 4  # self_attn and cross_attn_image of both memory-attention layers
    assert {(e["layer_key"], e["frame"]) for e in mem} == {(k, f) for k in layers for f in with_memory}
    for e in mem:
        found = errors[e["file_stem"]]
        for name in ERROR_NAMES:
            values = found[name]
            assert len(values) == e["heads"] and all(math.isfinite(v) for v in values), (e["file_stem"], name)
            if which == "passthrough":
                assert values == [0.0] * e["heads"], (e["file_stem"], name)
            else:
                assert all(v > 0 for v in values), (e["file_stem"], name)


def test_generate_reports_memory_errors(error_runs):
    run = error_runs["w8a8"]
    assert main(["generate", "--run_dir", str(run), "-q"]) == 0
    errors, mem, _ = _memory_errors(run)
    with open(run / "analysis" / "metrics_heads.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"].startswith("memory")]
    assert len(rows) == sum(e["heads"] for e in mem)
    stems = {(e["layer_key"], e["call_index"]): e["file_stem"] for e in mem}
    for r in rows:
        want = errors[stems[r["layer_key"], int(r["call_index"])]]
        for name in ERROR_NAMES:
            assert float(r[name]) == pytest.approx(want[name][int(r["head"])], rel=1e-6)

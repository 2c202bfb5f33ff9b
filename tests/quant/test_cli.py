"""`quantize`, `visualize --adaptive-qat-config` and `visualize-quantized`, run in-process."""

from __future__ import annotations

import json

import pytest
import yaml

from sam2_layerwise.cli.main import main
from tests.conftest import CHELSEA, COFFEE, TINY_CONFIG
from tests.quant.helpers import EXAMPLES

POINTS = ["220", "150", "1"]
W8A8 = str(EXAMPLES / "w8a8.yaml")
PASS = str(EXAMPLES / "passthrough.yaml")


@pytest.fixture(scope="module")
def w8_ckpt(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("cli") / "w8a8.pt"
    calib = tmp_path_factory.mktemp("calib")
    for src in (CHELSEA, COFFEE):
        (calib / src.name).write_bytes(src.read_bytes())
    (calib / "notes.txt").write_text("not an image")  # skipped: directories expand to their images
    assert main(["quantize", "--checkpoint", str(tiny_checkpoint), "--config", TINY_CONFIG,
                 "--adaptive-qat-config", W8A8, "--calib-images", str(calib), "--output", str(out), "-q"]) == 0
    return out


def _visualize(out, ckpt, *extra, command="visualize"):
    return main([command, "--config", TINY_CONFIG, "--checkpoint", str(ckpt), "--image", str(CHELSEA), "--points",
                 *POINTS, "--output-dir", str(out), "--max-attn-queries", "2", "-q", *extra])


def test_visualize_quantized_writes_per_module_quantization(tmp_path, w8_ckpt):
    out = tmp_path / "q"
    assert _visualize(out, w8_ckpt, "--adaptive-qat-config", W8A8, "--save-attn") == 0
    s = json.loads((out / "layerwise_summary.json").read_text())
    assert s["fidelity"]["ok"]
    q = s["quantization"]
    assert q["config"] == W8A8 and q["bits_histogram"] == {"8": q["quantized_sites"]}
    by_id = {e["id"]: e for e in q["quantizers"]}
    e = by_id["image_encoder.trunk.blocks.2.attn.qkv:input"]
    assert e["bits"] == 8 and e["scale"]["count"] == 1 and 0 <= e["error"]["clip_rate"] <= 1
    assert e["error"]["elements"] > 0 and 0 < e["error"]["rel_rmse"] < 0.1 and e["error"]["on"] == "this input"
    for rec in s["attention"]:
        kernel = rec["quant"]["kernel"]
        assert {"q", "k", "v"} <= set(kernel) and kernel["q"]["bits"] == 8, rec["name"]
        assert kernel["k"]["error"]["elements"] > 0
        assert rec["quant"]["layers"], rec["name"]  # the projections inside the module
    assert (out / "attn_tensors").is_dir() and (out / "predictions.pt").is_file()


def test_alias_requires_the_flag_and_matches_float_with_passthrough(tmp_path, tiny_checkpoint, capsys):
    assert _visualize(tmp_path / "x", tiny_checkpoint, command="visualize-quantized") == 2
    assert "--adaptive-qat-config" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert _visualize(tmp_path / "float", tiny_checkpoint) == 0
    assert _visualize(tmp_path / "pass", tiny_checkpoint, "--adaptive-qat-config", PASS,
                      command="visualize-quantized") == 0
    f = json.loads((tmp_path / "float" / "layerwise_summary.json").read_text())
    p = json.loads((tmp_path / "pass" / "layerwise_summary.json").read_text())
    assert p["quantization"]["quantized_sites"] == 0
    assert [a["head_stats"] for a in f["attention"]] == [a["head_stats"] for a in p["attention"]]
    assert f["prediction"]["iou_predictions"] == p["prediction"]["iou_predictions"]


def test_base_config_is_used_without_config(tmp_path, w8_ckpt):
    raw = yaml.safe_load(open(W8A8))
    raw["base_config"] = "tiny.yaml"  # relative to the quantization config's folder
    (tmp_path / "tiny.yaml").write_text(open(TINY_CONFIG).read())
    qcfg = tmp_path / "q.yaml"
    qcfg.write_text(yaml.safe_dump(raw))
    code = main(["visualize-quantized", "--checkpoint", str(w8_ckpt), "--adaptive-qat-config", str(qcfg),
                 "--image", str(CHELSEA), "--points", *POINTS, "--output-dir", str(tmp_path / "o"), "-q"])
    assert code == 0 and (tmp_path / "o" / "layerwise_summary.json").is_file()


def _fails(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, tiny_checkpoint, w8_ckpt, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  weight: {bits: 99}\n")
    out = tmp_path / "never"
    _fails(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
            "--points", *POINTS, "--output-dir", str(out), "--adaptive-qat-config", str(bad)], capsys,
           f"--adaptive-qat-config {bad}: defaults.weight.bits: 99 is out of range")
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text(yaml.safe_dump({"rules": [{"match": "no_such_module*", "float": True}]}))
    _fails(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
            "--points", *POINTS, "--output-dir", str(out), "--adaptive-qat-config", str(nothing)], capsys,
           "rules[0].match 'no_such_module*' matches no module")
    # a float checkpoint where W8A8 needs calibrated activation scales
    _fails(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
            "--points", *POINTS, "--output-dir", str(out), "--adaptive-qat-config", W8A8], capsys,
           f"--checkpoint {tiny_checkpoint}: does not fit", "learned parameters missing")
    # the W8A8 checkpoint with the mixed config: left-over/inconsistent quantizers
    _fails(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(w8_ckpt), "--image", str(CHELSEA),
            "--points", *POINTS, "--output-dir", str(out), "--adaptive-qat-config", str(EXAMPLES / "w4a8_mixed.yaml")],
           capsys, "--checkpoint", "inconsistent")
    assert not out.exists() and not list(tmp_path.glob(".never*"))

    q_out = tmp_path / "q.pt"
    _fails(["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--adaptive-qat-config", W8A8,
            "--calib-images", str(tmp_path / "missing_dir"), "--output", str(q_out)], capsys,
           "--calib-images", "no such file or directory")
    _fails(["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--adaptive-qat-config", W8A8,
            "--calib-images", str(CHELSEA), "--output", str(tmp_path)], capsys, "--output", "is a directory")
    video = tmp_path / "video.yaml"
    video.write_text(yaml.safe_dump({"defaults": {"activation": {"bits": 8}}}))  # memory attention never runs
    _fails(["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--adaptive-qat-config",
            str(video), "--calib-images", str(CHELSEA), "--output", str(q_out)], capsys,
           "video-only modules", "memory_attention", "float: true")
    assert not q_out.exists()

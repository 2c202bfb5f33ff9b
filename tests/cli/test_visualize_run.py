"""A whole `visualize` run on the tiny model: layout, summary, saved tensors, layer ranges."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam2_layerwise import load_image, parse_prompts, run_plain
from sam2_layerwise.cli.main import main
from tests.conftest import CHELSEA, TINY_CONFIG

POINTS = ["220", "150", "1", "60", "40", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("runs") / "debug"
    code = main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
                 "--points", *POINTS, "--output-dir", str(out), "--save-attn", "--save-qkv",
                 "--max-attn-queries", "2", "--max-tokens", "16", "-q"])
    assert code == 0
    return out


def test_layout_and_summary(run_dir, tiny_model):
    s = json.loads((run_dir / "layerwise_summary.json").read_text())
    assert s["schema"] == "sam2-layerwise/summary" and s["schema_version"] == 1
    assert s["fidelity"]["ok"] and s["fidelity"]["max_module_abs_err"] <= 1e-4
    assert s["model"]["random_init"] is False
    ran = sum(1 for n, m in tiny_model.named_modules()
              if type(m).__name__ in ("MultiScaleAttention", "Attention") and not n.startswith("memory"))
    assert s["attention_count"] == len(s["attention"]) == ran
    for rec in s["attention"]:
        for key in ("attn", "attn_all", "qkv", "qkv_all"):
            assert (run_dir / rec["files"][key]).is_file(), rec["files"]
        assert rec["files"]["attn"].startswith(f"attn_tensors/by_layer/{rec['layer_key']}/")
        assert len(rec["queries"]) <= 2
    for rel in s["files"]["prediction_images"]:
        assert (run_dir / rel).is_file()
    assert {b["module_type"] for b in s["blocks"]} >= {"MultiScaleBlock", "TwoWayAttentionBlock", "FpnNeck", "MaskDecoder"}
    assert not list(run_dir.parent.glob(".debug.partial-*"))


def test_predictions_match_plain_sam2(run_dir, tiny_model):
    image = load_image(CHELSEA)
    plain = run_plain(tiny_model, image, parse_prompts(POINTS, None, None, image.shape[1], image.shape[0]))
    saved = torch.load(run_dir / "predictions.pt", weights_only=True)
    assert np.array_equal(saved["masks"].numpy(), plain.masks)
    assert np.array_equal(saved["low_res_logits"].numpy(), plain.low_res_logits)


def test_max_tokens_pools_keys_into_distributions(run_dir):
    """Saved maps with more than 16 keys are sums over f x f key cells of the exact rows (recomputed here from
    the saved q/k), so they still sum to 1; the summary says how."""
    s = json.loads((run_dir / "layerwise_summary.json").read_text())
    pooled_seen = 0
    for rec in s["attention"]:
        attn = torch.load(run_dir / rec["files"]["attn"], weights_only=True)
        qkv = torch.load(run_dir / rec["files"]["qkv"], weights_only=True)
        probs = attn["probs"]
        assert probs.shape[-1] <= 16 or rec["geometry"]["keys"] == "tokens"
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
        pool = rec["key_pooling"]
        if pool is None:
            continue
        pooled_seen += 1
        f = pool["factor"]
        bh, bw = pool["from_hw"]
        for n, spec in enumerate(rec["queries"]):
            g = qkv["groups"].index(spec["group"])
            q, k = qkv["q"][g, :, spec["index"]], qkv["k"][g]
            exact = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) * qkv["scale"], -1).reshape(-1, bh, bw)
            ph, pw = -(-bh // f), -(-bw // f)
            expected = torch.zeros(exact.shape[0], ph, pw)
            for i in range(bh):
                for j in range(bw):
                    expected[:, i // f, j // f] += exact[:, i, j]
            torch.testing.assert_close(probs[n], expected.reshape(exact.shape[0], -1), atol=1e-6, rtol=1e-5)
    assert pooled_seen >= 3


def test_layer_range_selects_exactly_those_layers(tmp_path, tiny_checkpoint):
    out = tmp_path / "ranged"
    code = main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
                 "--points", "220", "150", "1", "--output-dir", str(out), "-q",
                 "--layers", "image_encoder_trunk_blocks_1:3,*final_attn*"])
    assert code == 0
    s = json.loads((out / "layerwise_summary.json").read_text())
    assert [r["layer_key"] for r in s["attention"]] == [
        "image_encoder_trunk_blocks_1", "image_encoder_trunk_blocks_2", "image_encoder_trunk_blocks_3",
        "sam_mask_decoder_transformer_final_attn_token_to_image"]


def test_rerun_replaces_previous_outputs(tmp_path, tiny_checkpoint):
    out = tmp_path / "again"
    base = ["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
            "--points", "220", "150", "1", "--output-dir", str(out), "-q"]
    assert main(base + ["--save-attn"]) == 0
    assert (out / "attn_tensors").is_dir()
    (out / "my_notes.txt").write_text("mine")
    assert main(base) == 0
    assert not (out / "attn_tensors").exists()  # stale tensors of the first run are gone
    assert (out / "my_notes.txt").read_text() == "mine"  # files the tool does not own are left alone


def test_a_failed_move_leaves_the_previous_run_whole(tmp_path, monkeypatch):
    """If writing fails after staging, the old run (summary included) is still there, and no staging is left."""
    from sam2_layerwise.store import layout

    out = tmp_path / "run"
    with layout.RunWriter(out) as w:
        w.path(layout.SUMMARY).write_text('{"schema": "sam2-layerwise/summary", "old": true}')
        w.path(f"{layout.PREDICTION_IMAGES}/a.png").write_bytes(b"x")
    try:
        with layout.RunWriter(out) as w:
            w.path(layout.SUMMARY).write_text('{"new": true}')
            raise RuntimeError("render failed")
    except RuntimeError:
        pass
    assert (out / layout.SUMMARY).read_text() == '{"schema": "sam2-layerwise/summary", "old": true}'
    assert (out / layout.PREDICTION_IMAGES / "a.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(ValueError, match="does not own"):
        with layout.RunWriter(out, owned=(layout.SUMMARY,)) as w:
            w.path(f"{layout.ATTN_TENSORS}/x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

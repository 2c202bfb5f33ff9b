"""What `generate` and `visualize --viewer` precompute for the page: files, data, and maps that are the renderer's
own (same key grid, window, padding, pooling), values exactly the captured probabilities."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from sam2_layerwise.cli.main import main
from sam2_layerwise.geometry import HieraLayerGeometry, ImageFrame
from sam2_layerwise.store.atomic import safe_load
from sam2_layerwise.viewer.export import js_file
from tests.viewer.conftest import read_data, summary_entry


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def layer_data(page, key):
    index = read_data(page / "viewer_data" / "index.js")
    layer = next(l for l in index["layers"] if l["key"] == key)
    return layer, read_data(page / layer["file"])


def test_generate_writes_the_page_and_its_data(viewer_runs):
    run = viewer_runs["full"]
    page = run / "analysis"
    for name in ("index.html", "viewer_data/viewer.js", "viewer_data/viewer.css", "viewer_data/index.js",
                 "viewer_data/photo.jpg"):
        assert (page / name).is_file(), name
    html = (page / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from the network
    index = read_data(page / "viewer_data" / "index.js")
    summary = json.loads((run / "original" / "layerwise_summary.json").read_text())
    assert index["kind"] == "compare" and index["mode"] == "full"
    assert [(l["key"], l["call"]) for l in index["layers"]] == \
        [(e["layer_key"], e["call_index"]) for e in summary["attention"]]
    for l in index["layers"]:  # every call has its own lazily loaded file
        assert l["file"] == f"viewer_data/layers/{l['id']}.js" and (page / l["file"]).is_file()
        assert l["click"]["mode"] == ("tokens" if l["kind"] in ("decoder_self", "decoder_token_to_image") else "any")
    assert [s["id"] for s in index["sides"]] == ["fp", "q"]
    for side in index["sides"]:
        assert len(side["masks"]) == 3 and all((page / m["src"]).is_file() for m in side["masks"])
    assert index["photo"]["width"] == 600 and index["photo"]["height"] == 400 and index["photo"]["note"] is None
    assert index["impact"]["chosen"]["fp"] in (0, 1, 2) and len(index["ranking"]) == 20
    # the heatmap is metrics_heads.csv, per layer and head
    heads = pd.read_csv(page / "metrics_heads.csv")
    hm = index["heatmap"]
    assert [c["key"] for c in hm["columns"]][:3] == ["js_mean", "js_p95", "js_max"]
    ids = {l["id"]: (l["key"], l["call"]) for l in index["layers"]}
    for li, ident in enumerate(hm["layers"]):
        key, call = ids[ident]
        rows = heads[(heads.layer_key == key) & (heads.call_index == call)]
        assert hm["present"][li] == sorted(rows["head"])
        for _, r in rows.iterrows():
            assert hm["values"]["js_mean"][li][int(r["head"])] == pytest.approx(r["js_mean"], rel=1e-12, abs=0)


def test_maps_are_the_captured_rows_on_their_key_grid(viewer_runs):
    """Every precomputed map holds exactly the saved probabilities of its query, per head and as the head mean,
    over the key block the query attends (window, padding included), on the padded key grid."""
    run = viewer_runs["full"]
    page = run / "analysis"
    for key in ("image_encoder_trunk_blocks_0", "image_encoder_trunk_blocks_1", "image_encoder_trunk_blocks_4",
                "image_encoder_trunk_blocks_5"):
        layer, data = layer_data(page, key)
        entry = summary_entry(run, key)
        hg = HieraLayerGeometry.from_dict(entry["geometry"])
        assert [m["label"] for m in data["maps"]] == [q["label"] for q in entry["queries"]]
        for j, (m, q) in enumerate(zip(data["maps"], entry["queries"])):
            assert m["display"] == "grid" and m["kind"] == "query"
            assert m["grid_hw"] == list(hg.padded_hw) and m["real_hw"] == [hg.in_h, hg.in_w]
            assert m["block"] == q["key_block"] == list(hg.key_rows_cols(q["group"]))
            assert m["token"]["cell"] == q["cell"] and m["token"]["grid_hw"] == list(hg.out_hw)
            assert m["query_box"] == q["pixel_box"]
            if hg.q_stride > 1:
                assert m["query_cells"] == q["source_cells"] == list(hg.query_source_cells(q["group"], q["index"]))
            for half, side in (("original", "fp"), ("quantized", "q")):
                probs = safe_load(run / half / summary_entry(run, key, half)["files"]["attn"])["probs"][j]
                assert np.array_equal(decode(m["heads"][0][side]), probs.mean(0).numpy())
                for h in range(entry["heads"]):
                    assert m["heads"][h + 1]["head"] == h
                    assert np.array_equal(decode(m["heads"][h + 1][side]), probs[h].numpy())
    layer, data = layer_data(page, "image_encoder_trunk_blocks_5")
    assert data["geometry"]["padded_key_grid_hw"] == [12, 12] and data["maps"][0]["real_hw"] == [10, 10]


def test_decoder_maps_by_role(viewer_runs):
    run = viewer_runs["full"]
    page = run / "analysis"
    _, data = layer_data(page, "sam_mask_decoder_transformer_layers_0_cross_attn_token_to_image")
    roles = summary_entry(run, "sam_mask_decoder_transformer_layers_0_cross_attn_token_to_image")["geometry"]["query_roles"]
    labels = [m["label"] for m in data["maps"]]
    assert labels[0] == "point0" and set(labels) <= set(roles)
    point = data["maps"][0]
    assert point["kind"] == "token" and point["display"] == "grid" and point["marks"] == [[300.0, 200.0]]
    assert point["block"] == [0, 10, 0, 10] and point["token"] is None
    _, data = layer_data(page, "sam_mask_decoder_transformer_layers_0_cross_attn_image_to_token")
    kinds = {m["kind"] for m in data["maps"]}
    assert kinds == {"query", "to_token"}  # image queries over token keys; image tokens attending to each token
    to = next(m for m in data["maps"] if m["kind"] == "to_token")
    assert to["display"] == "grid" and to["grid_hw"] == [10, 10] and to["label"].startswith("to_")
    q = next(m for m in data["maps"] if m["kind"] == "query")
    assert q["display"] == "tokens" and len(q["roles"]) == len(decode(q["heads"][0]["fp"]))
    _, data = layer_data(page, "sam_mask_decoder_transformer_layers_0_self_attn")
    assert all(m["display"] == "tokens" and m["kind"] == "token" for m in data["maps"])


def test_light_mode_page(viewer_runs):
    page = viewer_runs["light"] / "analysis"
    index = read_data(page / "viewer_data" / "index.js")
    modes = {l["key"]: l["click"] for l in index["layers"]}
    run = viewer_runs["light"]
    entry = summary_entry(run, "image_encoder_trunk_blocks_0")
    hg = HieraLayerGeometry.from_dict(entry["geometry"])
    groups = safe_load(run / "original" / entry["files"]["qkv"])["groups"]
    frame = ImageFrame(600, 400, 128)
    saved = modes["image_encoder_trunk_blocks_0"]
    assert saved["mode"] == "saved" and saved["blocks"] == [list(hg.key_rows_cols(g)) for g in groups]
    for (r0, r1, c0, c1), box in zip(saved["blocks"], saved["boxes"]):  # where clicks are answered, in pixels
        assert box == [*frame.token_box(r0, c0, 32, 32)[:2], *frame.token_box(r1 - 1, c1 - 1, 32, 32)[2:]]
    assert modes["image_encoder_trunk_blocks_4"]["mode"] == "none"  # light mode keeps no whole-grid q/k
    assert index["scope"] == "selected queries"


def test_single_run_viewer(viewer_runs):
    """visualize --viewer: one side, the capture's head statistics as the heatmap, key-pooled maps (--max-tokens)
    spread back over their tokens so each map is still a probability per key token."""
    run = viewer_runs["single"]
    summary = json.loads((run / "layerwise_summary.json").read_text())
    assert summary["files"]["viewer"] == "viewer/index.html"
    page = run / "viewer"
    index = read_data(page / "viewer_data" / "index.js")
    assert index["kind"] == "single" and [s["id"] for s in index["sides"]] == ["fp"] and index["ranking"] is None
    assert [c["key"] for c in index["heatmap"]["columns"]] == ["entropy_norm", "max_prob", "topk_mass", "entropy"]
    e0 = summary["attention"][0]
    li = index["heatmap"]["layers"].index(index["layers"][0]["id"])
    row = index["heatmap"]["values"]["entropy_norm"][li]
    assert row[:e0["heads"]] == pytest.approx(e0["head_stats"]["entropy_norm"]["mean"])
    assert all(v is None for v in row[e0["heads"]:])  # heads this layer does not have
    layer, data = layer_data(page, "image_encoder_trunk_blocks_0")
    assert e0["key_pooling"]["factor"] == 2  # 64 keys pooled to 16 on disk; the page still shows 8 x 8 tokens
    m = data["maps"][0]
    assert m["block"] == e0["queries"][0]["key_block"]
    values = decode(m["heads"][0]["fp"])
    assert values.shape == (64,) and values.sum() == pytest.approx(1.0, abs=1e-5)
    assert layer["click"]["mode"] == "saved"


def test_visualize_without_viewer_removes_an_old_one(viewer_runs, tmp_path, tiny_checkpoint):
    from tests.conftest import COFFEE, TINY_CONFIG

    run = tmp_path / "run"
    shutil.copytree(viewer_runs["single"], run)
    assert (run / "viewer" / "index.html").is_file()
    assert main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(COFFEE),
                 "--points", "300", "200", "1", "--output-dir", str(run), "--layers", "image_encoder_trunk_blocks_0",
                 "-q"]) == 0
    assert not (run / "viewer").exists()  # a stale page of another capture would mislead


def test_missing_photograph_is_grey_with_a_note(viewer_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(viewer_runs["light"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["image"]["path"] = str(tmp_path / "moved.png")
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["generate", "--run_dir", str(run), "--output", "other", "--layers", "image_encoder_trunk_blocks_0:2",
                 "-q"]) == 0
    index = read_data(run / "other" / "viewer_data" / "index.js")
    assert "photograph not found" in index["photo"]["note"]
    assert len(index["heatmap"]["layers"]) == 3 and len(index["layers"]) == 13  # maps of every call, metrics of 3


def test_data_files_stay_inert():
    text = js_file("layer", "L000", {"label": "</script><script>alert(1)</script>", "v": float("nan")}).decode()
    assert "</script>" not in text and text.startswith('SAM2LW.register("layer","L000",')
    assert '"v":null' in text

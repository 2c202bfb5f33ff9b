"""sweep on the local engine: items from a folder and from manifests, the Parquet tables and their documented
columns, the aggregation, failures recorded while the sweep goes on, resume, and generate's metrics reused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from sam2_layerwise.cli.main import main
from sam2_layerwise.sweep.store import columns
from tests.conftest import REPO
from tests.sweep.conftest import run_api, sweep_cmd

DOC = (REPO / "docs" / "sweep.md").read_text()


def documented(table: str) -> list[str]:
    """The column list docs/sweep.md gives for `table` (the line after '<!-- columns:table -->')."""
    line = DOC.split(f"<!-- columns:{table} -->", 1)[1].strip().splitlines()[0]
    return [c.strip(" `") for c in line.split(",")]


@pytest.fixture(scope="module")
def folder_sweep(tmp_path_factory, photos, tiny_checkpoint, quant_checkpoints):
    """W8A8 over the six photos plus a file that is no image: (exit status, sweep directory)."""
    d = tmp_path_factory.mktemp("folder")
    inputs = d / "photos"
    shutil.copytree(photos, inputs)
    (inputs / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    out = d / "out"
    return main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", inputs, out, *ATTRIBUTE)), out


ATTRIBUTE = ("--attribute", "--attribute-layers",
             "image_encoder_trunk_blocks_2:3,sam_mask_decoder_transformer_layers_0_self_attn")


def test_folder_sweep_tables_failures_and_aggregation(folder_sweep):
    code, out = folder_sweep
    assert code == 3  # one item failed: non-zero at the end, after every other item ran
    items = pd.read_parquet(out / "items.parquet")
    heads = pd.read_parquet(out / "heads.parquet")
    assert list(items.columns) == list(columns()["items"]) == documented("items")
    assert list(heads.columns) == list(columns()["heads"]) == documented("heads")
    assert len(items) == 7 and (items["status"] == "ok").sum() == 6
    bad = items[items["status"] == "failed"].iloc[0]
    assert bad["image"].endswith("z_broken.png") and "--inputs" in bad["error"] and "Pillow" in bad["error"]
    ok = items[items["status"] == "ok"]
    assert ok["iou"].between(0, 1).all() and np.allclose(ok["iou_loss"], 1 - ok["iou"])
    assert (ok["prompt"] == "center").all() and ok["image_sha256"].str.len().eq(64).all()
    assert (ok["seconds_total"] > 0).all() and ok["gt_iou_fp"].isna().all()
    # heads: every item measured every captured attention layer and head, generate's light-mode scope
    per_item = heads.groupby("item").size()
    assert set(per_item.index) == set(ok["item"]) and per_item.nunique() == 1
    assert (heads["scope"] == "selected queries").all() and (heads["js_mean"] >= 0).all()
    assert (heads["q_rel_err"] > 0).all()  # W8A8 quantizes q everywhere
    # aggregation over the six good items
    agg = out / "sweep"
    hs = pd.read_csv(agg / "heads.csv")
    assert list(hs.columns) == documented("sweep/heads")
    assert (hs["n_items"] == 6).all()
    first = hs.iloc[0]
    sel = heads[(heads.layer_key == first.layer_key) & (heads["head"] == first["head"])]
    assert first["js_mean_mean"] == pytest.approx(sel["js_mean"].mean(), rel=1e-6)
    assert first["js_mean_p95"] == pytest.approx(np.percentile(sel["js_mean"], 95), rel=1e-6)
    layers = pd.read_parquet(agg / "layers.parquet")
    assert list(layers.columns) == documented("sweep/layers")
    assert layers["spearman_js_iou_loss"].dropna().between(-1, 1).all() and (layers["spearman_n"] == 6).all()
    ranking = json.loads((agg / "ranking.json").read_text())
    assert ranking[0]["js_mean_mean"] == pytest.approx(hs["js_mean_mean"].max())
    summary = json.loads((agg / "summary.json").read_text())
    assert summary["items"] == {**summary["items"], "total": 7, "ok": 6, "failed": 1}
    page = (agg / "index.html").read_text()
    assert "application/json" in page and "js_mean_mean" in page
    assert (agg / "plots" / "heatmap_js_mean_mean.png").stat().st_size > 1000
    m = json.loads((out / "sweep.json").read_text())
    assert m["schema"] == "sam2-layerwise/sweep" and m["counts"] == {"items": 7, "ok": 6, "failed": 1}
    # attribution of the chosen units, per item and aggregated
    a = pd.read_parquet(out / "attribution.parquet")
    assert list(a.columns) == list(columns()["attribution"]) == documented("attribution")
    assert list(dict.fromkeys(a["unit"])) == ["image_encoder_trunk_blocks_2", "image_encoder_trunk_blocks_3",
                                              "sam_mask_decoder_transformer_layers_0_self_attn"]
    assert a.groupby("item").size().eq(3).all() and set(a["item"]) == set(ok["item"])
    assert np.allclose(a["delta_iou"], a["iou"] - a["baseline_iou"]) and (a["sites"] > 0).all()
    merged = a.merge(items[["item", "iou"]], on="item", suffixes=("", "_item"))
    assert (merged["baseline_iou"] == merged["iou_item"]).all()  # restore mode: the baseline is the Q model
    at = pd.read_csv(agg / "attribution.csv")
    assert list(at.columns) == documented("sweep/attribution")
    assert at.loc[0, "delta_iou_mean"] == pytest.approx(a[a.unit == at.loc[0, "unit"]]["delta_iou"].mean())
    assert layers.set_index("layer_key").loc["image_encoder_trunk_blocks_2", "attribution_delta_iou_mean"] == \
        pytest.approx(a[a.unit == "image_encoder_trunk_blocks_2"]["delta_iou"].mean())
    assert (agg / "plots" / "attribution.png").stat().st_size > 1000


def test_resume_skips_finished_items_and_refuses_other_models(folder_sweep, tmp_path, tiny_checkpoint,
                                                              quant_checkpoints):
    _, done = folder_sweep
    out = tmp_path / "resumed"
    shutil.copytree(done, out)
    inputs = json.loads((out / "sweep.json").read_text())["inputs"]["spec"]
    before = pd.read_parquet(out / "items.parquet")
    argv = sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", inputs, out, *ATTRIBUTE)
    report = run_api(argv)
    assert report["skipped"] == 6 and report["ran"] == 1  # only the failed item is tried again
    after = pd.read_parquet(out / "items.parquet")
    timing = [c for c in after.columns if c.startswith("seconds")]
    pd.testing.assert_frame_equal(before.drop(columns=timing), after.drop(columns=timing))
    # a lost shard (a sweep killed before it wrote it) is computed again, and only that one
    key = after.loc[after["status"] == "ok", "key"].iloc[2]
    shutil.rmtree(out / "parts" / key)
    heads_before = pd.read_parquet(out / "heads.parquet")
    report = run_api(argv)
    assert report["ran"] == 2 and report["skipped"] == 5
    pd.testing.assert_frame_equal(heads_before, pd.read_parquet(out / "heads.parquet"))
    # other models or options: refused before anything is loaded or written, naming what differs
    stamp = (out / "sweep.json").stat().st_mtime_ns
    assert main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w4a8_mixed", inputs, out, *ATTRIBUTE)) == 2
    assert main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", inputs, out, "--max-attn-queries", 2,
                          *ATTRIBUTE)) == 2
    assert main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", inputs, out)) == 2  # without --attribute
    assert (out / "sweep.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["garbage heads", "width as text", "impossible js", "another item's key",
                                    "ok without iou", "unknown status", "a row less", "heads through a link",
                                    "no digests"])
def test_resume_computes_damaged_shards_again(folder_sweep, tmp_path, damage, tiny_checkpoint, quant_checkpoints):
    """A shard that does not read back as this tool wrote it (unreadable, wrong column types, values no
    measurement takes, another item's result) is not a finished item: the resume computes it again, and the
    tables come out as they were."""
    _, done = folder_sweep
    out = tmp_path / "resumed"
    shutil.copytree(done, out)
    inputs = json.loads((out / "sweep.json").read_text())["inputs"]["spec"]
    before = pd.read_parquet(out / "items.parquet")
    heads_before = pd.read_parquet(out / "heads.parquet")
    ok_keys = list(before.loc[before["status"] == "ok", "key"])
    part = out / "parts" / ok_keys[1]
    item, heads = pd.read_parquet(part / "item.parquet"), pd.read_parquet(part / "heads.parquet")
    if damage == "garbage heads":
        (part / "heads.parquet").write_bytes(b"garbage\n")
    elif damage == "width as text":
        item["width"] = item["width"].astype(str) + " px"
        item.to_parquet(part / "item.parquet")
    elif damage == "impossible js":
        heads.loc[0, "js_mean"] = -5.0
        heads.to_parquet(part / "heads.parquet")
    elif damage == "another item's key":
        shutil.rmtree(part)
        shutil.copytree(out / "parts" / ok_keys[0], part)
    elif damage == "ok without iou":
        item["iou"] = float("nan")
        item.to_parquet(part / "item.parquet")
    elif damage == "a row less":  # valid Parquet, of the right columns and values: only the bytes tell
        heads.iloc[:-1].to_parquet(part / "heads.parquet")
    elif damage == "heads through a link":
        (out / "elsewhere.parquet").write_bytes((part / "heads.parquet").read_bytes())
        (part / "heads.parquet").unlink()
        (part / "heads.parquet").symlink_to(out / "elsewhere.parquet")
    elif damage == "no digests":
        (part / "sha256.json").unlink()
    else:
        item["status"] = "maybe"
        item.to_parquet(part / "item.parquet")
    report = run_api(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", inputs, out, *ATTRIBUTE))
    assert report["ran"] == 2 and report["skipped"] == 5  # the damaged item and the item that failed before
    after = pd.read_parquet(out / "items.parquet")
    timing = [c for c in after.columns if c.startswith("seconds")]
    pd.testing.assert_frame_equal(before.drop(columns=timing), after.drop(columns=timing))
    pd.testing.assert_frame_equal(heads_before, pd.read_parquet(out / "heads.parquet"))


def test_resume_refusal_names_the_difference(folder_sweep, tmp_path, capsys, tiny_checkpoint, quant_checkpoints):
    _, done = folder_sweep
    inputs = json.loads((done / "sweep.json").read_text())["inputs"]["spec"]
    assert main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w4a8_mixed", inputs, done, "--stats-topk", 3,
                          *ATTRIBUTE)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--output-dir" in err
    assert "checkpoint_sha256" in err and "stats_topk (3 now, 5 there)" in err


def test_manifests_prompts_masks_and_generate_reuse(tmp_path, photos, tiny_checkpoint, quant_checkpoints):
    """CSV and JSONL manifests (relative paths, points, a box, a ground-truth mask) plan the same items; the
    kept compare run of an item gives, through generate, exactly the heads rows the sweep measured in memory."""
    from sam2_layerwise.inputs import load_image, parse_prompts
    from sam2_layerwise.model import build_model
    from sam2_layerwise.model.predict import run_plain
    from tests.conftest import TINY_CONFIG

    d = tmp_path / "set"
    shutil.copytree(photos, d / "img")
    image = load_image(d / "img" / "b_cup_small.jpg")
    fp = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model
    pred = run_plain(fp, image, parse_prompts([120, 90, 1, 40, 30, 0], None, None, 300, 200))
    from PIL import Image

    Image.fromarray((pred.masks[pred.best] * 255).astype(np.uint8)).save(d / "img" / "gt.png")
    (d / "items.csv").write_text(
        "image,points,box,mask,note\n"
        "img/b_cup_small.jpg,120 90 1 40 30 0,,img/gt.png,ground truth = the float model's mask\n"
        "img/c_cat_crop.png,,20 30 200 220,,a box only\n"
        "img/e_cat_tall.png,,,,no prompt: --auto-prompts\n")
    (d / "items.jsonl").write_text(
        '{"image": "img/b_cup_small.jpg", "points": [120, 90, 1, 40, 30, 0], "mask": "img/gt.png"}\n'
        '{"image": "img/c_cat_crop.png", "box": "20 30 200 220"}\n\n'
        '{"image": "img/e_cat_tall.png"}\n')
    from sam2_layerwise.sweep.inputs import AutoPrompts, plan_items, read_inputs

    planned = {m: plan_items(read_inputs(str(d / m))[1], AutoPrompts.parse("center"), "m")
               for m in ("items.csv", "items.jsonl")}
    assert [(i.key, i.points, i.box, i.mask) for i in planned["items.csv"]] == \
        [(i.key, i.points, i.box, i.mask) for i in planned["items.jsonl"]]
    out = tmp_path / "out"
    assert main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w4a8_mixed", d / "items.csv", out,
                          "--layers", "image_encoder_trunk_blocks_4:5,sam*", "--keep-runs")) == 0
    items, heads = pd.read_parquet(out / "items.parquet"), pd.read_parquet(out / "heads.parquet")
    assert list(items["prompt"]) == ["manifest", "manifest", "center"]
    assert items.loc[0, "points"] == "120 90 1 40 30 0" and items.loc[1, "box"] == "20 30 200 220"
    assert items.loc[0, "gt_iou_fp"] == 1.0 and 0 <= items.loc[0, "gt_iou_q"] <= 1
    assert items.loc[1:, "gt_iou_fp"].isna().all()
    assert items.loc[2, "points"] == "80 120 1"  # the centre of the 160 x 240 photo
    assert items.loc[0, "source"] == "items.csv line 2"
    # --keep-runs: each item's compare run; generate on it reproduces the sweep's rows (one implementation)
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 3
    run = next(r for r in runs if r.name.startswith("b_cup_small"))
    assert main(["generate", "--run_dir", str(run), "-q"]) == 0
    gen = pd.read_csv(run / "analysis" / "metrics_heads.csv")
    mine = heads[heads["item"] == 0].reset_index(drop=True)
    for col in ("order", "head", "n_queries", "js_undefined"):
        assert list(gen[col]) == list(mine[col])
    for col in ("js_mean", "js_p95", "topk_overlap", "q_mass_on_fp_topk", "q_rel_err", "out_rel_err"):
        np.testing.assert_allclose(gen[col].to_numpy(float), mine[col].to_numpy(float), rtol=1e-12, atol=0)
    page = (out / "sweep" / "index.html").read_text()
    assert "runs/b_cup_small" in page


def test_auto_prompts_and_planning(tmp_path, photos):
    """grid:N and random:N: one item per click, in original pixels, the same clicks for the same image."""
    from sam2_layerwise.sweep.inputs import AutoPrompts, plan_items, read_inputs

    kind, rows = read_inputs(str(photos))
    assert kind == "directory" and [r.image.name for r in rows][:2] == ["a_cat.png", "b_cup_small.jpg"]
    items = plan_items(rows[4:5], AutoPrompts.parse("grid:2"), "m")  # e_cat_tall.png, 160 x 240
    assert [(i.prompt, i.points) for i in items] == [("grid 1/4", (40.0, 60.0, 1.0)), ("grid 2/4", (120.0, 60.0, 1.0)),
                                                     ("grid 3/4", (40.0, 180.0, 1.0)), ("grid 4/4", (120.0, 180.0, 1.0))]
    assert len({i.key for i in items}) == 4 and items[0].width == 160 and items[0].height == 240
    r1 = plan_items(rows[:2], AutoPrompts.parse("random:3", seed=7), "m")
    r2 = plan_items(rows[:2], AutoPrompts.parse("random:3", seed=7), "m")
    r3 = plan_items(rows[:2], AutoPrompts.parse("random:3", seed=8), "m")
    assert [i.points for i in r1] == [i.points for i in r2] != [i.points for i in r3]
    assert all(0 <= i.points[0] < i.width and 0 <= i.points[1] < i.height for i in r1)
    assert plan_items(rows[:1], AutoPrompts.parse("center"), "m")[0].points == (451 / 2, 150.0, 1.0)
    assert plan_items(rows[:1], AutoPrompts.parse("center"), "other models")[0].key != items[0].key


def test_click_outside_an_image_fails_that_item_only(tmp_path, photos, sweep):
    (tmp_path / "m.csv").write_text(f"image,points\n{photos / 'b_cup_small.jpg'},100 100 1\n"
                                    f"{photos / 'b_cup_small.jpg'},900 100 1\n")
    out = tmp_path / "out"
    assert sweep("w8a8", tmp_path / "m.csv", out) == 3
    items = pd.read_parquet(out / "items.parquet")
    assert list(items["status"]) == ["ok", "failed"]
    assert "(900, 100) is outside the 300x200 image" in items.loc[1, "error"]


BAD_MANIFESTS = {
    "no_image_column.csv": ("file,points\na.png,1 2 1\n", "line 1: no 'image' column"),
    "no_points_column.csv": ("image,pionts\na.png,1 2 1\n", "line 1: no 'points' column"),
    "odd_points.csv": ("image,points\na.png,1 2 1\nb.png,10 20 1 30 40\n", "line 3: points has 5 values"),
    "bad_label.csv": ("image,points\na.png,1 2 7\n", "line 2: point label 7"),
    "bad_number.csv": ("image,points\na.png,1 two 1\n", "line 2: points value 'two'"),
    "underscore_number.csv": ("image,points\na.png,1_0 2 1\n", "line 2: points value '1_0'"),
    "other_digits.jsonl": ('{"image": "a.png", "points": "\u0661 2 1"}\n', "line 1: points value '\u0661'"),
    "bad_box.csv": ("image,box\na.png,5 5 1 1\n", "line 2: box needs x0 < x1"),
    "too_many_fields.csv": ("image,points\na.png,1 2 1,extra\n", "line 2: 3 fields"),
    "bad_json.jsonl": ('{"image": "a.png", "points": [1, 2, 1]}\n{"image": \n', "line 2: not valid JSON"),
    "no_image_key.jsonl": ('{"points": [1, 2, 1]}\n', "line 1: no 'image' key"),
    "odd_points.jsonl": ('{"image": "a.png", "points": [1, 2, 1, 4]}\n', "line 1: points has 4 values"),
    "empty.csv": ("", "is empty"),
    "header_only.csv": ("image,points\n", "lists no item"),
    "list.txt": ("a.png\n", "is neither a directory nor a manifest"),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_malformed_manifest_exits_2_naming_the_line(name, tmp_path, sweep, capsys):
    text, expected = BAD_MANIFESTS[name]
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    assert sweep("w8a8", tmp_path / name, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--inputs {tmp_path / name}: " in err and expected in err, err
    assert not out.exists()


def test_other_bad_input_exits_2_before_work(tmp_path, photos, sweep, capsys, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [
        ((tmp_path / "empty",), "--inputs", "holds no image"),
        ((tmp_path / "nope",), "--inputs", "no such file"),
        ((photos, "--auto-prompts", "grid:0"), "--auto-prompts grid:0", "expects center, grid:N"),
        ((photos, "--attribute-mode", "isolate"), "--attribute-mode isolate", "only applies with --attribute"),
        ((photos, "--ray-address", "auto"), "--ray-address auto", "only applies with --engine ray"),
        ((photos, "--attribute", "--attribute-layers", "blocks_3:1"), "--attribute-layers", "runs backwards"),
        ((photos, "--attribute", "--attribute-layers", "nothing_like_this"), "--attribute-layers",
         "matches no layer"),
        ((photos, "--layers", "image_encoder_trunk_blocks_0:99"), "--layers", "goes past the last layer"),
    ]
    for extra, flag, reason in cases:
        assert sweep("w8a8", extra[0], out, *extra[1:]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and flag in err and reason in err, (extra, err)
        assert not out.exists()
    # --engine ray without Ray installed: how to install it
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert sweep("w8a8", photos, out, "--engine", "ray") == 2
    err = capsys.readouterr().err.strip()
    assert "--engine ray" in err and "pip install 'sam2-layerwise[ray]'" in err and not out.exists()

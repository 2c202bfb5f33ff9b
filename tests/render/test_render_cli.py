"""The rendering flags end to end (in-process CLI on the tiny model): overlay-only, top-k lists and links,
safe and bounded files, re-rendering a saved run without the model, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from sam2_layerwise.cli.main import main
from sam2_layerwise.render.maps import MapOptions, build_maps
from sam2_layerwise.render.saved import open_run, saved_views
from sam2_layerwise.store.atomic import safe_load
from tests.conftest import CHELSEA, TINY_CONFIG

K = 4
QUERY0 = (400.0, 50.0)


def _visualize(out: Path, checkpoint: Path, *extra) -> int:
    return main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(checkpoint), "--image", str(CHELSEA),
                 "--points", "220", "150", "1", "--query-points", *map(str, QUERY0), "--max-attn-queries", "2",
                 "--output-dir", str(out), "-q", *extra])


@pytest.fixture(scope="module")
def overlay_run(tmp_path_factory, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    code = _visualize(out, tiny_checkpoint, "--save-attn", "--save-qkv", "--render-attn-overlay", "--attn-overlay-only",
                      "--topk-attn", str(K), "--topk-symlink")
    assert code == 0
    return out


def _topk_lines(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_overlay_only_writes_overlays_and_no_attention_images(overlay_run):
    assert not (overlay_run / "attn_images").exists()
    overlays = list((overlay_run / "attn_overlays" / "all").glob("*.png"))
    assert len(overlays) >= 13  # every layer of the tiny model has at least one grid map
    by_layer = list((overlay_run / "attn_overlays" / "by_layer").iterdir())
    assert {p.name for p in overlays} == {q.name for d in by_layer for q in d.glob("*.png")}
    summary = json.loads((overlay_run / "layerwise_summary.json").read_text())
    assert "attn_overlays" in summary["files"] and "attn_images" not in summary["files"]
    assert summary["render"]["overlays"] and not summary["render"]["images"]
    for entry in summary["attention"]:  # each record lists its pictures, and they exist
        for rel in entry["files"].get("attn_overlays", []):
            assert (overlay_run / rel).is_file()


def test_topk_lines_point_to_files_in_score_order(overlay_run):
    lists = sorted((overlay_run / "attn_topk").glob("topk_*.txt"))
    names = {p.name for p in lists}
    assert "topk_all.txt" in names and "topk_hiera_windowed.txt" in names and "topk_hiera_global.txt" in names
    all_scores = []
    for path in lists:
        lines = _topk_lines(path)
        assert 0 < len(lines) <= K
        scores = [float(f[1]) for f in lines]
        assert scores == sorted(scores, reverse=True), path.name
        assert [int(f[0]) for f in lines] == list(range(1, len(lines) + 1))
        for f in lines:
            assert (overlay_run / f[7]).is_file(), f
            if path.name != "topk_all.txt":
                assert f[3] == path.name[len("topk_"):-len(".txt")]
        if path.name == "topk_all.txt":
            all_scores = scores
    # the overall list is the K best of all kinds
    best_per_kind = sorted((float(f[1]) for p in lists if p.name != "topk_all.txt" for f in _topk_lines(p)), reverse=True)
    assert np.allclose(all_scores, best_per_kind[:K])


def test_topk_scores_are_the_peak_probability_of_the_saved_map(overlay_run):
    """A Hiera line's score is the largest head-mean probability of that query's saved attention row."""
    checked = 0
    for f in _topk_lines(overlay_run / "attn_topk" / "topk_all.txt") + \
            _topk_lines(overlay_run / "attn_topk" / "topk_hiera_windowed.txt"):
        if not f[3].startswith("hiera"):
            continue
        layer, label = f[2], f[4]
        saved = safe_load(overlay_run / "attn_tensors" / "by_layer" / layer / f"{layer}__attn.pt")
        i = [q["label"] for q in saved["queries"]].index(label)
        assert saved["key_pooling"] is None
        assert float(f[1]) == pytest.approx(saved["probs"][i].mean(0).max().item(), rel=1e-5)
        checked += 1
    assert checked > 0


def test_topk_symlinks_resolve_inside_the_output_directory(overlay_run):
    root = overlay_run.resolve()
    kinds = [p for p in (overlay_run / "attn_topk").iterdir() if p.is_dir()]
    assert kinds and "all" in {p.name for p in kinds}  # topk_all.txt's pictures are linked too
    for kind_dir in kinds:
        links = sorted(kind_dir.iterdir())
        lines = _topk_lines(overlay_run / "attn_topk" / f"topk_{kind_dir.name}.txt")
        assert len(links) == len(lines)
        for link, f in zip(links, lines):
            assert link.is_symlink()
            target = os.readlink(link)
            assert not os.path.isabs(target)
            resolved = link.resolve()
            assert resolved.is_file() and resolved.is_relative_to(root)
            assert resolved == (overlay_run / f[7]).resolve()


def test_file_names_are_safe_and_pictures_bounded(overlay_run):
    safe = re.compile(r"^[A-Za-z0-9._-]+$")
    for path in overlay_run.rglob("*"):
        for part in path.relative_to(overlay_run).parts:
            assert safe.match(part) and not part.startswith("."), part
    for png in (overlay_run / "attn_overlays" / "all").glob("*.png"):
        with Image.open(png) as im:
            assert im.width == 451 and 300 < im.height < 300 + 120  # the photo's own size, legend below
    for d in (overlay_run / "attn_overlays" / "by_layer").iterdir():
        assert len(list(d.iterdir())) <= 2  # --max-attn-queries 2


def test_rerender_without_the_model(overlay_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(overlay_run, run, symlinks=True)
    code = main(["render", "--run-dir", str(run), "--cmap", "viridis", "--render-attn", "--topk-attn", "3",
                 "--topk-symlink", "-q"])
    assert code == 0, capsys.readouterr().err
    images = list((run / "attn_images" / "all").glob("*.png"))
    assert len(images) >= 13
    assert not (run / "attn_overlays").exists()  # not drawn this time: removed, so nothing stale remains
    assert (run / "predictions.pt").is_file() and len(list((run / "attn_tensors" / "all").glob("*.pt"))) >= 26
    summary = json.loads((run / "layerwise_summary.json").read_text())
    assert summary["render"]["cmap"] == "viridis" and "attn_overlays" not in summary["files"]
    for f in _topk_lines(run / "attn_topk" / "topk_all.txt"):
        assert f[7].startswith("attn_images/") and (run / f[7]).is_file()
    for link in (run / "attn_topk").rglob("*.png"):
        assert link.resolve().is_file() and link.resolve().is_relative_to(run.resolve())
    # drawn in viridis: its brightest colour appears on the global block's picture
    top = tuple(matplotlib.colormaps["viridis"](255, bytes=True)[:3])
    png = np.asarray(Image.open(run / "attn_images" / "all" / "image_encoder_trunk_blocks_4__click0__mean.png").convert("RGB"))
    assert np.all(png == top, axis=-1).any()


@pytest.mark.parametrize("layer", ["image_encoder_trunk_blocks_0", "image_encoder_trunk_blocks_3",
                                   "image_encoder_trunk_blocks_4", "sam_mask_decoder_transformer_layers_1_cross_attn_image_to_token"])
def test_more_queries_recomputed_from_saved_qkv(overlay_run, layer):
    """Drop a captured query from the saved view, ask for its place again: q/k recomputation gives the map
    the capture saved."""
    saved = open_run(overlay_run)
    view = next(v for v in saved_views(saved) if v.layer_key == layer)
    assert [q["label"] for q in view.queries] == ["click0", "query0"]
    opts = MapOptions(max_queries=2)
    want = [m for m in build_maps(view, saved.frame, opts, prompts=saved.prompts) if m.label == "query0"]
    only_click = replace(view, queries=view.queries[:1], probs=view.probs[:1])
    got = [m for m in build_maps(only_click, saved.frame, opts, prompts=saved.prompts,
                                 extra_locations=[("query0", *QUERY0)]) if m.label == "query0"]
    assert len(want) == len(got) == 1
    if want[0].display == "grid":
        assert np.allclose(want[0].grid, got[0].grid, atol=1e-6, equal_nan=True)
        assert got[0].query_box == want[0].query_box
    else:
        assert np.allclose(want[0].token_values, got[0].token_values, atol=1e-6)


def test_rerender_pooled_tensors_without_qkv(tmp_path, tiny_checkpoint):
    """--max-tokens pools saved keys over f x f cells; drawn from those tensors, each f x f block is one value."""
    out = tmp_path / "pooled"
    assert _visualize(out, tiny_checkpoint, "--save-attn", "--max-tokens", "16") == 0
    assert main(["render", "--run-dir", str(out), "--max-tokens", "16", "-q"]) == 0
    saved = open_run(out)
    view = next(v for v in saved_views(saved) if v.layer_key == "image_encoder_trunk_blocks_4")  # 8x8 global
    assert view.key_pooling["factor"] == 2 and view.qkv is None
    m = build_maps(view, saved.frame, MapOptions(max_queries=1))[0]
    blocks = m.grid.reshape(4, 2, 4, 2)
    assert np.allclose(blocks, blocks[:, :1, :, :1])  # constant inside each 2x2 cell
    assert np.nansum(m.grid) == pytest.approx(1.0, abs=1e-5)  # still a distribution over the 64 keys
    assert np.allclose(blocks[:, 0, :, 0] * 4, view.probs[0].mean(0).reshape(4, 4).numpy(), atol=1e-7)
    assert (out / "attn_images" / "all" / "image_encoder_trunk_blocks_4__click0__mean.png").is_file()


def _one_error_line(err: str, *needles):
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_unknown_colormap_is_one_line_listing_close_names(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "never"
    assert _visualize(out, tiny_checkpoint, "--render-attn", "--cmap", "plasmaa") == 2
    _one_error_line(capsys.readouterr().err, "--cmap plasmaa", "unknown matplotlib colormap", "plasma")
    assert not out.exists()
    assert not list(tmp_path.glob(".never*"))


def test_topk_symlink_needs_topk(tmp_path, tiny_checkpoint, capsys):
    assert _visualize(tmp_path / "never", tiny_checkpoint, "--topk-symlink") == 2
    _one_error_line(capsys.readouterr().err, "--topk-symlink", "--topk-attn")


def test_overlay_only_and_attention_images_conflict(tmp_path, tiny_checkpoint, capsys):
    assert _visualize(tmp_path / "never", tiny_checkpoint, "--attn-overlay-only", "--render-attn") == 2
    _one_error_line(capsys.readouterr().err, "--render-attn", "--attn-overlay-only")
    assert not (tmp_path / "never").exists()


def test_render_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert main(["render", "--run-dir", str(tmp_path / "notarun")]) == 2
    _one_error_line(capsys.readouterr().err, "--run-dir", "notarun", "not a run directory")
    assert main(["render", "--run-dir", str(tmp_path / "missing")]) == 2
    _one_error_line(capsys.readouterr().err, "--run-dir")
    assert not (tmp_path / "notarun" / "attn_images").exists()


def test_render_bad_cmap_writes_nothing(overlay_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(overlay_run, run, symlinks=True)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["render", "--run-dir", str(run), "--cmap", "Viridis"]) == 2
    _one_error_line(capsys.readouterr().err, "--cmap Viridis", "viridis")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

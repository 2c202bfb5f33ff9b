"""Review fixes: a plain `render` redraws the run's own pictures, recomputed maps say so, window padding never
sets the score or the colour scale, grey/RGBA photos, NaN scores rank last, and `render` without overlays does
not need the photograph."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts
from sam2_layerwise.cli.main import main
from sam2_layerwise.render.attention import RenderOptions, Rendered, attention_image, fit_photo, render_maps
from sam2_layerwise.render.maps import AttentionMap, MapOptions, RecordView, build_maps
from sam2_layerwise.render.saved import open_run, saved_views
from sam2_layerwise.render.topk import ranked
from sam2_layerwise.store.layout import RunWriter
from tests.conftest import CHELSEA, TINY_CONFIG

QUERY0 = (400.0, 50.0)


def _visualize(out: Path, checkpoint: Path, *extra) -> int:
    return main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(checkpoint), "--image", str(CHELSEA),
                 "--points", "220", "150", "1", "--query-points", *map(str, QUERY0), "--max-attn-queries", "2",
                 "--output-dir", str(out), "-q", *extra])


def _names(run: Path, folder: str = "attn_images") -> set[str]:
    return {p.name for p in (run / folder / "all").glob("*.png")}


@pytest.fixture(scope="module")
def qkv_run(tmp_path_factory, tiny_checkpoint) -> Path:
    """Saved q/k only (no __attn.pt): every saved map is recomputed from q/k when drawn again."""
    out = tmp_path_factory.mktemp("fix") / "qkv"
    assert _visualize(out, tiny_checkpoint, "--save-qkv", "--render-attn") == 0
    return out


@pytest.fixture(scope="module")
def attn_run(tmp_path_factory, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("fix") / "attn"
    assert _visualize(out, tiny_checkpoint, "--save-attn", "--save-qkv", "--render-attn") == 0
    return out


@pytest.mark.parametrize("which", ["attn_run", "qkv_run"])
def test_plain_render_redraws_the_same_pictures(which, request, tmp_path):
    """`render` without --max-attn-queries draws the saved queries only, not every decoder token."""
    original = request.getfixturevalue(which)
    run = tmp_path / "copy"
    shutil.copytree(original, run, symlinks=True)
    before = _names(run)
    assert before
    assert main(["render", "--run-dir", str(run), "-q"]) == 0
    assert _names(run) == before
    summary = json.loads((run / "layerwise_summary.json").read_text())
    assert summary["render"]["max_queries"] is None


def test_plain_render_with_query_points_adds_only_those(attn_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(attn_run, run, symlinks=True)
    before = _names(run)
    assert main(["render", "--run-dir", str(run), "--query-points", "50", "250", "-q"]) == 0
    added = _names(run) - before
    assert added and all("__extra0__" in n for n in added)
    assert before <= _names(run)


def test_maps_recomputed_from_qkv_say_so(qkv_run, attn_run):
    saved = open_run(qkv_run)
    views = saved_views(saved)
    assert views and all(v.recomputed for v in views)
    maps = [m for v in views for m in build_maps(v, saved.frame, MapOptions(), prompts=saved.prompts)]
    assert maps and all("recomputed from q/k" in m.title for m in maps)
    # exact saved probabilities: no note, except on maps that are always recomputed (image -> token)
    saved = open_run(attn_run)
    views = saved_views(saved)
    assert not any(v.recomputed for v in views)
    for m in (m for v in views for m in build_maps(v, saved.frame, MapOptions(), prompts=saved.prompts)):
        assert ("recomputed from q/k" in m.title) == m.label.startswith("to_"), m.title
    # an extra image query of decoder image->token attention (a row of token cells) is recomputed too
    view = next(v for v in views if v.kind == "decoder_image_to_token")
    only_click = replace(view, queries=view.queries[:1], probs=view.probs[:1])
    got = [m for m in build_maps(only_click, saved.frame, MapOptions(max_queries=2), prompts=saved.prompts,
                                 extra_locations=[("query0", *QUERY0)]) if m.label == "query0"]
    assert len(got) == 1 and got[0].display == "tokens" and "recomputed from q/k" in got[0].title


def test_render_needs_the_photograph_only_for_overlays(attn_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(attn_run, run, symlinks=True)
    path = run / "layerwise_summary.json"
    summary = json.loads(path.read_text())
    summary["image"]["path"] = str(tmp_path / "moved.png")
    path.write_text(json.dumps(summary))
    assert main(["render", "--run-dir", str(run), "--cmap", "viridis", "-q"]) == 0
    assert main(["render", "--run-dir", str(run), "--render-attn-overlay", "-q"]) == 2
    assert "--image" in capsys.readouterr().err


def test_window_padding_never_sets_score_peak_or_colour_scale(tiny160_model, chelsea):
    """At 160 px block 5's 10x10 keys are padded to 12x12; a padding key with the largest value is ignored."""
    h, w = chelsea.shape[:2]
    prompts = parse_prompts([440, 290, 1], None, None, w, h)  # bottom-right window: half of it padding
    cap = capture_image(tiny160_model, chelsea, prompts, CaptureOptions(max_attn_queries=1, keep_qkv=True))
    rec = next(r for r in cap.attention if r.layer_key == "image_encoder_trunk_blocks_5")
    assert rec.geometry["key_grid_hw"] == [10, 10] and rec.geometry["padded_key_grid_hw"] == [12, 12]
    assert rec.queries[0].key_block == [8, 12, 8, 12]
    view = RecordView.from_record(rec)
    probs = view.probs.clone()
    probs[0, :, 15] = 5.0  # key (11, 11): padding
    view = replace(view, probs=probs)
    m = build_maps(view, cap.frame, MapOptions(max_queries=1))[0]
    real = m.grid[:10, :10]
    assert np.nanmax(m.grid) == pytest.approx(5.0)
    assert m.score == pytest.approx(float(np.nanmax(real)))
    pr, pc = np.unravel_index(np.nanargmax(np.where(np.isfinite(real), real, -1)), real.shape)
    assert m.peak == f"key({pr},{pc})"
    opts = RenderOptions(cmap="plasma")
    img = np.asarray(attention_image(m, opts).convert("RGB"))
    s = opts.max_image_side // 12
    top = tuple(matplotlib.colormaps["plasma"](255, bytes=True)[:3])
    assert tuple(img[pr * s + s // 2, pc * s + s // 2]) == top  # the real maximum is the top of the scale


def _map(score: float, name: str) -> AttentionMap:
    grid = np.full((4, 4), np.nan, np.float32)
    grid[:2, :2] = [[0.1, 0.2], [0.3, 0.4]]
    return AttentionMap(layer_key="l", kind="k", call_index=0, name=name, label="q", title="t", quantity="p",
                        display="grid", head=None, score=score, peak="key(1,1)", grid=grid, real_hw=(4, 4),
                        query_box=[10.0, 10.0, 30.0, 20.0])


def test_nan_scores_rank_last():
    rs = [Rendered(_map(float("nan"), "a"), image="a.png"), Rendered(_map(0.5, "b"), image="b.png"),
          Rendered(_map(0.9, "c"), image="c.png"), Rendered(_map(float("nan"), "d"), image="d.png")]
    order = [r.map.name for r in ranked(rs)]
    assert order == ["c", "b", "a", "d"]
    assert math.isnan(ranked(rs)[-1].map.score)


@pytest.mark.parametrize("shape", [(40, 60), (40, 60, 4), (40, 60, 2)])
def test_grey_and_rgba_photos_are_drawn(shape, tmp_path):
    photo = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    fitted, scale = fit_photo(photo, 1024)
    assert fitted.mode == "RGB" and fitted.size == (60, 40) and scale == (1.0, 1.0)
    with RunWriter(tmp_path / "run") as writer:
        result = render_maps([_map(0.4, "m")], photo, RenderOptions(images=True, overlays=True), writer)
    assert result.rendered[0].overlay and (tmp_path / "run" / result.rendered[0].overlay).is_file()


def test_summary_stores_file_stem_and_render_reads_it(attn_run):
    summary = json.loads((attn_run / "layerwise_summary.json").read_text())
    by_key = {(e["layer_key"], e.get("call_index", 0)): e for e in summary["attention"]}
    assert all(e["file_stem"] for e in by_key.values())
    saved = open_run(attn_run)
    for v in saved_views(saved):
        assert v.stem == by_key[(v.layer_key, v.call_index)]["file_stem"]
    from sam2_layerwise.render.saved import _stem
    assert _stem({"layer_key": "a", "call_index": 2}) == "a__call2"  # older summaries: derived
    assert _stem({"layer_key": "a", "call_index": 0, "file_stem": "x"}) == "x"


def test_atomic_png_level_and_link_or_copy(tmp_path):
    from sam2_layerwise.store.atomic import atomic_save_png, link_or_copy
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3)))  # compressible
    fast, small = tmp_path / "a.png", tmp_path / "b.png"
    atomic_save_png(img, fast, compress_level=0)
    atomic_save_png(img, small, compress_level=9)
    assert fast.stat().st_size > small.stat().st_size
    assert np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(small)))
    link_or_copy(fast, tmp_path / "sub" / "c.png")
    assert (tmp_path / "sub" / "c.png").read_bytes() == fast.read_bytes()

"""The viewer in a real Chromium (Playwright): from disk (file://) and through `view`; heatmap, clicks, geometry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sam2_layerwise.geometry import HieraLayerGeometry, ImageFrame
from tests.viewer.conftest import read_data, summary_entry

pytestmark = pytest.mark.browser

ARTIFACTS = "viewer_screenshots"


def layer_ids(page_dir: Path) -> dict[str, str]:
    index = read_data(page_dir / "viewer_data" / "index.js")
    return {l["key"]: l["id"] for l in index["layers"] if l["call"] == 0}


def maps_state(p) -> dict:
    return p.page.evaluate("Object.assign({}, document.querySelector('#maps').dataset)")


def token_state(p) -> dict:
    return p.page.evaluate("Object.assign({}, document.querySelector('#token-info').dataset)")


def select_layer(p, ident: str, key: str):
    p.page.select_option("#layer", ident)
    p.wait(f"document.querySelector('#maps').dataset.layer === {json.dumps(key + '#0')} && "
           f"!!document.querySelector('#maps').dataset.drawn")


def click_photo(p, x: float, y: float, frame: ImageFrame, selector: str = "#photo"):
    """Click original pixel (x, y) of the photograph canvas and wait for the server's answer."""
    box = p.page.locator(selector).bounding_box()
    before = p.page.evaluate("document.body.dataset.clicks || '0'")
    p.page.locator(selector).click(position={"x": x * box["width"] / frame.orig_w,
                                             "y": y * box["height"] / frame.orig_h})
    p.wait(f"(document.body.dataset.clicks || '0') !== {json.dumps(before)}")
    cx = float(p.page.evaluate("document.body.dataset.clickX"))
    cy = float(p.page.evaluate("document.body.dataset.clickY"))
    # the page maps the click back to original pixels to within a display pixel
    assert abs(cx - x) <= frame.orig_w / box["width"] + 1e-6 and abs(cy - y) <= frame.orig_h / box["height"] + 1e-6
    return cx, cy


def screenshot(p, tmp_path_factory, name: str) -> Path:
    """A test artifact: under pytest's temporary folder, and in $SAM2LW_TEST_ARTIFACTS when set (CI uploads)."""
    d = tmp_path_factory.getbasetemp() / ARTIFACTS
    d.mkdir(exist_ok=True)
    path = d / f"{name}.png"
    p.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("SAM2LW_TEST_ARTIFACTS"):
        keep = Path(os.environ["SAM2LW_TEST_ARTIFACTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / path.name)
    print(f"screenshot: {path}")
    return path


# -- from disk ------------------------------------------------------------------------------------------------
def test_file_page_heatmap_click_selects_layer_and_head(viewer_runs, open_page, tmp_path_factory):
    run = viewer_runs["full"]
    page_dir = run / "analysis"
    p = open_page(page_dir.joinpath("index.html").as_uri())
    assert p.page.evaluate("location.protocol") == "file:"
    assert "opened from disk" in p.page.text_content("#mode-badge")
    assert p.page.locator("#heatmap .hm-cell").count() > 10
    first = maps_state(p)
    assert first["drawn"], "a first map is drawn at load"
    ids = layer_ids(page_dir)
    key = "image_encoder_trunk_blocks_3"  # a q-pool block with 4 heads
    cell = p.page.locator(f"#heatmap .hm-cell[data-layer='{ids[key]}'][data-head='2']")
    cell.click()
    p.wait(f"document.querySelector('#maps').dataset.layer === '{key}#0' && "
           f"document.querySelector('#maps').dataset.head === '2'")
    after = maps_state(p)
    assert after["drawn"] != first["drawn"] and after["drawn"].startswith(f"{key}#0|2|")
    assert p.page.input_value("#layer") == ids[key] and p.page.input_value("#head") == "2"
    assert "selected" in cell.get_attribute("class")
    # another head of the same layer: another map
    p.page.locator(f"#heatmap .hm-cell[data-layer='{ids[key]}'][data-head='0']").click()
    p.wait("document.querySelector('#maps').dataset.head === '0'")
    assert maps_state(p)["drawn"] != after["drawn"]
    # hovering a cell shows its value
    cell.hover()
    tip = p.page.text_content("#tooltip")
    assert "head 2" in tip and "JS divergence" in tip
    # the FP, Q and difference maps are drawn on the photograph, the key grid on request
    assert p.page.get_attribute("#map-q", "data-view") == "photo"
    assert p.page.get_attribute("#map-diff", "data-view") == "photo"
    p.page.select_option("#draw-on", "grid")
    p.wait("document.querySelector('#map-diff').dataset.view === 'grid'")
    screenshot(p, tmp_path_factory, "file_full")
    assert p.problems == []


def test_file_page_click_on_a_captured_query_selects_it(viewer_runs, open_page):
    """From disk only captured queries exist: clicking a captured place selects it, elsewhere says how to get more."""
    run = viewer_runs["light"]
    ids = layer_ids(run / "analysis")
    p = open_page((run / "analysis" / "index.html").as_uri())
    key = "image_encoder_trunk_blocks_0"
    select_layer(p, ids[key], key)
    frame = ImageFrame(600, 400, 128)
    box = p.page.locator("#photo").bounding_box()
    entry = summary_entry(run, key)
    q1 = next(q for q in entry["queries"] if q["label"] == "click1")
    x, y = (q1["pixel_box"][0] + q1["pixel_box"][2]) / 2, (q1["pixel_box"][1] + q1["pixel_box"][3]) / 2
    p.page.locator("#photo").click(position={"x": x * box["width"] / 600, "y": y * box["height"] / 400})
    p.wait("document.querySelector('#maps').dataset.query === 'click1'")
    t = token_state(p)
    assert [int(t["row"]), int(t["col"])] == q1["cell"] and int(t["group"]) == q1["group"]
    p.page.locator("#photo").click(position={"x": 5, "y": box["height"] - 5})
    assert "sam2-layerwise view" in p.page.text_content("#message")
    assert frame.orig_w == 600 and p.problems == []


def test_single_run_page_from_disk(viewer_runs, open_page):
    """visualize --viewer: one model, no Q side, a heatmap of the capture's own head statistics."""
    run = viewer_runs["single"]
    p = open_page((run / "viewer" / "index.html").as_uri())
    assert p.page.is_hidden("#fig-q") and p.page.is_hidden("#fig-diff") and p.page.is_hidden("#ranking-panel")
    assert p.page.input_value("#metric") == "entropy_norm"
    assert p.page.locator("#heatmap .hm-cell").count() > 10
    assert p.page.locator("#impact-table tbody tr").count() == 3
    assert maps_state(p)["drawn"]
    assert p.problems == []


# -- through `view` -------------------------------------------------------------------------------------------
def _expected_token(entry: dict, frame: ImageFrame, x: float, y: float) -> dict:
    geo = entry["geometry"]
    if entry["kind"].startswith("hiera"):
        hg = HieraLayerGeometry.from_dict(geo)
        row, col = frame.token_at(x, y, *hg.out_hw)
        group, index = hg.locate_query(row, col)
        return {"row": row, "col": col, "group": group, "index": index, "gridH": hg.out_hw[0], "gridW": hg.out_hw[1]}
    gh, gw = geo["query_grid_hw"]
    row, col = frame.token_at(x, y, gh, gw)
    return {"row": row, "col": col, "group": 0, "index": row * gw + col, "gridH": gh, "gridW": gw}


CLICK_LAYERS = [
    ("image_encoder_trunk_blocks_0", "hiera_windowed", (452.0, 131.0)),
    ("image_encoder_trunk_blocks_1", "hiera_qpool", (47.0, 388.0)),
    ("image_encoder_trunk_blocks_4", "hiera_global", (561.0, 27.0)),
    ("image_encoder_trunk_blocks_5", "hiera_qpool", (590.0, 390.0)),  # the window that holds padding (10 -> 12)
    ("sam_mask_decoder_transformer_layers_0_cross_attn_image_to_token", "decoder_image_to_token", (133.0, 287.0)),
]


def test_served_click_anywhere_selects_the_token_under_it(viewer_runs, served, open_page, tmp_path_factory):
    run = viewer_runs["full"]
    s = served("full")
    ids = layer_ids(run / "analysis")
    p = open_page(s.url)
    assert p.page.evaluate("location.protocol") == "http:"
    assert "click anywhere" in p.page.text_content("#mode-badge")
    frame = ImageFrame(600, 400, 160)
    for key, kind, (x, y) in CLICK_LAYERS:
        entry = summary_entry(run, key)
        assert entry["kind"] == kind
        select_layer(p, ids[key], key)
        cx, cy = click_photo(p, x, y, frame)
        p.wait("document.querySelector('#maps').dataset.query === '@click'")
        got = {k: int(v) for k, v in token_state(p).items() if k in ("row", "col", "group", "index", "gridH", "gridW")}
        assert got == _expected_token(entry, frame, cx, cy), key
        state = maps_state(p)
        assert state["layer"] == f"{key}#0" and "|click|" in state["drawn"]
        assert p.page.is_hidden("#message")
        if kind.startswith("hiera"):
            for c in ("#map-fp", "#map-q", "#map-diff"):
                assert p.page.get_attribute(c, "data-view") == "photo"
        else:  # image -> token: its keys are the decoder tokens, drawn as a table of FP, Q and Q - FP
            assert p.page.locator("#token-table tbody tr").count() == 3
    # the clicked place stays selected across layers: another layer answers for the same place
    select_layer(p, ids["image_encoder_trunk_blocks_2"], "image_encoder_trunk_blocks_2")
    p.wait("document.querySelector('#maps').dataset.query === '@click'")
    got = {k: int(v) for k, v in token_state(p).items() if k in ("row", "col")}
    hg = HieraLayerGeometry.from_dict(summary_entry(run, "image_encoder_trunk_blocks_2")["geometry"])
    assert (got["row"], got["col"]) == frame.token_at(cx, cy, *hg.out_hw)
    # a click on a map (not only the photograph) works too
    select_layer(p, ids["image_encoder_trunk_blocks_4"], "image_encoder_trunk_blocks_4")
    p.wait("document.querySelector('#maps').dataset.query === '@click'")
    cx, cy = click_photo(p, 75.0, 60.0, frame, selector="#map-q")
    got = {k: int(v) for k, v in token_state(p).items() if k in ("row", "col")}
    assert (got["row"], got["col"]) == frame.token_at(cx, cy, 10, 10)
    screenshot(p, tmp_path_factory, "served_full")
    assert p.problems == []


def test_served_token_layers_and_unsaved_places_say_so(viewer_runs, served, open_page):
    """Light mode keeps q/k only of the windows holding the captured queries: elsewhere the page says so; a
    layer whose queries are decoder tokens says that a click cannot pick one."""
    run = viewer_runs["light"]
    s = served("light")
    ids = layer_ids(run / "analysis")
    p = open_page(s.url)
    frame = ImageFrame(600, 400, 128)
    key = "image_encoder_trunk_blocks_0"
    select_layer(p, ids[key], key)
    click_photo(p, 590.0, 10.0, frame)  # the top-right window: no captured query there
    p.wait("!document.querySelector('#message').hidden")
    assert "not saved for this place" in p.page.text_content("#message")
    cx, cy = click_photo(p, 305.0, 205.0, frame)  # in click0's window
    p.wait("document.querySelector('#maps').dataset.query === '@click'")
    assert p.page.is_hidden("#message")
    got = {k: int(v) for k, v in token_state(p).items() if k in ("row", "col")}
    assert (got["row"], got["col"]) == frame.token_at(cx, cy, 32, 32)
    dec = "sam_mask_decoder_transformer_layers_0_cross_attn_token_to_image"
    select_layer(p, ids[dec], dec)
    p.page.locator("#photo").click(position={"x": 20, "y": 20})
    p.wait("!document.querySelector('#message').hidden")
    assert "decoder tokens" in p.page.text_content("#message")
    assert p.problems == []


def test_names_from_files_are_shown_as_text(viewer_runs, tmp_path, open_page):
    """A module name holding HTML is shown as text and never runs (the page uses textContent only)."""
    from sam2_layerwise.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(viewer_runs["light"], run, symlinks=True)
    evil = "<img src=x onerror=\"document.body.dataset.pwned='1'\">.attn"
    for half in ("original", "quantized"):
        path = run / half / "layerwise_summary.json"
        s = json.loads(path.read_text())
        s["attention"][0]["name"] = evil
        path.write_text(json.dumps(s))
    assert main(["generate", "--run_dir", str(run), "-q"]) == 0
    p = open_page((run / "analysis" / "index.html").as_uri())
    labels = p.page.locator("#heatmap .hm-label").all_text_contents()
    assert any("<img src=x" in t for t in labels)
    assert p.page.evaluate("document.body.dataset.pwned") is None
    assert p.page.locator("#heatmap img").count() == 0
    assert p.problems == []

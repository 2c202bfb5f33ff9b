"""`compare --attribute` in the viewer: the per-layer change of mask IoU exported beside the metrics, drawn as a
bar per unit and as a column beside the JS ranking; a run without attribution looks as before."""

from __future__ import annotations

import json

import pytest

from sam2_layerwise.cli.main import main
from tests.conftest import COFFEE, TINY_CONFIG
from tests.viewer.conftest import read_data

UNITS = "image_encoder_trunk_blocks_2:5,image_encoder_neck,sam_mask_decoder_transformer_layers_0_self_attn"
UNIT_KEYS = ["image_encoder_trunk_blocks_2", "image_encoder_trunk_blocks_3", "image_encoder_trunk_blocks_4",
             "image_encoder_trunk_blocks_5", "image_encoder_neck", "sam_mask_decoder_transformer_layers_0_self_attn"]


@pytest.fixture(scope="module")
def attributed(tmp_path_factory, tiny_checkpoint, quant_checkpoints):
    """A light compare run at 128 px with restore-mode attribution of six units, after generate."""
    cfg, ckpt = quant_checkpoints["w4a8_mixed"]
    run = tmp_path_factory.mktemp("attributed") / "run"
    assert main(["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
                 "--config-quantized", str(cfg), "--checkpoint-quantized", str(ckpt), "--image", str(COFFEE),
                 "--points", "300", "200", "1", "--image-size", "128", "--output-dir", str(run), "--save-raw",
                 "--attribute", "--attribute-layers", UNITS, "-q"]) == 0
    assert main(["generate", "--run_dir", str(run), "-q"]) == 0
    return run


def metrics_units(run) -> dict[str, dict]:
    metrics = json.loads((run / "analysis" / "metrics.json").read_text())
    return {u["unit"]: u for u in metrics["attribution"]["units"]}


def test_index_carries_the_attribution_of_generate(attributed, viewer_runs):
    index = read_data(attributed / "analysis" / "viewer_data" / "index.js")
    att = index["attribution"]
    assert att["mode"] == "restore" and "restored to full precision" in att["definition"]
    assert [u["unit"] for u in att["units"]] == UNIT_KEYS
    truth = metrics_units(attributed)
    ids = {l["key"]: l["id"] for l in index["layers"]}
    for u in att["units"]:
        t = truth[u["unit"]]
        assert u["delta_iou"] == t["delta_iou"] and u["iou"] == t["iou"] and u["baseline_iou"] == t["baseline_iou"]
        # attention layers point at their call (unit key = layer key); the neck has no attention to show
        assert u["layer"] == ids.get(u["unit"]) and (u["layer"] is None) == (u["unit"] == "image_encoder_neck")
    assert any(u["delta_iou"] != 0 for u in att["units"])  # W4A8 changes the mask: the bars are not all empty
    for kind in ("light", "full"):  # no --attribute: nothing
        assert read_data(viewer_runs[kind] / "analysis" / "viewer_data" / "index.js")["attribution"] is None


@pytest.mark.browser
def test_page_draws_each_layers_delta_iou_beside_the_js_ranking(attributed, viewer_runs, open_page):
    truth = metrics_units(attributed)
    p = open_page((attributed / "analysis" / "index.html").as_uri())
    pg = p.page
    assert pg.is_visible("#attribution-panel") and "restore mode" in pg.text_content("#attribution-title")
    rows = pg.locator("#attribution tr[data-unit]")
    assert rows.count() == len(UNIT_KEYS)
    bound = max(abs(u["delta_iou"]) for u in truth.values())
    for i in range(rows.count()):
        row = rows.nth(i)
        unit = row.get_attribute("data-unit")
        assert unit == UNIT_KEYS[i]  # model order
        delta = truth[unit]["delta_iou"]
        assert float(row.get_attribute("data-delta")) == delta  # the number drawn is the run's, exactly
        shown = row.locator("td.attr-value").text_content()
        assert float(shown.replace("+", "")) == pytest.approx(delta, rel=6e-4, abs=1e-12)  # 4 digits
        width = float(row.locator(".attr-bar").evaluate("e => parseFloat(e.style.width)"))
        assert width == pytest.approx(50 * abs(delta) / bound, abs=1e-3)  # half the track is the largest |ΔIoU|
        assert ("cost" in row.locator(".attr-bar").get_attribute("class")) == (delta > 0)
    # the causal column of the ranking: the ΔIoU of each ranked head's layer
    header = [t.strip() for t in pg.locator("#ranking-table thead th").all_text_contents()]
    assert header[3:5] == ["JS mean", "layer ΔIoU (causal)"]
    ranked = json.loads((attributed / "analysis" / "ranking.json").read_text())
    cells = pg.locator("#ranking-table tbody tr")
    for i, r in enumerate(ranked):
        cell = cells.nth(i).locator("td").nth(4)
        if r["layer_key"] in truth:
            assert float(cell.get_attribute("data-delta")) == truth[r["layer_key"]]["delta_iou"]
        else:
            assert cell.text_content() == "not run"
    # a bar selects its layer; largest effect first reorders the bars
    rows.nth(UNIT_KEYS.index("image_encoder_trunk_blocks_4")).click()
    p.wait("document.querySelector('#maps').dataset.layer === 'image_encoder_trunk_blocks_4#0'")
    assert "selected" in rows.nth(2).get_attribute("class")
    pg.select_option("#attribution-order", "effect")
    order = [rows.nth(i).get_attribute("data-unit") for i in range(rows.count())]
    assert order == sorted(UNIT_KEYS, key=lambda k: (-abs(truth[k]["delta_iou"]), UNIT_KEYS.index(k)))
    assert not p.problems
    # a run without attribution: no panel, no causal column
    q = open_page((viewer_runs["light"] / "analysis" / "index.html").as_uri())
    assert q.page.is_hidden("#attribution-panel")
    assert "causal" not in q.page.text_content("#ranking-table thead")
    assert not q.problems

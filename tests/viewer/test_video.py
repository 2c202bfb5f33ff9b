"""The viewer of video runs: `generate` on `compare --video` runs (light and full) and `visualize --video --viewer`,
from disk and served by `view`, in a real Chromium: the frame selector, each frame's calls, memory cross-attention
drawn per memory frame (labels = the run's key segments, values = the saved tensors), clicks re-selecting the query
where the run saved what recomputes it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sam2_layerwise.capture.attention import attention_rows
from sam2_layerwise.cli.main import main
from sam2_layerwise.geometry import ImageFrame
from tests.conftest import TINY_CONFIG
from tests.video.conftest import H, W, crops, write_frames
from tests.video.test_quantized import RAW
from tests.viewer.conftest import Served, read_data

FRAME = ImageFrame(W, H, 128)
CLICK = ["230", "150", "1"]


@pytest.fixture(scope="module")
def video_runs(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """Four frames, clicks on frame 1 (tracked forward to 3, then back to 0: memory attention on 0, 2 and 3)."""
    d = tmp_path_factory.mktemp("video_viewer")
    frames = write_frames(d / "frames", crops(4))
    qcfg = d / "video_q.yaml"
    qcfg.write_text(yaml.safe_dump(RAW))
    common = ["--device", "cpu", "--video", str(frames), "--prompt-frame", "1", "--points", *CLICK, "-q"]
    runs = {}
    for mode, flag in (("light", "--save-raw"), ("full", "--save-full-attn")):
        out = d / mode
        assert main(["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
                     "--config-quantized", str(qcfg), "--checkpoint-quantized", str(tiny_checkpoint),
                     "--output-dir", str(out), flag, *common]) == 0
        assert main(["generate", "--run_dir", str(out), "-q"]) == 0
        runs[mode] = out
    single = d / "single"
    assert main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--output-dir",
                 str(single), "--save-attn", "--save-qkv", "--max-tokens", "16", "--viewer", *common]) == 0
    runs["single"] = single
    return runs


def page_dir(runs, kind: str) -> Path:
    return runs[kind] / ("viewer" if kind == "single" else "analysis")


def summary(run: Path, kind: str, half: str = "original") -> dict:
    return json.loads(((run if kind == "single" else run / half) / "layerwise_summary.json").read_text())


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def saved_probs(run: Path, kind: str, entry: dict, half: str = "original") -> tuple[torch.Tensor, dict | None]:
    """The attention rows the capture saved for one call, [n_queries, heads, keys], and their key pooling."""
    base = run if kind == "single" else run / half
    attn = torch.load(base / entry["files"]["attn"], weights_only=True)
    return attn["probs"], attn.get("key_pooling")


def memory_calls(s: dict, frame: int | None = None) -> list[dict]:
    return [e for e in s["attention"] if e["kind"] == "memory_cross" and (frame is None or e["frame"] == frame)]


def segment_sums(probs_row: torch.Tensor, entry: dict, pooling: dict | None = None) -> dict[str, float]:
    """Share of one probability row [K] per key segment, from the saved keys (pooled per segment: `pooling`)."""
    segs = pooling["segments"] if pooling else entry["geometry"]["key_segments"]
    return {s["label"]: float(probs_row[s["start"]:s["stop"]].sum()) for s in segs}


# -- the data the page reads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["light", "full", "single"])
def test_index_names_every_frame_and_call(video_runs, kind):
    run = video_runs[kind]
    index = read_data(page_dir(video_runs, kind) / "viewer_data" / "index.js")
    s = summary(run, kind)
    assert [f["index"] for f in index["video"]["frames"]] == [f["index"] for f in s["frames"]["list"]] == [0, 1, 2, 3]
    assert [f["name"] for f in index["video"]["frames"]] == [f["name"] for f in s["frames"]["list"]]
    assert index["video"]["prompt_frame"] == 1 and index["video"]["note"] is None
    for f in index["video"]["frames"]:
        assert (page_dir(video_runs, kind) / f["photo"]).is_file()
    assert [(l["key"], l["call"], l["frame"]) for l in index["layers"]] == \
        [(e["layer_key"], e["call_index"], e["frame"]) for e in s["attention"]]
    assert all(l["label"].endswith(f"· frame {l['frame']}") for l in index["layers"])
    for side in index["sides"]:  # one mask per frame
        assert len(side["masks"]) == 4


@pytest.mark.parametrize("kind", ["light", "single"])
def test_memory_maps_hold_the_saved_rows(video_runs, kind):
    """Each memory frame's values are the query's saved attention over that frame's memory (pooled cells spread
    over their tokens where --max-tokens pooled them), then the pointer tokens; both sides, every head."""
    run = video_runs[kind]
    pdir = page_dir(video_runs, kind)
    index = read_data(pdir / "viewer_data" / "index.js")
    ids = {(l["key"], l["call"]): l for l in index["layers"]}
    s = summary(run, kind)
    sides = {"fp": "original", "q": "quantized"} if kind != "single" else {"fp": None}
    checked = 0
    for entry in memory_calls(s):
        layer = ids[entry["layer_key"], entry["call_index"]]
        data = read_data(pdir / layer["file"])
        segs = entry["geometry"]["key_segments"]
        for side, half in sides.items():
            e = summary(run, kind, half)["attention"][s["attention"].index(entry)] if half else entry
            probs, pooling = saved_probs(run, kind, e, half or "original")  # [n, heads, K]
            assert (pooling is not None) == (kind == "single")  # --max-tokens 16: 8x8 memories pooled 2x2
            for qi, m in enumerate(data["maps"]):
                assert m["display"] == "memory" and [g["label"] for g in m["segments"]] == [g["label"] for g in segs]
                for h in m["heads"]:
                    row = probs[qi].mean(0) if h["head"] is None else probs[qi, h["head"]]
                    values = decode(h[side])
                    want = segment_sums(row, entry, pooling)
                    for g in m["segments"]:
                        got = values[g["offset"]:g["offset"] + g["length"]]
                        assert got.sum() == pytest.approx(want[g["label"]], abs=1e-6)
                        if g["kind"] == "memory":
                            assert g["length"] == g["grid_hw"][0] * g["grid_hw"][1]
                        if pooling is None:  # token for token: the saved row itself, row-major on the frame's grid
                            seg = next(x for x in segs if x["label"] == g["label"])
                            np.testing.assert_array_equal(got, row[seg["start"]:seg["stop"]].numpy())
                    checked += 1
    assert checked >= 3 * 2


# -- in the browser ------------------------------------------------------------------------------------------
def _state(p, selector: str) -> dict:
    return p.page.evaluate(f"Object.assign({{}}, document.querySelector({json.dumps(selector)}).dataset)")


def _select_frame(p, f: int, how: str = "list"):
    if how == "list":
        p.page.locator(f"#frame-list button[data-frame='{f}']").click()
    else:  # the slider, as a drag leaves it
        p.page.evaluate(f"(() => {{ const s = document.querySelector('#frame'); s.value = '{f}'; "
                        f"s.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")
    p.wait(f"document.querySelector('#frame-panel').dataset.frame === '{f}' && "
           f"!!document.querySelector('#maps').dataset.drawn")


def _select(p, layer: dict):
    p.page.select_option("#layer", layer["id"])
    p.wait(f"document.querySelector('#maps').dataset.layer === {json.dumps(layer['key'] + '#' + str(layer['call']))}")


def _panels(p) -> list[dict]:
    return p.page.evaluate("[...document.querySelectorAll('#memory .mem-panel')].map((f) => ({label: f.dataset.label, "
                           "frame: +f.dataset.frame, sums: Object.fromEntries([...f.querySelectorAll('canvas')]"
                           ".filter((c) => c.dataset.sum !== undefined).map((c) => [c.dataset.side, +c.dataset.sum]))}))")


def _check_memory_page(p, run: Path, kind: str, entry: dict, sides: dict, head=None, qi: int = 0):
    """The memory panels of a selected call: one per memory frame, labelled by the run's key segments, with the
    saved rows' share of each memory frame; the pointer bars hold the pointer tokens' share."""
    assert not p.page.is_hidden("#memory") and p.page.is_hidden("#maps")
    segs = entry["geometry"]["key_segments"]
    memory = [g for g in segs if g["kind"] == "memory"]
    panels = _panels(p)
    assert sorted(x["label"] for x in panels) == sorted(g["label"] for g in memory)
    assert [x["label"] for x in panels] == [g["label"] for g in sorted(memory, key=lambda g: (not g["conditioning"],
                                                                                              g["age"]))]
    assert all(x["frame"] == g["frame"] for x in panels for g in memory if g["label"] == x["label"])
    assert int(_state(p, ".mem-query")["frame"]) == entry["frame"]  # the query's own frame comes first
    bars = _state(p, "#memory .mem-pointers")
    assert bars["segments"].split(",") == [g["label"] for g in segs if g["kind"] == "object_pointer"]
    for side, half in sides.items():
        e = summary(run, kind, half)["attention"][summary(run, kind)["attention"].index(entry)] if half else entry
        probs, pooling = saved_probs(run, kind, e, half or "original")
        want = segment_sums(probs[qi].mean(0) if head is None else probs[qi, head], entry, pooling)
        for x in panels:
            assert x["sums"][side] == pytest.approx(want[x["label"]], abs=1e-5), (side, x["label"])
        ptr = sum(want[g["label"]] for g in segs if g["kind"] == "object_pointer")
        assert float(bars["share" + side.capitalize()]) == pytest.approx(ptr, abs=1e-5)


@pytest.mark.browser
@pytest.mark.parametrize("kind", ["light", "single"])
def test_file_page_frames_and_memory_panels(video_runs, open_page, kind):
    run = video_runs[kind]
    pdir = page_dir(video_runs, kind)
    index = read_data(pdir / "viewer_data" / "index.js")
    s = summary(run, kind)
    p = open_page((pdir / "index.html").as_uri())
    assert p.page.evaluate("location.protocol") == "file:" and not p.page.is_hidden("#frame-panel")
    assert p.page.locator("#frame-list button").count() == 4
    for f, how in ((0, "list"), (2, "slider"), (3, "list"), (1, "slider")):
        _select_frame(p, f, how)
        options = p.page.evaluate("[...document.querySelectorAll('#layer option')].map((o) => [o.value, o.textContent])")
        want = [l for l in index["layers"] if l["frame"] == f]
        assert [o[0] for o in options] == [l["id"] for l in want]
        assert len(options) == sum(e["frame"] == f for e in s["attention"])
        assert all(t.startswith(l["label"]) and f"· frame {f}" in t for (_, t), l in zip(options, want))
        labels = p.page.locator("#heatmap .hm-label").all_text_contents()
        assert labels and all(t.endswith(f"· frame {f}") for t in labels)
        assert p.page.locator("#impact-table tr.selected").get_attribute("data-mask") == str(f)
        layer = index["layers"][[l["id"] for l in index["layers"]].index(p.page.input_value("#layer"))]
        assert _state(p, "#maps")["layer"] == f"{layer['key']}#{layer['call']}" and layer["frame"] == f
    sides = {"fp": "original", "q": "quantized"} if kind != "single" else {"fp": None}
    for f in (0, 2, 3):  # every frame with memory attention: both directions, 1 to 3 memory frames
        entry = memory_calls(s, f)[-1]
        layer = next(l for l in index["layers"] if (l["key"], l["call"]) == (entry["layer_key"], entry["call_index"]))
        _select_frame(p, f)
        _select(p, layer)
        p.page.select_option("#head", "1")
        p.wait("document.querySelector('#maps').dataset.head === '1'")
        _check_memory_page(p, run, kind, entry, sides, head=1)
    assert "selected queries only" in p.page.text_content("#click-note")
    assert p.problems == []


@pytest.mark.browser
def test_served_click_reselects_the_memory_query(video_runs, open_page):
    """Full mode: a click on the frame re-selects the query under it; its attention over every memory frame is
    recomputed from the saved q/k (the capture's own attention_rows)."""
    run = video_runs["full"]
    index = read_data(page_dir(video_runs, "full") / "viewer_data" / "index.js")
    s = summary(run, "full")
    entry = memory_calls(s, 0)[0]  # frame 0, tracked backward: memory of frames 1 (conditioning), 2 and 3
    layer = next(l for l in index["layers"] if (l["key"], l["call"]) == (entry["layer_key"], entry["call_index"]))
    server = Served(run)
    try:
        p = open_page(server.url)
        assert "click anywhere" in p.page.text_content("#mode-badge")
        _select_frame(p, 0)
        _select(p, layer)
        p.page.select_option("#head", "mean")
        p.wait("document.querySelector('#maps').dataset.head === 'mean'")
        assert "re-selects the query" in p.page.text_content("#click-note")
        box = p.page.locator("#photo").bounding_box()
        x, y = 60.0, 250.0
        p.page.locator("#photo").click(position={"x": x * box["width"] / W, "y": y * box["height"] / H})
        p.wait("document.querySelector('#maps').dataset.query === '@click'")
        cx, cy = float(p.page.evaluate("document.body.dataset.clickX")), float(p.page.evaluate("document.body.dataset.clickY"))
        row, col = FRAME.token_at(cx, cy, 8, 8)
        tok = _state(p, "#token-info")
        assert (int(tok["row"]), int(tok["col"]), int(tok["index"])) == (row, col, row * 8 + col)
        assert p.page.is_hidden("#message")
        want = {}
        for side, half in (("fp", "original"), ("q", "quantized")):
            e = summary(run, "full", half)["attention"][s["attention"].index(entry)]
            full = torch.load(run / half / e["files"]["full"], weights_only=True)
            transform = None
            if full.get("probs_quantizer"):
                from sam2_layerwise.quant.quantizers import FakeQuantizer

                transform = FakeQuantizer.from_payload(full["probs_quantizer"]).quiet
            probs, _ = attention_rows(full["q"], full["k"], full["v"], float(full["scale"]), transform,
                                      [(0, row * 8 + col)], bool(full.get("tiled", False)))
            want[side] = segment_sums(probs[0].mean(0), entry)
        panels = _panels(p)
        assert sorted(x["label"] for x in panels) == ["mem_f1", "mem_f2", "mem_f3"]
        for x in panels:
            for side in ("fp", "q"):
                assert x["sums"][side] == pytest.approx(want[side][x["label"]], abs=1e-5)
        # the clicked place stays selected on another frame: answered there too
        _select_frame(p, 3)
        p.wait("document.querySelector('#maps').dataset.query === '@click' && "
               "document.querySelector('#maps').dataset.layer.endsWith('#' + "
               f"{json.dumps(str(memory_calls(s, 3)[0]['call_index']))})")
        assert p.page.evaluate("document.body.dataset.clicks") == "2" and p.problems == []
    finally:
        server.close()


@pytest.mark.browser
def test_served_light_run_says_clicks_need_saved_qk(video_runs, open_page):
    run = video_runs["light"]
    index = read_data(page_dir(video_runs, "light") / "viewer_data" / "index.js")
    entry = memory_calls(summary(run, "light"), 2)[0]
    layer = next(l for l in index["layers"] if (l["key"], l["call"]) == (entry["layer_key"], entry["call_index"]))
    server = Served(run)
    try:
        p = open_page(server.url)
        _select_frame(p, 2)
        _select(p, layer)
        assert "selected queries only" in p.page.text_content("#click-note")
        p.page.locator("#photo").click(position={"x": 10, "y": 10})
        p.wait("!document.querySelector('#message').hidden")
        assert "not saved" in p.page.text_content("#message")
        assert _panels(p) and _state(p, "#maps")["query"] == "click0"  # the saved row stays shown
        assert p.problems == []
    finally:
        server.close()


@pytest.mark.browser
def test_view_serves_a_single_video_run(video_runs, open_page):
    """visualize --video --viewer --save-qkv: `view` answers clicks on memory attention (its q/k are the whole
    frame's tokens), the page loads with no failed request."""
    run = video_runs["single"]
    s = summary(run, "single")
    index = read_data(page_dir(video_runs, "single") / "viewer_data" / "index.js")
    entry = memory_calls(s, 2)[0]
    layer = next(l for l in index["layers"] if (l["key"], l["call"]) == (entry["layer_key"], entry["call_index"]))
    server = Served(run)
    try:
        assert server.url.endswith("/viewer/index.html")
        p = open_page(server.url)
        _select_frame(p, 2, "slider")
        _select(p, layer)
        _check_memory_page(p, run, "single", entry, {"fp": None})
        box = p.page.locator("#photo").bounding_box()
        p.page.locator("#photo").click(position={"x": box["width"] * 0.9, "y": box["height"] * 0.1})
        p.wait("document.querySelector('#maps').dataset.query === '@click'")
        assert [x["label"] for x in _panels(p)] == ["mem_f1"] and p.problems == []
    finally:
        server.close()


# -- untrusted runs ------------------------------------------------------------------------------------------
def _edited_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("analysis"))
    for half in ("original", "quantized"):
        path = dst / half / "layerwise_summary.json"
        s = json.loads(path.read_text())
        edit(s)
        path.write_text(json.dumps(s))
    return dst


def test_a_call_naming_no_frame_is_refused(video_runs, tmp_path, capsys):
    def edit(s):
        s["attention"][3]["frame"] = 7  # the run has frames 0-3

    run = _edited_copy(video_runs["light"], tmp_path / "run", edit)
    assert main(["generate", "--run_dir", str(run), "-q"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--run_dir" in err[0] and "attention[3].frame is 7, expected 0..3" in err[0], err
    assert not (run / "analysis").exists()


@pytest.mark.browser
def test_frame_names_are_shown_as_text(video_runs, tmp_path, open_page):
    evil = "<img src=x onerror=\"document.body.dataset.pwned='1'\">.png"

    def edit(s):
        s["frames"]["list"][2]["name"] = evil

    run = _edited_copy(video_runs["light"], tmp_path / "run", edit)
    assert main(["generate", "--run_dir", str(run), "-q"]) == 0
    p = open_page((run / "analysis" / "index.html").as_uri())
    _select_frame(p, 2)
    assert evil in p.page.text_content("#frame-list") and evil in p.page.text_content("#frame-label")
    assert p.page.evaluate("document.body.dataset.pwned") is None
    assert p.page.locator("#frame-panel img").count() == 0
    # the run no longer names the frames on disk: shown on grey, and said
    assert "cannot be shown" in p.page.text_content("#frame-note") and p.problems == []

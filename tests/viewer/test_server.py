"""`view`'s server at the HTTP level (raw requests, nothing normalised by a client): only the run's files, checked
parameters (400 with a message, never 500), clicks recomputed exactly as the capture computed its rows."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil

import numpy as np
import pytest
import torch

from sam2_layerwise.geometry import HieraLayerGeometry, ImageFrame
from sam2_layerwise.store.atomic import safe_load
from tests.viewer.conftest import Served, summary_entry

SECRET = "top secret, outside the run"


def get(s: Served, path: str, method: str = "GET", host: str | None = None, body: bytes | None = None):
    """One raw request: the path goes on the wire exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"127.0.0.1:{s.port}")
    if body is not None:
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.headers, body


def api(s: Served, path: str, post: bytes | None = None):
    status, headers, body = get(s, path, "POST" if post is not None else "GET", body=post)
    assert headers["content-type"].startswith("application/json"), (path, status, body[:200])
    return status, json.loads(body)


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


@pytest.fixture(scope="module")
def trap(viewer_runs, tmp_path_factory):
    """A copy of the light run with links and hidden files that lead outside it, served."""
    d = tmp_path_factory.mktemp("trap")
    outside = d / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    run = d / "run"
    shutil.copytree(viewer_runs["light"], run)
    os.symlink(outside / "secret.txt", run / "analysis" / "leak.txt")
    os.symlink(outside, run / "analysis" / "leakdir")
    os.symlink("../../outside/secret.txt", run / "analysis" / "relative_leak.txt")
    (run / ".hidden").write_text(SECRET)
    (run / "analysis" / "inside_link.txt").symlink_to(run / "manifest.json")
    s = Served(run)
    yield s, outside
    s.close()


TRAVERSALS = [
    "/../../../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/analysis/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/analysis/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/analysis/%2E%2E/%2E%2E/outside/secret.txt",
    "/%2e%2e/outside/secret.txt",
    "/..%5c..%5coutside%5csecret.txt",
    "/%2fetc%2fpasswd",
    "//etc/passwd",
    "/etc/passwd",
    "/analysis/leak.txt",
    "/analysis/relative_leak.txt",
    "/analysis/leakdir/secret.txt",
    "/.hidden",
    "/analysis/./index.html/../../.hidden",
    "/analysis/index.html%00.js",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_files_outside_the_run_are_refused(trap, path):
    s, outside = trap
    status, headers, body = get(s, path)
    assert status in (400, 404), (path, status)
    assert SECRET.encode() not in body and b"root:" not in body
    assert headers["x-content-type-options"] == "nosniff"


def test_absolute_path_of_an_outside_file_is_refused(trap):
    s, outside = trap
    status, _, body = get(s, "/" + str(outside / "secret.txt").lstrip("/"))
    assert status == 404 and SECRET.encode() not in body
    status, _, body = get(s, str(outside / "secret.txt").replace("/", "%2f"))
    assert status in (400, 404) and SECRET.encode() not in body


def test_the_run_files_are_served_with_safe_headers(trap):
    s, _ = trap
    status, headers, _ = get(s, "/")
    assert status == 302 and headers["location"] == "/analysis/index.html"
    status, headers, body = get(s, "/analysis/index.html")
    assert status == 200 and b"viewer_data/viewer.js" in body
    assert headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    status, headers, body = get(s, "/analysis/viewer_data/index.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and body.startswith(b"SAM2LW")
    assert get(s, "/analysis/inside_link.txt")[0] == 200  # a link that stays inside the run is fine
    assert get(s, "/analysis/index.html", method="HEAD")[0] == 200
    assert get(s, "/analysis/index.html", method="POST")[0] == 405
    assert get(s, "/analysis/nothing.js")[0] == 404
    assert get(s, "/analysis")[0] == 404  # folders are not listed


def test_other_hosts_are_refused(trap):
    """DNS rebinding: a page of another site that resolves to 127.0.0.1 sends its own Host header."""
    s, _ = trap
    assert get(s, "/analysis/index.html", host="evil.example")[0] == 400
    assert get(s, "/api/info", host=f"localhost:{s.port}")[0] == 200


BAD_QUERIES = [
    ("/api/query", "layer is missing"),
    ("/api/query?layer=nope&call=0&x=1&y=1", "unknown layer"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=3&x=1&y=1", "call indices"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=-1&x=1&y=1", "call indices"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=abc&x=1&y=1", "whole number"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=--1&x=1&y=1", "whole number"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=%C2%B2&x=1&y=1", "whole number"),  # a superscript 2
    ("/api/prepare?layer=image_encoder_trunk_blocks_0&call=--5", "whole number"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=nan&y=1", "finite"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=1e999&y=1", "finite"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=1&y=abc", "number"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=1_0&y=1", "x must be a number"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=1&y=%D9%A1", "y must be a number"),  # Arabic-Indic 1
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=600&y=1", "outside the 600x400"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=-0.5&y=1", "outside"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=1", "y must be a number"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=1&y=1&z=2", "unknown parameter"),
    ("/api/query?layer=image_encoder_trunk_blocks_0&layer=x&call=0&x=1&y=1", "more than once"),
    ("/api/query?layer=" + "a" * 3000 + "&call=0&x=1&y=1", "unknown layer"),
    ("/api/query?layer=%3Cscript%3E&call=0&x=1&y=1", "unknown layer"),
    ("/api/prepare?layer=nope", "unknown layer"),
]


@pytest.mark.parametrize("path,words", BAD_QUERIES)
def test_bad_parameters_are_a_400_with_a_message(trap, path, words):
    s, _ = trap
    status, body = api(s, path)
    assert status == 400 and body["ok"] is False and words in body["error"], body


def test_unknown_endpoint_is_a_404(trap):
    s, _ = trap
    status, body = api(s, "/api/nothing")
    assert status == 404 and body["ok"] is False


def _saved(run, half, entry):
    return safe_load(run / half / entry["files"]["attn"])


def test_click_at_a_captured_place_reproduces_the_captured_rows_exactly(viewer_runs, served):
    """Full mode: the row recomputed for a click is bit for bit the row the capture saved, for both models (the
    quantized one through its saved log2 softmax quantizer), every head, and the head mean."""
    run = viewer_runs["full"]
    s = served("full")
    frame = ImageFrame(600, 400, 160)
    for key in ("image_encoder_trunk_blocks_0", "image_encoder_trunk_blocks_1", "image_encoder_trunk_blocks_4",
                "image_encoder_trunk_blocks_5", "sam_mask_decoder_transformer_layers_1_cross_attn_image_to_token"):
        entry = summary_entry(run, key)
        q0 = entry["queries"][0]  # click0 at (300, 200)
        status, body = api(s, f"/api/query?layer={key}&call=0&x=300&y=200")
        assert status == 200 and body["ok"], body
        tok = body["token"]
        assert tok["cell"] == q0["cell"] and tok["group"] == q0["group"] and tok["index"] == q0["index"]
        assert tok["pixel_box"] == pytest.approx(q0["pixel_box"]) and tok["key_block"] == q0["key_block"]
        m = body["map"]
        assert [h["head"] for h in m["heads"]] == [None, *range(entry["heads"])]
        for half, side in (("original", "fp"), ("quantized", "q")):
            probs = _saved(run, half, summary_entry(run, key, half))["probs"][0]  # [heads, K]
            for h in m["heads"]:
                want = probs.mean(0) if h["head"] is None else probs[h["head"]]
                got = decode(h[side])
                assert np.array_equal(got, want.numpy().reshape(-1)), (key, side, h["head"])
        if entry["kind"].startswith("hiera"):
            hg = HieraLayerGeometry.from_dict(entry["geometry"])
            assert m["display"] == "grid" and m["block"] == list(hg.key_rows_cols(q0["group"]))
            assert m["grid_hw"] == list(hg.padded_hw) and m["real_hw"] == [hg.in_h, hg.in_w]
            assert frame.token_at(300, 200, *hg.out_hw) == tuple(q0["cell"])
        else:
            assert m["display"] == "tokens" and m["roles"] == entry["geometry"]["key_roles"]


def test_click_anywhere_in_full_mode_matches_the_capture_recomputation(viewer_runs, served):
    """A place no capture selected: the page's rows are attention_rows over the saved q/k/v of that window."""
    from sam2_layerwise.analysis.generate import probs_transform
    from sam2_layerwise.capture.attention import attention_rows

    run = viewer_runs["full"]
    s = served("full")
    frame = ImageFrame(600, 400, 160)
    key = "image_encoder_trunk_blocks_5"  # q-pooled, windows padded 10 -> 12
    x, y = 590.0, 395.0
    status, body = api(s, f"/api/query?layer={key}&call=0&x={x}&y={y}")
    assert status == 200 and body["ok"], body
    hg = HieraLayerGeometry.from_dict(summary_entry(run, key)["geometry"])
    row, col = frame.token_at(x, y, *hg.out_hw)
    g, i = hg.locate_query(row, col)
    assert body["token"]["cell"] == [row, col] and (body["token"]["group"], body["token"]["index"]) == (g, i)
    assert body["token"]["source_cells"] == list(hg.query_source_cells(g, i))
    assert body["map"]["block"] == list(hg.key_rows_cols(g)) and body["map"]["block"][1] > hg.in_h  # padding keys
    for half, side in (("original", "fp"), ("quantized", "q")):
        full = safe_load(run / half / summary_entry(run, key, half)["files"]["full"])
        transform = probs_transform(full, None, None)
        probs, _ = attention_rows(full["q"], full["k"], full["v"], full["scale"], transform, [(g, i)], full["tiled"])
        assert np.array_equal(decode(body["map"]["heads"][0][side]), probs[0].mean(0).numpy())
        assert (transform is not None) == (side == "q")


def test_light_mode_clicks_inside_saved_windows_only(viewer_runs, served):
    run = viewer_runs["light"]
    s = served("light")
    key = "image_encoder_trunk_blocks_0"
    status, body = api(s, f"/api/query?layer={key}&call=0&x=590&y=5")
    assert status == 200 and body["ok"] is False and "not saved for this place" in body["message"]
    assert body["token"]["cell"] == [0, 31]  # the token is still named
    status, body = api(s, f"/api/query?layer={key}&call=0&x=305&y=205")
    assert status == 200 and body["ok"] is True
    q = safe_load(run / "original" / summary_entry(run, key)["files"]["attn"])
    assert body["token"]["group"] == q["queries"][0]["group"]
    # the quantized half's log2 softmax quantizer is not saved in light mode: the page says the row lacks it
    assert "without the kernel's probability quantizer" in body["map"]["notes"]["q"]
    assert body["map"]["notes"]["fp"] == "recomputed from q/k"
    # light mode keeps no q/k of global blocks and the decoder (the whole grid): the page says what would
    status, body = api(s, "/api/query?layer=image_encoder_trunk_blocks_4&call=0&x=590&y=5")
    assert status == 200 and body["ok"] is False and "--save-full-attn" in body["message"]
    assert body["token"]["cell"] == [0, 7]
    status, body = api(s, "/api/query?layer=sam_mask_decoder_transformer_layers_0_self_attn&call=0&x=5&y=5")
    assert status == 200 and body["ok"] is False and "decoder tokens" in body["message"]
    status, body = api(s, f"/api/prepare?layer={key}&call=0")
    assert status == 200 and body["ok"] is True


def test_damaged_tensors_are_a_message_not_a_500(viewer_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(viewer_runs["full"], run)
    entry = summary_entry(run, "image_encoder_trunk_blocks_4")
    (run / "original" / entry["files"]["full"]).write_bytes(b"not a tensor file")
    entry5 = summary_entry(run, "image_encoder_trunk_blocks_5", "quantized")
    torch.save({"q": torch.zeros(1, 1, 1, 1), "k": torch.zeros(1, 1, 1, 1), "v": torch.zeros(1, 1, 1, 1), "scale": 1.0},
               run / "quantized" / entry5["files"]["full"])
    s = Served(run)
    try:
        for key in ("image_encoder_trunk_blocks_4", "image_encoder_trunk_blocks_5"):
            status, body = api(s, f"/api/query?layer={key}&call=0&x=10&y=10")
            assert status == 200 and body["ok"] is False and "cannot be read" in body["message"] or \
                "do not fit" in body["message"], body
    finally:
        s.close()


def test_non_finite_attention_is_shown_as_a_finding(viewer_runs, tmp_path):
    """A model whose q holds NaN (what NaN weights give): the click is answered, and the page's note says how many
    values are NaN/inf, instead of drawing them as cells that are not keys."""
    run = tmp_path / "run"
    shutil.copytree(viewer_runs["full"], run)
    key = "image_encoder_trunk_blocks_4"
    path = run / "quantized" / summary_entry(run, key, "quantized")["files"]["full"]
    full = safe_load(path)
    full["q"] = full["q"].clone()
    full["q"][..., 0] = float("nan")
    torch.save(full, path)
    s = Served(run)
    try:
        status, body = api(s, f"/api/query?layer={key}&call=0&x=300&y=200")
    finally:
        s.close()
    assert status == 200 and body["ok"] is True, body
    n = len(decode(body["map"]["heads"][0]["q"]))
    assert f"{n} of {n} values are NaN/inf (the model's own)" in body["map"]["notes"]["q"]
    assert "NaN" not in body["map"]["notes"]["fp"]


def test_single_run_clicks_use_its_saved_qkv(viewer_runs, served):
    """A visualize run with --save-qkv: global blocks and the decoder keep the whole grid (any place), windowed
    blocks the windows of the captured queries; the rows are the capture's attention_probs over them."""
    from sam2_layerwise.capture.attention import attention_probs

    run = viewer_runs["single"]
    s = served("single")
    status, info = api(s, "/api/info")
    assert info["kind"] == "single" and info["page"] == "/viewer/index.html"
    frame = ImageFrame(600, 400, 128)
    s_json = json.loads((run / "layerwise_summary.json").read_text())
    entries = {e["layer_key"]: e for e in s_json["attention"]}
    for key, x, y in (("image_encoder_trunk_blocks_4", 590.0, 5.0),
                      ("sam_mask_decoder_transformer_layers_1_cross_attn_image_to_token", 17.0, 390.0),
                      ("image_encoder_trunk_blocks_0", 305.0, 205.0)):
        status, body = api(s, f"/api/query?layer={key}&call=0&x={x}&y={y}")
        assert status == 200 and body["ok"], body
        assert set(body["map"]["heads"][0]) == {"head", "fp"}  # one model
        qkv = safe_load(run / entries[key]["files"]["qkv"])
        g, i = body["token"]["group"], body["token"]["index"]
        gi = qkv["groups"].index(g)
        want = attention_probs(qkv["q"][gi][:, i:i + 1], qkv["k"][gi], qkv["scale"])[:, 0]  # [heads, K]
        assert np.array_equal(decode(body["map"]["heads"][0]["fp"]), want.mean(0).numpy())
        if key.endswith("blocks_4"):
            assert body["token"]["cell"] == list(frame.token_at(x, y, 8, 8))
    status, body = api(s, "/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=590&y=5")
    assert body["ok"] is False and "not saved for this place" in body["message"]


POSTS = [
    (b'{"layer": "nope", "call": 0, "x": 1, "y": 1}', "unknown layer"),
    (b'{"layer": "image_encoder_trunk_blocks_0", "call": 9, "x": 1, "y": 1}', "call indices"),
    (b'{"layer": "image_encoder_trunk_blocks_0", "call": 0.5, "x": 1, "y": 1}', "whole number"),
    (b'{"layer": "image_encoder_trunk_blocks_0", "call": true, "x": 1, "y": 1}', "string or a number"),
    (b'{"layer": "image_encoder_trunk_blocks_0", "call": 0, "x": NaN, "y": 1}', "finite"),
    (b'{"layer": "image_encoder_trunk_blocks_0", "call": 0, "x": [1], "y": 1}', "string or a number"),
    (b'{"layer": "image_encoder_trunk_blocks_0", "call": 0, "x": 1, "y": 1, "head": 3}', "unknown parameter"),
    (b'[1, 2]', "JSON object"),
    (b'not json', "not JSON"),
    (b'[' * 5000, "larger than"),
]


@pytest.mark.parametrize("body,words", POSTS)
def test_posted_queries_are_checked_too(trap, body, words):
    s, _ = trap
    status, answer = api(s, "/api/query", post=body)
    assert status == 400 and words in answer["error"], answer


def test_a_large_body_is_refused_before_it_is_read(trap):
    """A declared Content-Length over the limit is answered at once (the body is never waited for), and a
    chunked body is read only up to the limit."""
    s, _ = trap
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.putrequest("POST", "/api/query", skip_host=True)
    conn.putheader("Host", f"127.0.0.1:{s.port}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 << 20))
    conn.endheaders(b"{")  # 1 byte of the 50 MiB it announced
    r = conn.getresponse()
    assert r.status == 400 and "larger than" in json.loads(r.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("POST", "/api/query", body=iter([b"[" * 3000] * 3), encode_chunked=True,
                 headers={"Host": f"127.0.0.1:{s.port}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "larger than" in json.loads(r.read())["error"]
    conn.close()


def test_posted_query_answers_like_get(trap):
    s, _ = trap
    status, a = api(s, "/api/query", post=b'{"layer_key": "image_encoder_trunk_blocks_0", "call_index": 0, '
                                          b'"x": 305, "y": 205.5}')
    status2, b = api(s, "/api/query?layer=image_encoder_trunk_blocks_0&call=0&x=305&y=205.5")
    assert status == status2 == 200 and a["ok"] and a == b

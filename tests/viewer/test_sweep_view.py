"""`sam2-layerwise view` on a sweep directory: the sweep page served (heatmap over the items; a clicked head lists
the items where it changed most, straight from heads.parquet), each kept run opened in the viewer (its page made
in memory, nothing written), the same page from disk, and the directory read as untrusted input."""

from __future__ import annotations

import http.client
import json
import os
import shutil

import pandas as pd
import pytest

from sam2_layerwise.cli.main import main
from tests.conftest import CHELSEA, COFFEE, TINY_CONFIG
from tests.viewer.conftest import Served

SECRET = "top secret, outside the sweep"


@pytest.fixture(scope="module")
def kept_sweep(tmp_path_factory, tiny_checkpoint, quant_checkpoints):
    """W8A8 over four items at 128 px with --keep-runs and attribution of two blocks; the last item's run is then
    deleted (as if it had not been kept). Returns the sweep directory."""
    d = tmp_path_factory.mktemp("sweep_view")
    manifest = d / "items.csv"
    manifest.write_text(f"image,points\n{CHELSEA},200 150 1\n{CHELSEA},100 80 1\n{COFFEE},300 200 1\n"
                        f"{COFFEE},450 300 1 100 100 0\n")
    cfg, ckpt = quant_checkpoints["w8a8"]
    out = d / "sweep"
    assert main(["sweep", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
                 "--config-quantized", str(cfg), "--checkpoint-quantized", str(ckpt), "--inputs", str(manifest),
                 "--output-dir", str(out), "--image-size", "128", "--keep-runs", "--attribute",
                 "--attribute-layers", "image_encoder_trunk_blocks_2:3", "-q"]) == 0
    items = pd.read_parquet(out / "items.parquet")
    (gone,) = (out / "runs").glob(f"*-{items['key'].iloc[3][:12]}")
    shutil.rmtree(gone)
    return out


@pytest.fixture(scope="module")
def served_sweep(kept_sweep):
    s = Served(kept_sweep)
    yield s
    s.close()


def expected_items(out, layer_key: str, head: int, metric: str = "js_mean", lowest: bool = False) -> list:
    """[(item, value)] of the head's items, most changed first, from heads.parquet (pandas, independently)."""
    h = pd.read_parquet(out / "heads.parquet")
    sel = h[(h["layer_key"] == layer_key) & (h["call_index"] == 0) & (h["head"] == head)].dropna(subset=[metric])
    sel = sel.sort_values([metric, "item"], ascending=[lowest, True], kind="stable")
    return list(zip(sel["item"].tolist(), sel[metric].tolist()))


def listed(p) -> list:
    rows = p.page.locator("#items tbody tr")
    return [(int(rows.nth(i).get_attribute("data-item")), float(rows.nth(i).get_attribute("data-value")))
            for i in range(rows.count())]


def click_head(p, layer_key: str, head: int, metric: str = "js_mean"):
    p.page.locator(f"#grid td[data-key='{layer_key}#0#{head}']").click()
    p.wait(f"(document.body.dataset.items || '').startsWith('{layer_key}#0#{head}|{metric}|')")


@pytest.mark.browser
def test_served_sweep_page_lists_the_items_and_opens_kept_runs(kept_sweep, served_sweep, open_page):
    out, s = kept_sweep, served_sweep
    ranking = json.loads((out / "sweep" / "ranking.json").read_text())
    top = next(r for r in ranking if len(expected_items(out, r["layer_key"], r["head"])) == 4)
    key, head = top["layer_key"], top["head"]
    p = open_page(s.url)
    assert "served by sam2-layerwise view" in p.page.text_content("#mode-badge")
    # the heatmap cell is the sweep's own aggregation of that head
    hs = pd.read_parquet(out / "sweep" / "heads.parquet").set_index(["layer_key", "head"])
    cell = p.page.locator(f"#grid td[data-key='{key}#0#{head}']")
    assert float(cell.get_attribute("data-value")) == pytest.approx(hs.loc[(key, head), "js_mean_mean"], rel=1e-12)
    # clicking it lists exactly heads.parquet's items of that head, highest mean JS first, with their values
    click_head(p, key, head)
    want = expected_items(out, key, head)
    assert listed(p) == want
    # another metric ranks by that metric: the lowest top-k overlap first
    p.page.select_option("#metric", "topk_overlap_mean")
    p.wait(f"(document.body.dataset.items || '').startsWith('{key}#0#{head}|topk_overlap|')")
    assert listed(p) == expected_items(out, key, head, "topk_overlap", lowest=True)
    p.page.select_option("#metric", "js_mean_mean")
    p.wait(f"(document.body.dataset.items || '').startsWith('{key}#0#{head}|js_mean|')")
    # links: every kept item opens its run; the deleted one says it was not kept
    rows = p.page.locator("#items tbody tr")
    for i, (item, _) in enumerate(want):
        link = rows.nth(i).locator("a.run")
        assert link.count() == (0 if item == 3 else 1)
        if item == 3:
            assert rows.nth(i).text_content().endswith("not kept")
    first_item = want[0][0]
    keyhex = pd.read_parquet(out / "items.parquet").set_index("item").loc[first_item, "key"]
    (run,) = (out / "runs").glob(f"*-{keyhex[:12]}")
    assert rows.nth(0).locator("a.run").get_attribute("href") == f"/runs/{run.name}/"
    rows.nth(0).locator("a.run").click()
    p.page.wait_for_url(f"{s.base}/runs/{run.name}/analysis/index.html")
    p.page.wait_for_load_state()
    p.wait("!!document.body && document.body.dataset.loaded === '1'")
    assert "served by sam2-layerwise view" in p.page.text_content("#mode-badge")  # ../api/ answers under /runs/
    image = json.loads((run / "manifest.json").read_text())["image"]
    assert p.page.text_content("#title").startswith(run.name)  # the page is that run's
    assert f"{image['width']}x{image['height']} px at 128" in p.page.text_content("#subtitle")
    assert p.page.locator("#attribution tr[data-unit]").count() == 2  # the kept run's own attribution
    assert not (run / "analysis").exists()  # made in memory: nothing written into the sweep
    assert not p.problems


@pytest.mark.browser
def test_sweep_page_from_disk_lists_the_same_items(kept_sweep, open_page):
    out = kept_sweep
    ranking = json.loads((out / "sweep" / "ranking.json").read_text())
    p = open_page((out / "sweep" / "index.html").as_uri())
    assert "opened from disk" in p.page.text_content("#mode-badge")
    for r in ranking[:3]:
        click_head(p, r["layer_key"], r["head"])
        assert listed(p) == expected_items(out, r["layer_key"], r["head"])[:10]
    units = p.page.locator("#units tbody tr")
    at = pd.read_parquet(out / "sweep" / "attribution.parquet")
    assert units.count() == len(at)
    for i, u in enumerate(at.itertuples()):
        assert units.nth(i).get_attribute("data-unit") == u.unit
        assert float(units.nth(i).get_attribute("data-delta")) == pytest.approx(u.delta_iou_mean, rel=1e-12)
    assert not p.problems


# -- HTTP level ---------------------------------------------------------------------------------------------------
def get(s: Served, path: str):
    """One raw request, the path on the wire exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"127.0.0.1:{s.port}")
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.headers, body


@pytest.fixture(scope="module")
def trap(kept_sweep, tmp_path_factory):
    """A copy of the sweep with links that lead outside it (one shaped like a kept run), served."""
    d = tmp_path_factory.mktemp("sweep_trap")
    outside = d / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "manifest.json").write_text(SECRET)
    out = d / "sweep"
    shutil.copytree(kept_sweep, out)
    os.symlink(outside / "secret.txt", out / "leak.txt")
    os.symlink(outside, out / "runs" / "evil-0123456789ab")
    os.symlink(outside, out / "sweep" / "plots" / "leakdir")
    s = Served(out)
    yield s, out
    s.close()


def test_sweep_server_never_serves_outside_the_directory(trap):
    s, out = trap
    run = next(p.name for p in (out / "runs").iterdir() if not p.is_symlink())
    for path in ["/leak.txt", "/%2e%2e/outside/secret.txt", "/sweep/plots/leakdir/secret.txt",
                 "/runs/evil-0123456789ab/", "/runs/evil-0123456789ab/manifest.json",
                 "/runs/evil-0123456789ab/analysis/index.html", "/runs/%2e%2e/outside/secret.txt",
                 "/runs/%2e%2e%2f%2e%2e%2foutside/secret.txt", f"/runs/{run}/..%2f..%2f..%2foutside%2fsecret.txt",
                 f"/runs/{run}/original/%2e%2e/%2e%2e/%2e%2e/outside/secret.txt", "/static/..%2fserver.py",
                 "/static/%2e%2e/server.py", "/static/index.html", "/static/recompute.py", "/runs/x/../../leak.txt",
                 f"/runs/{run}", "/runs", "/.sweep.lock"]:
        status, headers, body = get(s, path)
        assert status in (400, 404), (path, status)
        assert SECRET.encode() not in body and headers["x-content-type-options"] == "nosniff"
    # what is served: the page, its script, the sweep's own files, the kept run's viewer
    assert get(s, "/")[1]["location"] == "/sweep/index.html"
    status, headers, body = get(s, "/sweep/index.html")
    assert status == 200 and b'src="/static/sweep.js"' in body and b"<script>" not in body  # no inline script
    assert "script-src 'self'" in headers["content-security-policy"]
    assert get(s, "/static/sweep.js")[0] == 200 and get(s, "/items.parquet")[0] == 200
    status, headers, _ = get(s, f"/runs/{run}/")
    assert status == 302 and headers["location"] == f"/runs/{run}/analysis/index.html"
    status, _, body = get(s, f"/runs/{run}/api/info")
    assert status == 200 and json.loads(body)["kind"] == "compare"
    assert get(s, f"/runs/{run}/manifest.json")[0] == 200


@pytest.mark.parametrize("query,words", [
    ("", "layer is missing"),
    ("layer=nope&head=0", "unknown layer"),
    ("layer=..%2f..%2fetc&head=0", "unknown layer"),
    ("layer=image_encoder_trunk_blocks_0&head=99", "measured no head 99"),
    ("layer=image_encoder_trunk_blocks_0&head=-1", "measured no head -1"),
    ("layer=image_encoder_trunk_blocks_0&head=x", "head must be a whole number"),
    ("layer=image_encoder_trunk_blocks_0&head=--1", "head must be a whole number"),
    ("layer=image_encoder_trunk_blocks_0&head=0&n=--3", "n must be a whole number"),
    ("layer=image_encoder_trunk_blocks_0&head=0&call=7", "measured no head 0 of image_encoder_trunk_blocks_0 call 7"),
    ("layer=image_encoder_trunk_blocks_0&head=0&metric=iou", "metric must be one of"),
    ("layer=image_encoder_trunk_blocks_0&head=0&n=0", "n must be 1..1000"),
    ("layer=image_encoder_trunk_blocks_0&head=0&n=99999", "n must be 1..1000"),
    ("layer=image_encoder_trunk_blocks_0&head=0&x=1", "unknown parameter"),
    ("layer=image_encoder_trunk_blocks_0&head=0&head=1", "more than once"),
])
def test_sweep_items_parameters_are_checked(served_sweep, query, words):
    status, _, body = get(served_sweep, "/api/sweep/items?" + query)
    answer = json.loads(body)
    assert status == 400 and answer["ok"] is False and words in answer["error"], answer


def test_sweep_items_answer_is_the_top_of_heads_parquet(kept_sweep, served_sweep):
    status, _, body = get(served_sweep, "/api/sweep/items?layer=image_encoder_trunk_blocks_1&head=1&n=2"
                                        "&metric=entropy_norm_delta")
    answer = json.loads(body)
    h = pd.read_parquet(kept_sweep / "heads.parquet")
    sel = h[(h["layer_key"] == "image_encoder_trunk_blocks_1") & (h["head"] == 1)]
    sel = sel.assign(a=sel["entropy_norm_delta"].abs()).sort_values(["a", "item"], ascending=[False, True])
    assert status == 200 and answer["rows"] == [[int(i), v] for i, v in
                                                zip(sel["item"][:2], sel["entropy_norm_delta"][:2])]
    assert set(answer["items"]) == {str(r[0]) for r in answer["rows"]}


def _damaged(src, tmp_path, name: str, change) -> str:
    d = tmp_path / name
    d.mkdir()
    for f in ("sweep.json", "items.parquet", "heads.parquet", "attribution.parquet"):
        shutil.copy(src / f, d / f)
    change(d)
    return str(d)


def _rewrite(table: str, edit):
    def change(d):
        df = pd.read_parquet(d / table)
        edit(df).to_parquet(d / table, index=False)
    return change


BAD_SWEEPS = {
    "manifest_not_json": (lambda d: (d / "sweep.json").write_text("{not json"), "sweep.json cannot be read as JSON"),
    "newer_schema": (lambda d: (d / "sweep.json").write_text(json.dumps(
        {**json.loads((d / "sweep.json").read_text()), "schema_version": 99})), "schema version 99"),
    "other_schema": (lambda d: (d / "sweep.json").write_text('{"schema": "something/else"}'),
                     "not a sam2-layerwise sweep manifest"),
    "no_tables_yet": (lambda d: (d / "items.parquet").unlink(), "has no items.parquet yet"),
    "heads_not_parquet": (lambda d: (d / "heads.parquet").write_bytes(b"PAR1 not really"),
                          "heads.parquet cannot be read as Parquet"),
    "column_missing": (_rewrite("items.parquet", lambda df: df.drop(columns=["iou"])),
                       "items.parquet does not have the documented columns (docs/sweep.md): iou missing"),
    "layer_key_path": (_rewrite("heads.parquet", lambda df: df.assign(layer_key="../../etc/passwd")),
                       "heads.parquet has a layer_key that is not a module name"),
    "head_out_of_range": (_rewrite("heads.parquet", lambda df: df.assign(head=10**6)),
                          "heads.parquet has a head or call index out of range"),
    "unknown_item": (_rewrite("heads.parquet", lambda df: df.assign(item=df["item"] + 1000)),
                     "heads.parquet has rows of items that items.parquet does not list as ok"),
    "linked_table": (lambda d: ((d / "heads.parquet").unlink(), (d / "heads.parquet").symlink_to(d / "items.parquet")),
                     "heads.parquet is not a regular file"),
}


@pytest.mark.parametrize("name", list(BAD_SWEEPS))
def test_view_refuses_a_bad_sweep_directory_in_one_line(name, kept_sweep, tmp_path, capsys):
    change, words = BAD_SWEEPS[name]
    d = _damaged(kept_sweep, tmp_path, name, change)
    assert main(["view", d]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"RUN_DIR {d}: " in err and words in err, err


def test_view_sweep_flags(kept_sweep, capsys):
    assert main(["view", str(kept_sweep), "--page", "analysis"]) == 2
    assert "--page analysis: does not apply to a sweep directory" in capsys.readouterr().err
    from sam2_layerwise.cli.view import find_sweep

    assert find_sweep(str(kept_sweep / "sweep"), None).path == kept_sweep  # its sweep/ folder names it too


def test_view_command_serves_a_sweep(kept_sweep):
    """The command itself, in a subprocess: the sweep page's URL printed, served, stopped by SIGTERM."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "sam2_layerwise.cli.main", "view", str(kept_sweep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"sam2-layerwise view: sweep {kept_sweep} (4 items measured)"), lines
        url = re.search(r"viewer: (http://127\.0\.0\.1:\d+/sweep/index\.html)$", lines[1].strip()).group(1)
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"/static/sweep.js" in r.read()
        with urllib.request.urlopen(url.replace("/sweep/index.html", "/api/sweep"), timeout=30) as r:
            data = json.loads(r.read())
        assert data["served"] is True and len(data["units"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out

"""Runs for the viewer tests, made by the real commands on the tiny model, and a real Chromium.

- full: compare --save-full-attn at 160 px (stage-4 windows padded 10x10 -> 12x12), a click and a box, the W4A8
  mixed twin (log2 softmax quantizer on Hiera blocks, so recomputed Q rows need the saved quantizer), generate;
- light: compare --save-raw at 128 px with the same twin, two clicks and a query point, generate;
- single: visualize --viewer --save-attn --save-qkv at 128 px, keys pooled by --max-tokens.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from sam2_layerwise.cli.main import main
from tests.conftest import COFFEE, REPO, TINY_CONFIG

QCFG = REPO / "examples" / "quantization" / "w4a8_mixed.yaml"
FULL_POINTS = ["300", "200", "1"]
FULL_BOX = ["200", "100", "450", "330"]
LIGHT_POINTS = ["300", "200", "1", "120", "80", "0"]


def compare(ckpt, qckpt, out, mode, *extra):
    assert main(["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(ckpt),
                 "--config-quantized", str(QCFG), "--checkpoint-quantized", str(qckpt), "--image", str(COFFEE),
                 "--output-dir", str(out), mode, "-q", *extra]) == 0
    assert main(["generate", "--run_dir", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def viewer_runs(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("viewer_runs")
    qckpt = d / "w4a8_mixed.pt"
    assert main(["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--adaptive-qat-config",
                 str(QCFG), "--calib-images", str(COFFEE), "--output", str(qckpt), "-q"]) == 0
    runs = {
        "full": compare(tiny_checkpoint, qckpt, d / "full", "--save-full-attn", "--image-size", "160",
                        "--points", *FULL_POINTS, "--box", *FULL_BOX),
        "light": compare(tiny_checkpoint, qckpt, d / "light", "--save-raw", "--points", *LIGHT_POINTS,
                         "--query-points", "500", "350"),
    }
    single = d / "single"
    assert main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(COFFEE),
                 "--points", "300", "200", "1", "--output-dir", str(single), "--save-attn", "--save-qkv",
                 "--max-tokens", "16", "--viewer", "-q"]) == 0
    runs["single"] = single
    return runs


def read_data(path: Path) -> dict:
    """The data a viewer_data/*.js file registers."""
    text = path.read_text()
    assert text.startswith("SAM2LW.register(") and text.endswith(");\n")
    return json.loads(text[text.index("{"):-3])


def summary_entry(run: Path, layer_key: str, half: str = "original") -> dict:
    s = json.loads((run / half / "layerwise_summary.json").read_text())
    return next(e for e in s["attention"] if e["layer_key"] == layer_key)


# -- a server in this process -------------------------------------------------------------------------------
class Served:
    def __init__(self, run_dir: Path, page: str | None = None, host: str = "127.0.0.1"):
        import uvicorn

        from sam2_layerwise.cli.view import find_page, find_sweep, listen
        from sam2_layerwise.viewer.server import build_app, build_sweep_app, hosts_for

        sweep = find_sweep(str(run_dir), page)  # a sweep directory, or None
        if sweep is None:
            vrun, self.page = find_page(str(run_dir), page)
        else:
            self.page = "sweep"
        self.sock = listen(host, 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://{host}:{self.port}"
        self.url = f"{self.base}/{self.page}/index.html"
        app = build_app(vrun, self.page, allowed_hosts=hosts_for(host, self.port)) if sweep is None else \
            build_sweep_app(sweep, allowed_hosts=hosts_for(host, self.port))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        end = time.time() + 20
        while not self.server.started:
            assert time.time() < end, "the viewer server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="session")
def served(viewer_runs):
    """kind -> a running server of that run (started on first use, stopped at the end of the session)."""
    started: dict[str, Served] = {}

    def get(kind: str) -> Served:
        if kind not in started:
            started[kind] = Served(viewer_runs[kind])
        return started[kind]

    yield get
    for s in started.values():
        s.close()


# -- a real browser -----------------------------------------------------------------------------------------
def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="session")
def browser():
    """Chromium through Playwright; the test is skipped where either is missing (.ci/run installs both)."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A page with every console error, page error, failed request and HTTP error recorded."""

    def __init__(self, browser, url: str, viewport=(1400, 1100)):
        self.problems: list[str] = []
        self.ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = pg = self.ctx.new_page()
        pg.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(f"console {m.type}: {m.text}"))
        pg.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        pg.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        pg.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        pg.goto(url)
        self.wait("document.body.dataset.loaded === '1'")

    def wait(self, expr: str, timeout: float = 20.0):
        """Poll a JavaScript expression until true (page.evaluate: the served page's CSP forbids eval, which
        Playwright's wait_for_function needs)."""
        end = time.time() + timeout
        while True:
            v = self.page.evaluate(expr)
            if v:
                return v
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {expr}; status: {self.page.text_content('#status')!r}; "
                                     f"problems: {self.problems}")
            time.sleep(0.02)

    def close(self):
        self.ctx.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def opener(url: str, **kw) -> Page:
        p = Page(browser, url, **kw)
        pages.append(p)
        return p

    yield opener
    for p in pages:
        p.close()

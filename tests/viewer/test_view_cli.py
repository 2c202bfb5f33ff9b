"""`sam2-layerwise view`: the command itself, in a subprocess (URL printed, loopback by default, a loud warning
otherwise, stopped by SIGTERM) and in-process for its refusals."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from sam2_layerwise.cli.main import main


def start(*args):
    proc = subprocess.Popen([sys.executable, "-m", "sam2_layerwise.cli.main", "view", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = None
    end = time.time() + 60
    lines = []
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"viewer: (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no URL printed: {lines} {out} {err}")
    return proc, url


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_view_serves_on_loopback_and_stops_on_sigterm(viewer_runs):
    proc, url = start(str(viewer_runs["full"]))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/analysis/index\.html", url)
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"viewer_data/viewer.js" in r.read()
        base = url.rsplit("/analysis/", 1)[0]
        with urllib.request.urlopen(base + "/api/info", timeout=30) as r:
            info = json.loads(r.read())
        assert info["server"] is True and info["kind"] == "compare" and info["mode"] == "full"
        with urllib.request.urlopen(base + "/api/query?layer=image_encoder_trunk_blocks_4&call=0&x=10&y=10",
                                    timeout=30) as r:
            assert json.loads(r.read())["ok"] is True
    finally:
        code, out, err = stop(proc)
    assert code == 0 and "stopped" in out and "WARNING" not in err


def test_view_warns_loudly_off_loopback(viewer_runs):
    proc, url = start(str(viewer_runs["single"]), "--host", "0.0.0.0")
    try:
        assert url.endswith("/viewer/index.html")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
    finally:
        code, out, err = stop(proc)
    assert code == 0 and "WARNING: serving on 0.0.0.0" in err and "NOT only this machine" in err


def test_view_takes_the_page_folder_too(viewer_runs):
    proc, url = start(str(viewer_runs["light"] / "analysis"), "--port", "0")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
    finally:
        stop(proc)


def test_view_refusals(viewer_runs, tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    assert "is neither a compare run" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(viewer_runs["light"], run)
    shutil.rmtree(run / "analysis")
    assert main(["view", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no viewer page in analysis/" in err and "sam2-layerwise generate --run_dir" in err
    shutil.copytree(viewer_runs["light"] / "analysis", run / "other")
    assert main(["view", str(run)]) == 2
    assert "pages found: other (pass --page)" in capsys.readouterr().err
    assert main(["view", str(run), "--page", "../x"]) == 2
    assert "--page ../x" in capsys.readouterr().err
    assert main(["view", str(run), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["view", str(run), "--page", "other", "--host", "no.such.host.invalid"]) == 2
    assert "--host no.such.host.invalid" in capsys.readouterr().err


def test_view_port_in_use_is_one_line(viewer_runs, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        assert main(["view", str(viewer_runs["light"]), "--port", str(port)]) == 2
        assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        s.close()

"""A failed, interrupted or killed run never costs the user data (issue: hardening, section 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sam2_layerwise.cli.main import main
from sam2_layerwise.model.loading import read_checkpoint
from tests.conftest import CHELSEA, REPO, TINY_CONFIG
from tests.store.test_run_writer import snapshot


def base_args(ckpt, out):
    return ["visualize", "--config", TINY_CONFIG, "--checkpoint", str(ckpt), "--image", str(CHELSEA),
            "--points", "220", "150", "1", "--output-dir", str(out), "-q"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(base_args(tiny_checkpoint, out) + ["--save-attn"]) == 0
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_foreign_directory_is_left_alone(tmp_path, tiny_checkpoint, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.pt").write_bytes(b"my own predictions")
    (mine / "attn_images").mkdir()
    (mine / "attn_images" / "figure.png").write_bytes(b"mine")
    before = snapshot(mine)
    assert main(base_args(tiny_checkpoint, mine)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-dir" in err[0] and "holds no run of this tool" in err[0]
    assert snapshot(mine) == before


def test_empty_output_dir_is_an_error(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(base_args(tiny_checkpoint, "")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-dir" in err[0] and "empty" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_late_failure_keeps_the_previous_run(tmp_path, tiny_checkpoint, good_run, monkeypatch, capsys):
    run = copy_run(good_run, tmp_path / "run")
    before = snapshot(run)
    import sam2_layerwise.store.image_run as image_run

    def broken(*a, **k):
        raise RuntimeError("disk vanished (injected)")

    monkeypatch.setattr(image_run, "build_summary", broken)
    assert main(base_args(tiny_checkpoint, run) + ["--save-qkv"]) == 1
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_nan_checkpoint_is_a_finding_not_a_crash(tmp_path, tiny_checkpoint, good_run, capsys):
    ckpt = read_checkpoint(tiny_checkpoint)
    state = {k: v.clone() for k, v in ckpt["model"].items()}
    name = "image_encoder.trunk.blocks.1.attn.qkv.weight"
    state[name][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save({"model": state}, bad)
    run = copy_run(good_run, tmp_path / "run")
    assert main(base_args(bad, run)[:-1]) == 0
    err = capsys.readouterr().err
    assert "non-finite values (NaN/inf) in 1 tensors, first " + name in err
    assert "first in image_encoder.trunk.blocks.1.attn (q)" in err
    summary = json.loads((run / "layerwise_summary.json").read_text())
    nf = summary["nonfinite"]
    assert nf["found"] and nf["first"] == {"module": "image_encoder.trunk.blocks.1.attn", "call_index": 0, "tensor": "q"}
    assert summary["fidelity"]["ok"] is False and summary["fidelity"]["non_finite_checks"] > 0
    good = json.loads((good_run / "layerwise_summary.json").read_text())
    assert good["nonfinite"] == {"found": False, "first": None, "count": 0, "where": []}


def _spawn(args, umask=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "sam2_layerwise.cli.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _wait_for_staging(proc, parent, name, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(p.name.startswith(f".{name}.partial-") for p in parent.iterdir()):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_the_previous_run_and_no_staging(tmp_path, tiny_checkpoint, good_run, sig):
    """A real run, signalled while it writes its staging folder: SIGTERM cleans up at once, SIGKILL's
    left-over staging is removed by the next run; the previous run is byte-identical throughout."""
    run = copy_run(good_run, tmp_path / "run")
    before = snapshot(run)
    # drawing overlays for every layer keeps the staging folder alive for a while
    proc = _spawn(base_args(tiny_checkpoint, run)[:-1] + ["--render-attn-overlay", "--render-attn-heads"])
    assert _wait_for_staging(proc, tmp_path, "run"), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert snapshot(run) == before
    staging = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "terminated (SIGTERM); nothing was changed" in err, err
        assert staging == []
        return
    assert proc.returncode == -signal.SIGKILL and len(staging) == 1  # SIGKILL cannot be handled
    # the next run (here with umask 027) removes it and writes files the umask allows
    proc = _spawn(base_args(tiny_checkpoint, run), umask=0o027)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (run / "layerwise_summary.json").stat().st_mode & 0o777 == 0o640
    assert (run / "prediction_images").stat().st_mode & 0o777 == 0o750

"""The Ray engine on a real local Ray instance (two workers): the same tables as the local engine, a worker
killed mid-sweep loses and duplicates nothing, an unreachable --ray-address fails fast. Marked `ray`; skipped
where Ray is not installed (CI installs the extra: scripts/bootstrap.sh)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sam2_layerwise.cli.main import main
from tests.conftest import REPO
from tests.sweep.conftest import run_api, sweep_cmd

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (starting Ray takes seconds); sweeps join it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def kill_once(marker: str, at: int):
    """A before_item hook for the Ray workers: the worker about to run item `at` kills itself with SIGKILL,
    once (the marker file says it happened)."""
    def hook(item):
        if item.index == at:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.startswith("seconds")])


def test_ray_engine_gives_the_local_tables_even_when_a_worker_dies(ray_instance, tmp_path, photos, tiny_checkpoint,
                                                                   quant_checkpoints):
    """Six items on two Ray workers, one of which is SIGKILLed as it starts the third item: Ray restarts it and
    retries that item; the tables are the local engine's, every item exactly once."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    extra = ("--attribute", "--attribute-layers", "image_encoder_trunk_blocks_4:5,*final*")
    assert run_api(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w4a8_mixed", photos, local, *extra))["ok"] == 6
    report = run_api(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w4a8_mixed", photos, remote, *extra, "--engine",
                               "ray", "--num-workers", "2"), before_item=kill_once(str(tmp_path / "killed"), at=2))
    assert (tmp_path / "killed").exists()  # the worker really died mid-sweep
    assert report == {**report, "total": 6, "ok": 6, "failed": 0, "ran": 6}
    for table in ("items.parquet", "heads.parquet", "attribution.parquet"):
        a, b = pd.read_parquet(local / table), pd.read_parquet(remote / table)
        assert len(a) and len(set(a["key"])) == 6
        pd.testing.assert_frame_equal(comparable(a), comparable(b))
    keys = sorted(pd.read_parquet(local / "items.parquet")["key"])
    assert sorted(p.name for p in (remote / "parts").iterdir()) == keys  # no shard lost, none extra
    pd.testing.assert_frame_equal(pd.read_parquet(local / "sweep" / "heads.parquet"),
                                  pd.read_parquet(remote / "sweep" / "heads.parquet"))


def test_unreachable_ray_address_fails_fast(tmp_path, photos, tiny_checkpoint, quant_checkpoints, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert main(sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", photos, out, "--engine", "ray",
                          "--ray-address", f"127.0.0.1:{port}")) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip()
    assert f"--ray-address 127.0.0.1:{port}: cannot reach a Ray cluster there" in err and err.count("\n") == 0
    assert not out.exists()


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        todo.extend(kids - out)
        out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_a_ray_sweep_like_ctrl_c(tmp_path, photos, tiny_checkpoint, quant_checkpoints):
    """SIGTERM to a sweep on a Ray instance it started: exit 143 with the one-line message (Ray's own handlers
    would exit 15 or 1, after a drain, with a native stack dump), every Ray process it started gone, finished
    items kept, and a resume finishes the rest."""
    out = tmp_path / "out"
    argv = sweep_cmd(tiny_checkpoint, quant_checkpoints, "w8a8", photos, out, "--engine", "ray", "--num-workers", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "sam2_layerwise.cli.main", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "parts").is_dir() or not any(p.name[0] != "." for p in (out / "parts").iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    started = _descendants(proc.pid)
    assert started  # Ray's processes (GCS, raylet, the worker)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "terminated (SIGTERM)" in lines[-1] and "SIGTERM received" not in err, err
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in started if _alive(p)]
    kept = {p.name for p in (out / "parts").iterdir()}
    report = run_api(argv[:-4])  # on the local engine: the finished items are not run again
    assert report["skipped"] == len(kept) >= 1 and report["ok"] == 6

"""A full disk is the machine's problem, not a bug: one line saying which file could not be written and that
nothing was changed (exit 1), and the previous run stays byte-identical. torch.save hides the OSError behind
"RuntimeError: unexpected pos"; the atomic writer digs it out."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch

from sam2_layerwise.cli.main import main
from sam2_layerwise.store import atomic
from tests.conftest import CHELSEA, TINY_CONFIG
from tests.store.test_run_writer import snapshot


class _Full(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, fd: int, room: int):
        self.fd, self.room = fd, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return os.write(self.fd, b)

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


@pytest.fixture
def fill_disk(monkeypatch):
    """Call it to make every atomic write from then on fail after 600 bytes, as on a full disk."""

    def fill():
        monkeypatch.setattr(atomic.os, "fdopen",
                            lambda fd, mode="r", *a, **k: io.BufferedWriter(_Full(fd, room=600), buffer_size=256))

    return fill


def test_torch_save_raises_the_disk_error(tmp_path, fill_disk):
    fill_disk()
    with pytest.raises(OSError) as found:
        atomic.atomic_torch_save({"t": torch.randn(4096)}, tmp_path / "x.pt")
    assert found.value.errno == errno.ENOSPC and found.value.filename == str(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_visualize_on_a_full_disk_says_so_and_keeps_the_old_run(tmp_path, tiny_checkpoint, capsys, fill_disk):
    out = tmp_path / "run"
    args = ["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
            "--points", "220", "150", "1", "--save-attn", "--output-dir", str(out), "-q"]
    assert main(args) == 0
    before = snapshot(out)
    capsys.readouterr()

    fill_disk()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {out.parent}" in err[0] and "No space left on device" in err[0], err
    assert "nothing was changed" in err[0] and "internal error" not in err[0]
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

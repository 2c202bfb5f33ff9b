"""Manifest hashes: a remembered SHA-256 is used only for the very bytes it was taken of."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from sam2_layerwise.store import hashing
from sam2_layerwise.store.atomic import json_text


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM2_LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "REMEMBER_BYTES", 1024)
    return tmp_path / "cache" / "sha256"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_remembered_hash_follows_the_bytes(tmp_path, cache):
    f = tmp_path / "model.pt"
    f.write_bytes(os.urandom(4096))
    assert hashing.sha256_file(f) == _sha(f)
    assert len(list(cache.iterdir())) == 1  # remembered
    assert hashing.sha256_file(f) == _sha(f)  # and read back

    # the same size, the modification time set back: the status-change time still tells
    st = f.stat()
    with open(f, "r+b") as h:
        h.write(b"\0" * 16)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert hashing.sha256_file(f) == _sha(f)

    # a file replaced under the same name (new inode)
    g = tmp_path / "other.pt"
    g.write_bytes(os.urandom(4096))
    os.replace(g, f)
    assert hashing.sha256_file(f) == _sha(f)


@pytest.mark.parametrize("entry", [b"", b"{", b"[]", b'{"stat": "x", "sha256": 1}', b"\xff" * 9000,
                                   b'{"stat": null, "sha256": "' + b"0" * 64 + b'"}'])
def test_malformed_cache_entries_are_ignored(tmp_path, cache, entry):
    f = tmp_path / "model.pt"
    f.write_bytes(os.urandom(2048))
    hashing.sha256_file(f)
    (path,) = cache.iterdir()
    path.write_bytes(entry)
    assert hashing.sha256_file(f) == _sha(f)
    # a well-formed entry for other bytes (a forged or stale digest) is not believed
    path.write_text(json.dumps({"stat": [0, 0, 0, 0, 0], "sha256": "0" * 64}))
    assert hashing.sha256_file(f) == _sha(f)


def test_small_files_and_unwritable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM2_LAYERWISE_CACHE", "/proc/no-such-place")
    f = tmp_path / "config.yaml"
    f.write_bytes(b"model: {}\n" * 300)
    monkeypatch.setattr(hashing, "REMEMBER_BYTES", 1024)
    assert hashing.sha256_file(f) == _sha(f)  # a cache that cannot be written costs only the time


def test_json_layout_round_trips():
    obj = {"a": {"b": [1, 2.5, {"c": None}], "d": {}, "e": []}, "f": "ü\n\"x\"", "g": [[1, [2]], {"h": True}],
           "i": {1: "int key"}, "j": float("inf")}
    text = json_text(obj)
    back = json.loads(text)
    assert back == json.loads(json.dumps(obj))
    assert text.splitlines()[:3] == ["{", ' "a": {', '  "b": [1, 2.5, {"c": null}],']


def test_checkpoints_remember_their_hash_as_they_are_written(tmp_path, cache):
    """save_checkpoint hashes the bytes on their way out: the entry it leaves is the file's real SHA-256, and a
    later sha256_file takes it instead of reading the file."""
    import torch

    from sam2_layerwise.model.loading import save_checkpoint

    f = tmp_path / "ckpt.pt"
    save_checkpoint(torch.nn.Linear(64, 64), f)
    (entry,) = cache.iterdir()
    assert json.loads(entry.read_text())["sha256"] == _sha(f)
    assert torch.load(f, weights_only=True)["model"]["weight"].shape == (64, 64)

    assert hashing._remembered(f, f.stat()) == _sha(f)  # what sha256_file will take without reading the file
    # overwritten in place afterwards: the entry no longer matches and the new bytes are hashed
    with open(f, "r+b") as h:
        h.seek(100)
        h.write(b"\1" * 8)
    assert hashing._remembered(f, f.stat()) is None
    assert hashing.sha256_file(f) == _sha(f)

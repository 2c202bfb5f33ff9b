"""The run writer replaces a run all at once or not at all: errors injected at every step leave the old run
byte for byte as it was and no staging folder behind."""

from __future__ import annotations

import os

import pytest

from sam2_layerwise.errors import InputError
from sam2_layerwise.store import layout

MARKER = '{"schema": "sam2-layerwise/summary", "n": %d}'


def snapshot(root):
    """Every entry under root: file bytes, link targets, directories, and the modes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", os.stat(p).st_mode)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), os.stat(p).st_mode)
    return out


def write_run(out, n, extra=()):
    with layout.RunWriter(out) as w:
        w.path(layout.SUMMARY).write_text(MARKER % n)
        w.path(f"{layout.PREDICTION_IMAGES}/mask_0.png").write_bytes(b"png%d" % n)
        w.path(f"{layout.ATTN_TENSORS}/by_layer/a/a__attn.pt").write_bytes(b"t%d" % n)
        for rel in extra:
            w.path(rel).write_bytes(b"x")
    return w


@pytest.fixture
def old_run(tmp_path):
    out = tmp_path / "run"
    write_run(out, 1)
    (out / "my_notes.txt").write_text("mine")  # not the tool's: carried over, never deleted
    (out / "link_to_notes").symlink_to("my_notes.txt")
    return out


def leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_replace_keeps_foreign_entries_and_removes_stale_ones(old_run):
    with layout.RunWriter(old_run) as w:
        w.path(layout.SUMMARY).write_text(MARKER % 2)
    assert (old_run / layout.SUMMARY).read_text() == MARKER % 2
    assert not (old_run / layout.ATTN_TENSORS).exists()  # the old run's tensors are not this run's
    assert (old_run / "my_notes.txt").read_text() == "mine"
    assert os.readlink(old_run / "link_to_notes") == "my_notes.txt"
    assert leftovers(old_run) == []


def test_owned_subset_keeps_the_rest(old_run):
    with layout.RunWriter(old_run, owned=(layout.SUMMARY, layout.ATTN_IMAGES)) as w:
        w.path(layout.SUMMARY).write_text(MARKER % 3)
        w.path(f"{layout.ATTN_IMAGES}/x.png").write_bytes(b"img")
    assert (old_run / layout.ATTN_TENSORS / "by_layer/a/a__attn.pt").read_bytes() == b"t1"
    assert (old_run / layout.ATTN_IMAGES / "x.png").read_bytes() == b"img"


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device (injected)")


# (object, attribute) to break, and whether the exchange must be unavailable for that step to run
STEPS = [
    ("layout.shutil.copy2", False), ("layout.os.symlink", False),
    ("layout.exchange", False), ("layout.os.rename", True),
    ("layout.shutil.copystat", False),
]


@pytest.mark.parametrize("target, no_exchange", STEPS)
def test_error_at_every_step_restores_the_old_run(old_run, monkeypatch, target, no_exchange):
    before = snapshot(old_run)
    if no_exchange:
        monkeypatch.setattr(layout, "exchange", lambda a, b: False)
    if target == "layout.shutil.copy2":
        monkeypatch.setattr(layout.os, "link", _fail)  # copies happen where links are refused
    obj, attr = target.rsplit(".", 1)
    monkeypatch.setattr(eval(obj, {"layout": layout}), attr, _fail)
    with pytest.raises(OSError, match="injected"):
        write_run(old_run, 2)
    monkeypatch.undo()
    assert snapshot(old_run) == before
    assert leftovers(old_run) == []


def test_refused_hard_links_fall_back_to_copies(old_run, monkeypatch):
    monkeypatch.setattr(layout.os, "link", _fail)
    write_run(old_run, 2)
    monkeypatch.undo()
    assert (old_run / "my_notes.txt").read_text() == "mine"
    assert leftovers(old_run) == []


def test_second_rename_fails_after_the_first_succeeded(old_run, monkeypatch):
    """The two-rename fallback: the old run goes aside, the new one cannot arrive -> the old one comes back."""
    before = snapshot(old_run)
    monkeypatch.setattr(layout, "exchange", lambda a, b: False)
    real = os.rename
    calls = []

    def flaky(a, b):
        calls.append((str(a), str(b)))
        if len(calls) == 2:
            raise OSError(5, "I/O error (injected)")
        return real(a, b)

    monkeypatch.setattr(layout.os, "rename", flaky)
    with pytest.raises(OSError, match="injected"):
        write_run(old_run, 2)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (failed) in, back
    assert snapshot(old_run) == before
    assert leftovers(old_run) == []


def test_exception_inside_the_block_and_interrupt(old_run):
    before = snapshot(old_run)
    for exc in (RuntimeError("render failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with layout.RunWriter(old_run) as w:
                w.path(layout.SUMMARY).write_text(MARKER % 9)
                raise exc
        assert snapshot(old_run) == before
        assert leftovers(old_run) == []


def test_read_only_subdirectory_of_the_old_run(old_run):
    """Moving entries one by one used to fail here; exchanging whole directories does not touch them."""
    ro = old_run / layout.ATTN_TENSORS / "by_layer"
    os.chmod(ro, 0o500)
    try:
        write_run(old_run, 2)
        assert (old_run / layout.SUMMARY).read_text() == MARKER % 2
    finally:
        for dirpath, _, _ in os.walk(old_run.parent):
            os.chmod(dirpath, 0o755)


def test_stale_staging_of_a_dead_process_is_removed(old_run):
    dead = 4194303  # above any pid this test machine hands out
    stale = old_run.parent / f".{old_run.name}.partial-{dead}-0123abcd"
    (stale / "attn_tensors").mkdir(parents=True)
    alive = old_run.parent / f".{old_run.name}.partial-{os.getppid()}-0123abcd"  # a live process's: kept
    alive.mkdir()
    write_run(old_run, 2)
    assert not stale.exists() and alive.exists()


def test_old_run_left_aside_by_a_crash_is_put_back(tmp_path):
    out = tmp_path / "run"
    aside = tmp_path / ".run.old-4194303-0123abcd"
    aside.mkdir()
    (aside / layout.SUMMARY).write_text(MARKER % 1)
    layout.check_output_dir(out)
    assert (out / layout.SUMMARY).read_text() == MARKER % 1


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "predictions.pt").write_bytes(b"mine"), "holds no run of this tool"),
    (lambda d: (d / layout.SUMMARY).write_text('{"schema": "someone-else"}'), "holds no run of this tool"),
    (lambda d: (d / layout.SUMMARY).write_text("not json"), "holds no run of this tool"),
])
def test_foreign_directories_are_refused(tmp_path, make, message):
    d = tmp_path / "mine"
    d.mkdir()
    make(d)
    before = snapshot(d)
    with pytest.raises(InputError, match=message):
        layout.RunWriter(d)
    assert snapshot(d) == before


def test_locations_checked_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = {
        "": "is empty",
        str(tmp_path / "file"): "not a directory",
        str(tmp_path / "file" / "run"): "is not a directory",
        str(tmp_path / "dangling"): "does not exist",
        str(tmp_path / ("n" * 240)): "too long",
        "/proc/sam2_layerwise_run": "cannot write",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as info:
            layout.check_output_dir(path)
        assert str(info.value).startswith("--output-dir")
    with pytest.raises(InputError, match="is a directory"):
        layout.check_output_file(tmp_path, "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]


def test_files_follow_the_umask(tmp_path):
    from sam2_layerwise.store import atomic

    p = atomic.atomic_write_bytes(b"x", tmp_path / "f.bin")
    assert p.stat().st_mode & 0o777 == 0o666 & ~atomic.UMASK


@pytest.mark.parametrize("rel", ["../escape.txt", "/tmp/abs.txt", ".", "", "attn_tensors/../../escape.txt",
                                 "attn_tensors/../.."])
def test_paths_outside_the_run_are_refused(tmp_path, rel):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="outside the run directory"):
        with layout.RunWriter(out) as w:
            w.path(rel)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_paths_are_normalised_inside_the_staging_folder(tmp_path):
    out = tmp_path / "run"
    with layout.RunWriter(out) as w:
        p = w.path(f"{layout.ATTN_TENSORS}/./a/../b.pt")
        assert p == w.staging / layout.ATTN_TENSORS / "b.pt" and p.parent.is_dir()
        p.write_bytes(b"x")
        w.path(layout.SUMMARY).write_text("{}")
    assert (out / layout.ATTN_TENSORS / "b.pt").read_bytes() == b"x"

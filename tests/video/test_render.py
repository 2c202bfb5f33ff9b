"""`render --run-dir` on a saved video run: memory maps drawn again on their source frames from the saved tensors
(key-pooled per memory frame), without the model; frames that moved or do not match are named."""

from __future__ import annotations

import json
import shutil

import pytest

from sam2_layerwise.cli.main import main
from sam2_layerwise.store.atomic import safe_load
from tests.conftest import COFFEE, TINY_CONFIG


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_checkpoint, frames_dir):
    out = tmp_path_factory.mktemp("vrender") / "run"
    code = main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                 "--video", str(frames_dir), "--points", "230", "150", "1", "--max-frames", "4", "--save-attn",
                 "--max-tokens", "16", "--layers", "memory_attention*", "--output-dir", str(out), "-q"])
    assert code == 0
    return out


def _summary(out):
    return json.loads((out / "layerwise_summary.json").read_text())


def test_saved_memory_maps_are_pooled_per_frame(saved_run):
    s = _summary(saved_run)
    e = next(e for e in s["attention"] if e["kind"] == "memory_cross" and e["frame"] == 3)
    attn = safe_load(saved_run / e["files"]["attn"])
    pooling = attn["key_pooling"]
    assert pooling["per_segment"] and pooling["factor"] == 2  # 8x8 memory tokens -> 4x4 cells, pointers kept
    segs = e["geometry"]["key_segments"]
    assert [p["label"] for p in pooling["segments"]] == [g["label"] for g in segs]
    assert attn["probs"].shape[-1] == pooling["segments"][-1]["stop"] == 3 * 16 + 3 * 2
    assert attn["probs"].sum(-1).sub(1).abs().max() < 1e-5  # rows still sum to 1
    assert not (saved_run / "attn_images").exists()


def test_render_draws_a_saved_video_run(saved_run, capsys):
    code = main(["render", "--run-dir", str(saved_run), "--render-attn-overlay", "--cmap", "viridis",
                 "--topk-attn", "3", "-q"])
    assert code == 0, capsys.readouterr().err
    s = _summary(saved_run)
    assert s["render"]["command"] == "render" and s["render"]["cmap"] == "viridis"
    e = next(e for e in s["attention"] if e["kind"] == "memory_cross" and e["frame"] == 2)
    overlays = e["files"]["attn_overlays"]
    assert sorted(p.split("__")[-2] for p in overlays) == ["mem_f0000", "mem_f0001"]  # the frames in its memory
    assert all((saved_run / p).is_file() for p in overlays + e["files"]["memory_panels"])
    assert any("__pointers__" in p for p in e["files"]["attn_images"])
    charts = [f["files"].get("memory_chart") for f in s["frames"]["list"]]
    assert charts[0] is None and all((saved_run / c[0]).is_file() for c in charts[1:])
    assert (saved_run / "memory_charts" / "mass_by_age.png").is_file()
    lines = (saved_run / "attn_topk" / "topk_all.txt").read_text().splitlines()
    assert len([ln for ln in lines if ln[:1].isdigit()]) == 3


def test_render_names_missing_or_mismatched_frames(saved_run, tmp_path, frames_dir, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(frames_dir, moved)
    code = main(["render", "--run-dir", str(saved_run), "--attn-overlay-only", "--video", str(moved), "-q"])
    assert code == 0, capsys.readouterr().err
    (moved / "shot_alpha.png").unlink()  # now the selection starts one frame later
    for extra, needle in ((["--video", str(moved)], "--video"), (["--image", str(COFFEE)], "--image")):
        before = _summary(saved_run)
        code = main(["render", "--run-dir", str(saved_run), "--render-attn-overlay", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len([ln for ln in err if "error" in ln]) == 1 and needle in err[-1], err
        assert _summary(saved_run) == before


def test_a_run_made_from_a_relative_video_path_renders_from_anywhere(tmp_path, tiny_checkpoint, frames_dir,
                                                                      monkeypatch, capsys):
    """The summary keeps the video's absolute path (as typed otherwise), as image runs keep the image's."""
    shutil.copytree(frames_dir, tmp_path / "clip")
    monkeypatch.chdir(tmp_path)
    code = main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--video", "clip",
                 "--points", "230", "150", "1", "--max-frames", "2", "--save-attn", "--layers", "memory_attention*",
                 "--output-dir", "run", "-q"])
    assert code == 0, capsys.readouterr().err
    s = _summary(tmp_path / "run")
    assert s["video"]["path"] == str(tmp_path / "clip")
    monkeypatch.chdir("/")
    code = main(["render", "--run-dir", str(tmp_path / "run"), "--attn-overlay-only", "-q"])
    assert code == 0, capsys.readouterr().err


def test_frames_the_summary_names_that_do_not_fit_blame_the_run(saved_run, tmp_path, capsys):
    """Without --video the frames come from the run's own summary: a mismatch names --run-dir (the user gave no
    --video) and says how to point at moved frames."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    s = _summary(run)
    s["frames"]["list"][0]["name"] = "someone_else.png"
    (run / "layerwise_summary.json").write_text(json.dumps(s))
    code = main(["render", "--run-dir", str(run), "--attn-overlay-only", "-q"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert code == 2 and len(err) == 1, err
    assert f"--run-dir {run}: the video this run names" in err[0] and "pass --video PATH" in err[0], err


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s["frames"].update(list=[]), "frames.list is empty"),
    (lambda s: s["frames"]["list"][0].update(source_index="0"), "frames.list[0].source_index is str"),
    (lambda s: next(e for e in s["attention"] if e["kind"] == "memory_cross").update(frame=10**9),
     ".frame is 1000000000, expected 0..3"),
    (lambda s: next(e for e in s["attention"] if e["kind"] == "memory_cross")["geometry"]["key_segments"][0]
     .update(frame=7), "key_segments[0].frame is 7, expected 0..3"),
])
def test_frame_indices_outside_the_run_are_named(saved_run, tmp_path, capsys, edit, needle):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    s = _summary(run)
    edit(s)
    (run / "layerwise_summary.json").write_text(json.dumps(s))
    code = main(["render", "--run-dir", str(run), "--render-attn", "-q"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert code == 2 and len(err) == 1 and f"--run-dir {run}: layerwise_summary.json is malformed" in err[0], err
    assert needle in err[0], err
